"""Iterative plane fit with outlier rejection, as Montage's mFitplane does it.

Pure computation on a difference image. The fit follows mFitplane exactly so that
fits.tbl rows are identical to Montage's:

* coordinates ``x = i - crpix1``, ``y = j - crpix2`` for 0-based column ``i``, row ``j``;
* exactly 20 iterations of a least-squares fit of ``a*x + b*y + c`` in which, after the
  first, pixels further than ``2*rms`` from the previous plane are rejected;
* sums accumulated sequentially in scan order and the 3x3 normal equations solved by
  Gauss-Jordan elimination with full pivoting, which reproduces Montage's doubles;
* ``npixel`` and ``rms`` from the last rms pass, ``xmin``..``ycenter`` from the last fit.

Iterations stop early once the state ``(a, b, c, rms)`` repeats bit for bit: every
later iteration would then reproduce it, so the result is the same as after 20.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from diffit.boundingbox import bounding_box

N_ITERATIONS = 20

_SINGULAR_MESSAGES = {1: "Singular Matrix-1", 2: "Singular Matrix-2"}


class FitError(Exception):
    """A fit that Montage would report as failed (e.g. ``Too few pixels to fit``)."""


@dataclass(frozen=True)
class PlaneFit:
    """One plane fit ``z = a*x + b*y + c`` to a difference image: one fits.tbl row.

    Coordinates follow Montage: ``x = i - crpix1`` for 0-based column ``i``.
    ``xmin``..``ymax`` are the untruncated doubles (fits.tbl truncates them toward zero).
    """

    a: float
    b: float
    c: float
    crpix1: float
    crpix2: float
    xmin: float
    xmax: float
    ymin: float
    ymax: float
    xcenter: float
    ycenter: float
    npixel: int
    rms: float
    boxx: float
    boxy: float
    boxwidth: float
    boxheight: float
    boxang: float


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _solve3(m, v):  # pragma: no cover - jitted
    """Gauss-Jordan elimination with full pivoting on a 3x3 system, in place.

    Returns 0 on success (``v`` holds the solution), 1 when a pivot is chosen twice
    ("Singular Matrix-1") and 2 on an exactly zero pivot ("Singular Matrix-2").
    """
    n = 3
    used = np.zeros(n, dtype=np.int64)
    row = 0
    col = 0
    for step in range(n):
        largest = 0.0
        for r in range(n):
            if used[r] == 1:
                continue
            for c in range(n):
                if used[c] == 0:
                    if abs(m[r, c]) >= largest:
                        largest = abs(m[r, c])
                        row = r
                        col = c
                elif used[c] > 1:
                    return 1
        used[col] += 1
        if row != col:
            for c in range(n):
                tmp = m[row, c]
                m[row, c] = m[col, c]
                m[col, c] = tmp
            tmp = v[row]
            v[row] = v[col]
            v[col] = tmp
        if m[col, col] == 0.0:
            return 2
        inverse = 1.0 / m[col, col]
        m[col, col] = 1.0
        for c in range(n):
            m[col, c] *= inverse
        v[col] *= inverse
        for r in range(n):
            if r != col:
                factor = m[r, col]
                m[r, col] = 0.0
                for c in range(n):
                    m[r, c] -= m[col, c] * factor
                v[r] -= v[col] * factor
    return 0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _valid_pixels(image, crpix1, crpix2):  # pragma: no cover - jitted
    """Coordinates and values of the finite pixels, in scan order."""
    ny, nx = image.shape
    n = 0
    for j in range(ny):
        for i in range(nx):
            if np.isfinite(image[j, i]):
                n += 1
    xs = np.empty(n)
    ys = np.empty(n)
    zs = np.empty(n)
    k = 0
    for j in range(ny):
        y = j - crpix2
        for i in range(nx):
            z = image[j, i]
            if np.isfinite(z):
                xs[k] = i - crpix1
                ys[k] = y
                zs[k] = z
                k += 1
    return xs, ys, zs


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _same(x, y):  # pragma: no cover - jitted
    """True when two doubles are identical, including the sign of zero."""
    return x == y and np.signbit(x) == np.signbit(y)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_kernel(xs, ys, zs, level_only, n_iterations, stop_early):  # pragma: no cover - jitted
    """Montage's iterative clipped plane fit over compacted pixels.

    Each iteration is a fit pass (sums over the pixels within ``2*rms`` of the previous
    plane) and an rms pass (residuals from the new plane). The rms pass stores each
    pixel's residual, which is exactly what the next fit pass clips on, so the plane is
    evaluated once per pixel and iteration. ``xmin``..``ymax`` of the last fit pass are
    found in one pass at the end. With ``stop_early`` the loop ends once the state
    ``(a, b, c, rms)`` repeats (every later iteration would reproduce it).

    Returns ``(status, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms)``.
    """
    n = xs.shape[0]
    m = np.empty((3, 3))
    v = np.zeros(3)
    a = 0.0
    b = 0.0
    c = 0.0
    rms = 0.0
    residual = np.empty(n)       # |z - plane| for the latest coefficients
    used_residual = np.empty(n)  # the residuals the latest fit pass clipped on
    used_limit = 0.0
    used_clip = False
    xcenter = 0.0
    ycenter = 0.0
    npixel = 0.0
    for iteration in range(n_iterations):
        sxx = syy = sxy = sx = sy = sxz = syz = sz = sn = 0.0
        clip = rms > 0.0
        limit = 2.0 * rms
        for k in range(n):
            if clip and residual[k] > limit:
                continue
            x = xs[k]
            y = ys[k]
            z = zs[k]
            sxx += x * x
            syy += y * y
            sxy += x * y
            sx += x
            sy += y
            sxz += x * z
            syz += y * z
            sz += z
            sn += 1.0
        used_residual, residual = residual, used_residual
        used_limit = limit
        used_clip = clip
        xcenter = sx / sn
        ycenter = sy / sn
        if level_only:
            new_a = 0.0
            new_b = 0.0
            new_c = sz / sn
        else:
            m[0, 0] = sxx
            m[0, 1] = sxy
            m[0, 2] = sx
            m[1, 0] = sxy
            m[1, 1] = syy
            m[1, 2] = sy
            m[2, 0] = sx
            m[2, 1] = sy
            m[2, 2] = sn
            v[0] = sxz
            v[1] = syz
            v[2] = sz
            status = _solve3(m, v)
            if status != 0:
                return (status, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            new_a = v[0]
            new_b = v[1]
            new_c = v[2]
        szz = 0.0
        count = 0.0
        clip_rms = iteration > 0
        for k in range(n):
            dz = abs(zs[k] - (new_a * xs[k] + new_b * ys[k] + new_c))
            residual[k] = dz
            if clip_rms and dz > limit:
                continue
            szz += dz * dz
            count += 1.0
        new_rms = np.sqrt(szz / count)
        converged = (
            iteration >= 1
            and _same(new_a, a) and _same(new_b, b) and _same(new_c, c) and _same(new_rms, rms)
        )
        a = new_a
        b = new_b
        c = new_c
        rms = new_rms
        npixel = count
        if converged and stop_early:
            break
    xmin = 1000000.0
    xmax = -1000000.0
    ymin = 1000000.0
    ymax = -1000000.0
    for k in range(n):
        if used_clip and used_residual[k] > used_limit:
            continue
        if xs[k] < xmin:
            xmin = xs[k]
        if xs[k] > xmax:
            xmax = xs[k]
        if ys[k] < ymin:
            ymin = ys[k]
        if ys[k] > ymax:
            ymax = ys[k]
    return (0, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms)


def fit_plane(
    image: np.ndarray,
    crpix1: float,
    crpix2: float,
    level_only: bool = False,
    *,
    stop_early: bool = True,
) -> PlaneFit:
    """Fit a plane to a difference image with Montage's iterative 2-sigma clipping.

    Parameters
    ----------
    image : numpy.ndarray
        Difference image (2-D); NaN and infinite pixels are blank.
    crpix1, crpix2 : float
        Reference pixel of the image (as read back from its FITS header).
    level_only : bool, optional
        Fit only the level ``c`` (``a = b = 0``).
    stop_early : bool, optional
        Stop iterating once the fit state repeats exactly (identical result); ``False``
        always runs all 20 iterations, as Montage does.

    Returns
    -------
    PlaneFit

    Raises
    ------
    FitError
        "Too few pixels to fit" for images narrower than 2 pixels (unless
        ``level_only``), "Singular Matrix-1"/"Singular Matrix-2" when the normal
        equations have an exactly singular pivot.
    """
    ny, nx = image.shape
    if not level_only and (nx < 2 or ny < 2):
        raise FitError("Too few pixels to fit")
    image = np.ascontiguousarray(image, dtype=np.float64)
    crpix1 = float(crpix1)
    crpix2 = float(crpix2)
    xs, ys, zs = _valid_pixels(image, crpix1, crpix2)
    (status, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms) = _fit_kernel(
        xs, ys, zs, bool(level_only), N_ITERATIONS, bool(stop_early)
    )
    if status:
        raise FitError(_SINGULAR_MESSAGES[status])
    boxx, boxy, boxwidth, boxheight, boxang = bounding_box(image, crpix1, crpix2)
    if boxwidth == 0.0:
        boxx, boxwidth, boxang = xmin, 1.0, 0.0
    if boxheight == 0.0:
        boxy, boxheight, boxang = ymin, 1.0, 0.0
    return PlaneFit(
        a=a, b=b, c=c, crpix1=crpix1, crpix2=crpix2,
        xmin=xmin, xmax=xmax, ymin=ymin, ymax=ymax,
        xcenter=xcenter, ycenter=ycenter, npixel=int(npixel), rms=rms,
        boxx=boxx, boxy=boxy, boxwidth=boxwidth, boxheight=boxheight, boxang=boxang,
    )
