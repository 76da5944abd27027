"""Iterative plane fit with outlier rejection, as Montage's mFitplane does it.

Pure computation on a difference image. The fit follows mFitplane exactly so that
fits.tbl rows are identical to Montage's:

* coordinates ``x = i - crpix1``, ``y = j - crpix2`` for 0-based column ``i``, row ``j``;
* exactly 20 iterations of a least-squares fit of ``a*x + b*y + c`` in which, after the
  first, pixels further than ``2*rms`` from the previous plane are rejected;
* sums accumulated sequentially in scan order (coordinate sums that are provably exact
  are gathered as integers instead: the same doubles, fewer dependent additions) and
  the 3x3 normal equations solved by Gauss-Jordan elimination with full pivoting,
  which reproduces Montage's doubles;
* ``npixel`` and ``rms`` from the last rms pass, ``xmin``..``ycenter`` from the last fit.

Iterations stop early once the state ``(a, b, c, rms)`` repeats bit for bit: every
later iteration would then reproduce it, so the result is the same as after 20.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from diffit.boundingbox import bounding_box_from_rows, row_extremes

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
def _all_finite(xs, ys, zs):  # pragma: no cover - jitted
    bad = False
    for k in range(xs.shape[0]):
        bad |= (not np.isfinite(xs[k])) | (not np.isfinite(ys[k])) | (not np.isfinite(zs[k]))
    return not bad


_FRACTION_BITS = 26  # coordinates must be multiples of 2**-26 for the exact path


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fraction_bits(values):  # pragma: no cover - jitted
    """A guess at the smallest ``q`` making every ``value * 2**q`` an integer (or -1).

    Only a guess: ``v - floor(v)`` can round for small negative ``v``.
    ``_exact_scale_bits`` verifies it.
    """
    unit = float(2 ** _FRACTION_BITS)
    bits = 0
    bad = False
    for k in range(values.shape[0]):
        v = values[k]
        fraction = (v - np.floor(v)) * unit
        bad |= fraction != np.floor(fraction)  # also true for non-finite v
        bits |= np.int32(fraction)  # only used when no value was bad
    if bad:
        return -1
    q = _FRACTION_BITS
    while bits != 0 and bits % 2 == 0:
        bits //= 2
        q -= 1
    return q if bits != 0 else 0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _all_multiples(values, scale):  # pragma: no cover - jitted
    """True when every ``value * scale`` (exact: scale is a power of two) is an integer."""
    bad = False
    for k in range(values.shape[0]):
        v = values[k] * scale
        bad |= v != np.floor(v)
    return not bad


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _sum_of_squares(xs, ys):  # pragma: no cover - jitted
    """``sum(x*x + y*y)`` in any order: only used as a bound, with a safety margin."""
    total = 0.0
    for k in range(xs.shape[0]):
        total += xs[k] * xs[k] + ys[k] * ys[k]
    return total


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _exact_scale_bits(xs, ys):  # pragma: no cover - jitted
    """``q`` such that all sums of x, y, x*x, y*y, x*y are exact, or -1.

    Requires finite ``xs``, ``ys``. Let ``X = x*2**q`` and ``Y = y*2**q`` be integers.
    If ``S = sum(X*X + Y*Y) < 2**53`` over *all* pixels then, as ``|X| <= X*X`` for
    integers, ``sum|X|`` and ``sum|Y|`` are below ``2**53`` too, and
    ``sum|X*Y| <= S/2``. So every term x, y, x*x, y*y, x*y and every partial sum over
    any subset of the pixels, in any order, is an integer multiple of ``2**-2q`` below
    ``2**53 * 2**-2q`` in magnitude: an exactly representable double. None of
    Montage's sequential additions rounds, and its sums equal the exact ones. ``S`` is
    computed in floating point with relative error below ``(n+1) * 2**-53``, which the
    test ``S <= 2**52`` leaves room for.
    """
    qx = _fraction_bits(xs)
    qy = _fraction_bits(ys)
    if qx < 0 or qy < 0:
        return -1
    q = max(qx, qy)
    scale = 2.0 ** q
    if not (_all_multiples(xs, scale) and _all_multiples(ys, scale)):
        return -1
    if not _sum_of_squares(xs, ys) * (scale * scale) <= 2.0 ** 52:  # NaN/inf fail too
        return -1
    return q


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _scaled_integers(values, scale):  # pragma: no cover - jitted
    out = np.empty(values.shape[0], dtype=np.int32)
    for k in range(values.shape[0]):
        out[k] = np.int32(values[k] * scale)
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _row_starts(ys):  # pragma: no cover - jitted
    """Start of each run of bit-identical ``ys`` (one image row), then ``len(ys)``."""
    n = ys.shape[0]
    bits = ys.view(np.int64)
    count = 1 if n > 0 else 0
    for k in range(1, n):
        count += bits[k] != bits[k - 1]
    starts = np.empty(count + 1, dtype=np.int64)
    count = 0
    for k in range(n):
        if k == 0 or bits[k] != bits[k - 1]:
            starts[count] = k
            count += 1
    starts[count] = n
    return starts


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _count_within(residual, limit):  # pragma: no cover - jitted
    """Number of residuals not above ``limit`` (NaN counts as within)."""
    count = 0
    for k in range(residual.shape[0]):
        count += not (residual[k] > limit)
    return count


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_pass_exact(xs, zs, xi, starts, row_y, row_yi, residual, limit):  # pragma: no cover - jitted
    """Fit-pass sums when the coordinate sums are exact (see ``_exact_scale_bits``).

    Only the ``z`` sums need Montage's scan order; they are accumulated in sequence.
    The coordinate sums are exact in any order, so they are gathered as integers
    (``X = x*2**q``, ``Y = y*2**q``) per row, where ``Y`` is constant. Returns
    ``(sum X*X, sum Y*Y, sum X*Y, sum X, sum Y, sxz, syz, sz, n)``.
    """
    sxz = syz = sz = 0.0
    s_n = s_x = s_y = s_xx = s_yy = s_xy = 0
    for r in range(starts.shape[0] - 1):
        y = row_y[r]
        r_n = r_x = r_xx = 0
        for k in range(np.uint64(starts[r]), np.uint64(starts[r + 1])):
            keep = 0.0 if residual[k] > limit else 1.0
            z = zs[k] * keep  # z or a zero; x, y, z finite: products are x*z or zeros
            sxz += xs[k] * z
            syz += y * z
            sz += z
            n = np.int64(keep)
            x = xi[k] * n
            r_n += n
            r_x += x
            r_xx += x * x
        y_int = np.int64(row_yi[r])
        s_n += r_n
        s_x += r_x
        s_xx += r_xx
        s_y += y_int * r_n
        s_yy += (y_int * y_int) * r_n
        s_xy += y_int * r_x
    return s_xx, s_yy, s_xy, s_x, s_y, sxz, syz, sz, s_n


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_pass_finite(xs, ys, zs, residual, limit):  # pragma: no cover - jitted
    """Fit-pass sums, all accumulated in scan order (finite x, y, z)."""
    sxx = syy = sxy = sx = sy = sxz = syz = sz = 0.0
    for k in range(xs.shape[0]):
        keep = 0.0 if residual[k] > limit else 1.0
        x = xs[k]
        y = ys[k]
        x_keep = x * keep
        y_keep = y * keep
        z_keep = zs[k] * keep
        sxx += x * x_keep
        syy += y * y_keep
        sxy += x * y_keep
        sx += x_keep
        sy += y_keep
        sxz += x * z_keep
        syz += y * z_keep
        sz += z_keep
    return sxx, syy, sxy, sx, sy, sxz, syz, sz, _count_within(residual, limit)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_pass_level(xs, ys, zs, residual, limit):  # pragma: no cover - jitted
    """The fit-pass sums a level-only fit uses (finite x, y, z)."""
    sx = sy = sz = 0.0
    for k in range(xs.shape[0]):
        keep = 0.0 if residual[k] > limit else 1.0
        sx += xs[k] * keep
        sy += ys[k] * keep
        sz += zs[k] * keep
    return 0.0, 0.0, 0.0, sx, sy, 0.0, 0.0, sz, _count_within(residual, limit)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_pass_any(xs, ys, zs, residual, limit):  # pragma: no cover - jitted
    """Fit-pass sums for any values, non-finite ones included (skips, as Montage)."""
    sxx = syy = sxy = sx = sy = sxz = syz = sz = 0.0
    sn = 0
    for k in range(xs.shape[0]):
        if residual[k] > limit:
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
        sn += 1
    return sxx, syy, sxy, sx, sy, sxz, syz, sz, sn


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rms_pass(xs, ys, zs, a, b, c, residual, limit):  # pragma: no cover - jitted
    """Store every ``|z - plane|``; return the sum of squares and count within limit."""
    szz = 0.0
    for k in range(xs.shape[0]):
        dz = abs(zs[k] - (a * xs[k] + b * ys[k] + c))
        residual[k] = dz
        szz += 0.0 if dz > limit else dz * dz
    return szz, _count_within(residual, limit)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_kernel(xs, ys, zs, level_only, n_iterations, stop_early):  # pragma: no cover - jitted
    """Montage's iterative clipped plane fit over compacted pixels.

    Each iteration is a fit pass (sums over the pixels within ``2*rms`` of the previous
    plane) and an rms pass (residuals from the new plane). The rms pass stores each
    pixel's residual, which is exactly what the next fit pass clips on, so the plane is
    evaluated once per pixel and iteration. ``xmin``..``ymax`` of the last fit pass are
    found in one pass at the end. With ``stop_early`` the loop ends once the state
    ``(a, b, c, rms)`` repeats (every later iteration would reproduce it).

    The passes are branch-free: a rejected pixel adds an exact zero, which leaves a
    running sum unchanged (a sum that starts at +0 never becomes -0), so the sums equal
    Montage's skip-the-pixel sums bit for bit. When every coordinate is a small multiple
    of a power of two (a dyadic CRPIX: the usual case), the coordinate sums
    ``x, y, x*x, y*y, x*y`` are exact in any order (``_exact_scale_bits``) and are
    gathered as integers; only the sums with ``z`` keep Montage's scan order. Inputs
    with non-finite values take the plain skipping loop.

    Returns ``(status, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms)``.
    """
    n = xs.shape[0]
    finite = _all_finite(xs, ys, zs)
    scale_bits = -1
    if finite and not level_only:
        scale_bits = _exact_scale_bits(xs, ys)
    if scale_bits >= 0:
        scale = 2.0 ** scale_bits
        unit = 1.0 / scale
        xi = _scaled_integers(xs, scale)
        starts = _row_starts(ys)
        rows = starts.shape[0] - 1
        row_y = np.empty(rows)
        for r in range(rows):
            row_y[r] = ys[starts[r]]
        row_yi = _scaled_integers(row_y, scale)
    m = np.empty((3, 3))
    v = np.zeros(3)
    a = 0.0
    b = 0.0
    c = 0.0
    rms = 0.0
    residual = np.zeros(n)       # |z - plane| for the latest coefficients
    used_residual = np.zeros(n)  # the residuals the latest fit pass clipped on
    used_limit = np.inf
    xcenter = 0.0
    ycenter = 0.0
    npixel = 0.0
    for iteration in range(n_iterations):
        limit = 2.0 * rms
        fit_limit = limit if rms > 0.0 else np.inf  # nothing exceeds inf, not even NaN
        if not finite:
            sums = _fit_pass_any(xs, ys, zs, residual, fit_limit)
        elif level_only:
            sums = _fit_pass_level(xs, ys, zs, residual, fit_limit)
        elif scale_bits >= 0:
            s_xx, s_yy, s_xy, s_x, s_y, sxz, syz, sz, s_n = _fit_pass_exact(
                xs, zs, xi, starts, row_y, row_yi, residual, fit_limit)
            # int64 -> double is exact below 2**53; scaling by 2**-q is exact
            sums = (s_xx * unit * unit, s_yy * unit * unit, s_xy * unit * unit,
                    s_x * unit, s_y * unit, sxz, syz, sz, s_n)
        else:
            sums = _fit_pass_finite(xs, ys, zs, residual, fit_limit)
        sxx, syy, sxy, sx, sy, sxz, syz, sz, count = sums
        sn = float(count)
        used_residual, residual = residual, used_residual
        used_limit = fit_limit
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
        rms_limit = limit if iteration > 0 else np.inf
        szz, count = _rms_pass(xs, ys, zs, new_a, new_b, new_c, residual, rms_limit)
        new_rms = np.sqrt(szz / float(count))
        converged = (
            iteration >= 1
            and _same(new_a, a) and _same(new_b, b) and _same(new_c, c) and _same(new_rms, rms)
        )
        a = new_a
        b = new_b
        c = new_c
        rms = new_rms
        npixel = float(count)
        if converged and stop_early:
            break
    xmin = 1000000.0
    xmax = -1000000.0
    ymin = 1000000.0
    ymax = -1000000.0
    for k in range(n):
        if used_residual[k] > used_limit:
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
    shape = image.shape
    _check_shape(shape, level_only)
    image = np.ascontiguousarray(image, dtype=np.float64)
    crpix1 = float(crpix1)
    crpix2 = float(crpix2)
    xs, ys, zs = _valid_pixels(image, crpix1, crpix2)
    rows, lo, hi = row_extremes(image)
    return fit_pixels(xs, ys, zs, rows, lo, hi, crpix1, crpix2, level_only,
                      shape=shape, stop_early=stop_early)


def _check_shape(shape: tuple[int, ...], level_only: bool) -> None:
    ny, nx = shape
    if not level_only and (nx < 2 or ny < 2):
        raise FitError("Too few pixels to fit")


def fit_pixels(
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
    rows: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    crpix1: float,
    crpix2: float,
    level_only: bool = False,
    *,
    shape: tuple[int, int],
    stop_early: bool = True,
) -> PlaneFit:
    """:func:`fit_plane` from the finite pixels of the image, already gathered.

    Parameters
    ----------
    xs, ys, zs : numpy.ndarray
        float64 coordinates ``x = i - crpix1``, ``y = j - crpix2`` (0-based column ``i``,
        row ``j``) and values of the image's finite pixels, in scan order.
    rows, lo, hi : numpy.ndarray
        The image's row extremes, as :func:`diffit.boundingbox.row_extremes` returns them.
    crpix1, crpix2 : float
        Reference pixel of the image.
    level_only : bool, optional
        Fit only the level ``c`` (``a = b = 0``).
    shape : tuple of int
        ``(ny, nx)`` of the image (Montage's "Too few pixels to fit" rule needs it).
    stop_early : bool, optional
        As for :func:`fit_plane`.

    Returns
    -------
    PlaneFit

    Raises
    ------
    FitError
        As for :func:`fit_plane`.
    """
    _check_shape(shape, level_only)
    crpix1 = float(crpix1)
    crpix2 = float(crpix2)
    (status, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms) = _fit_kernel(
        xs, ys, zs, bool(level_only), N_ITERATIONS, bool(stop_early)
    )
    if status:
        raise FitError(_SINGULAR_MESSAGES[status])
    boxx, boxy, boxwidth, boxheight, boxang = bounding_box_from_rows(rows, lo, hi, crpix1, crpix2)
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
