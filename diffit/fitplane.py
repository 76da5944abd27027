"""Iterative plane fit with outlier rejection, as Montage's mFitplane does it.

Pure computation on a difference image. The fit follows mFitplane exactly so that
fits.tbl rows are identical to Montage's:

* coordinates ``x = i - crpix1``, ``y = j - crpix2`` for 0-based column ``i``, row ``j``;
* exactly 20 iterations of a least-squares fit of ``a*x + b*y + c`` in which, after the
  first, pixels further than ``2*rms`` from the previous plane are rejected;
* sums accumulated sequentially in scan order (coordinate sums that are provably exact
  are gathered in any order instead: the same doubles, fewer dependent additions) and
  the 3x3 normal equations solved by Gauss-Jordan elimination with full pivoting,
  which reproduces Montage's doubles;
* ``npixel`` and ``rms`` from the last rms pass, ``xmin``..``ycenter`` from the last fit.

Iterations stop early once the state ``(a, b, c, rms)`` repeats bit for bit: every
later iteration would then reproduce it, so the result is the same as after 20.

The fit itself is the compiled kernel :func:`diffit._fitplane.fit_kernel` (Cython,
``diffit/_fitplane.pyx``); it runs without the GIL.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffit._fitplane import fit_kernel as _fit_kernel
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


def _valid_pixels(
    image: np.ndarray, crpix1: float, crpix2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates and values of the finite pixels, in scan order.

    ``x = i - crpix1`` and ``y = j - crpix2`` (0-based column ``i``, row ``j``), each
    the double nearest to the difference, as Montage computes them. The values are as
    mFitplane reads them from a file holding ``image``: CFITSIO turns zeros of either
    sign and subnormal values into +0.0.
    """
    finite = np.isfinite(image)
    rows, cols = np.nonzero(finite)  # both in C (scan) order, as the mask indexing below
    values = image[finite]
    values[np.abs(values) < np.finfo(np.float64).tiny] = 0.0
    return cols - float(crpix1), rows - float(crpix2), values


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
        Difference image (2-D); NaN and infinite pixels are blank, zeros and subnormal
        values count as +0.0 (as mFitplane reads them from a file).
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
        Contiguous float64 coordinates ``x = i - crpix1``, ``y = j - crpix2`` (0-based
        column ``i``, row ``j``) and values of the image's finite pixels, in scan order.
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
