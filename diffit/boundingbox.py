"""Rotated bounding box of the valid pixels of a difference image, as mFitplane reports it.

Montage's mFitplane describes the footprint of a difference image by five numbers
(``boxx, boxy, boxwidth, boxheight, boxang``), computed by its ``pixbounds`` helper.
This module reproduces them bit for bit (MontagePy 2.3.0). The steps are:

1. **Boundary points** (:func:`boundary_points`). For every row ``j`` holding at least two
   finite pixels (not NaN, not +-inf), with ``mini``/``maxi`` the first/last finite column,
   two points ``(mini - crpix1, j - crpix2)`` and ``(maxi - crpix1, j - crpix2)`` are
   produced, row by row, the smaller column first. Rows with a single finite pixel add
   nothing.
2. **Convex hull** (three points or more). The pivot ``P0`` is the lowest point, the
   rightmost one on that row. The other points are ordered counter-clockwise by angle
   about ``P0``; of several points on one ray from ``P0`` only the farthest is kept.
   Montage decides both with a thresholded orientation test, which on these lattice
   points gives the exact sign, so here the order is computed from integer pixel offsets.
   A Graham scan then keeps a point only if it lies *strictly* left of the top two stack
   points. That test is evaluated in doubles on the crpix-shifted coordinates exactly as
   Montage does it, because with a fractional crpix the rounding noise decides whether
   nearly collinear lattice points become hull vertices.
3. **Minimum-area rectangle.** The hull edges are walked from the last vertex pushed down
   to ``P0`` and back (clockwise). For each edge, the normalised line ``A x + B y + C1 = 0``
   gives the extent across the edge (from the first vertex at the largest distance) and the
   extent along it. The first edge with the smallest positive area wins (strict ``<``).
   ``theta = atan2(A, B) * 45 / atan(1)``. The centre is the mean of the four corners.
   The result is ``boxwidth`` = extent along the edge, ``boxheight`` = extent across it
   (both measured between pixel centres), and ``boxang = -theta``. The angle is not
   normalised. It lies in **[-180, 180)**, not (-180, 180] as one might expect. ``A`` is
   never ``-0.0`` (a zero ``cur.y - nxt.y`` is ``+0.0``), so ``theta`` can be ``+180`` but
   never ``-180``. A horizontal edge visited left to right gives ``boxang = -0.0``, and one
   visited right to left gives ``-180.0``.
4. **Two points** (one usable row): the centre is the mean of the two points, and the
   box is the points padded by half a pixel: ``width = (xmax + 0.5) - (xmin - 0.5)``,
   ``height = (y + 0.5) - (y - 0.5)``, ``boxang = 0.0``. **No points**: everything is 0.

mFitplane's final fix-ups (a zero width or height replaced by 1, with the position taken
from the fit's ``xmin``/``ymin`` and the angle set to 0) are **not** applied here, since
they need the fit results. The caller applies them.

Floating-point operations follow Montage's order of evaluation. The kernels (the Cython
module :mod:`diffit._boundingbox`, which explains them in detail) are compiled without
fast-math, so no FMA contraction happens, and they take ``sqrt``, ``atan2`` and ``atan``
from the same C library that MontagePy calls. They release the GIL.

Deliberate deviations, none reachable with sane inputs:

* Montage keeps the box results in static variables and does not reset them. If no hull
  edge gave a positive area, it would report the previous call's box. That cannot happen
  here: two or more usable rows always give a non-degenerate hull. If it ever did, this
  module would return zeros for the box.
* The Graham scan here never pops below two stack entries (Montage would dereference
  NULL), which again cannot happen for these point sets.
* The angular order assumes that ``crpix`` is small enough for ``i - crpix`` to keep its
  integer spacing to within 0.5 px (i.e. ``|crpix| << 2**52``), as Montage's threshold does,
  and that the image has fewer than about ``2**24`` rows, so that slopes of distinct rays
  are distinct doubles.

Besides the two functions mFitplane needs, :func:`row_extremes` and
:func:`bounding_box_from_rows` split the work for callers that already know the row extents.
Scanning the blank pixels that lie outside the extremes is the dominant cost on large
images.
"""
from __future__ import annotations

import numpy as np

from diffit import _boundingbox

__all__ = ["boundary_points", "bounding_box", "bounding_box_from_rows", "row_extremes"]


def _as_image(image: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {arr.shape}")
    return arr


def row_extremes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows holding at least two finite pixels, with their first and last finite column.

    Parameters
    ----------
    image : numpy.ndarray
        2-D array indexed ``[row j, column i]``. NaN and +-inf pixels are blank. Anything
        other than a C-contiguous native float64 array is converted first (a copy).

    Returns
    -------
    rows, lo, hi : numpy.ndarray
        int64 arrays of equal length: the row indices in increasing order, and for each
        row the smallest and largest column index of a finite pixel (``lo < hi``).
    """
    return _boundingbox.row_extremes(_as_image(image))


def boundary_points(image: np.ndarray, crpix1: float,
                    crpix2: float) -> tuple[np.ndarray, np.ndarray]:
    """Row-extreme boundary points of the finite pixels, as mFitplane builds them.

    Parameters
    ----------
    image : numpy.ndarray
        2-D array indexed ``[row j, column i]``. NaN and +-inf pixels are blank.
    crpix1, crpix2 : float
        Reference pixel of the image (FITS CRPIX1/CRPIX2 as stored in the header).

    Returns
    -------
    x, y : numpy.ndarray
        float64 arrays of equal length ``2 * (number of rows with >= 2 finite pixels)``.
        For each such row ``j``, in increasing ``j``, they hold ``(mini - crpix1, j - crpix2)``
        and then ``(maxi - crpix1, j - crpix2)``, with ``mini``/``maxi`` the first and
        last finite column.
    """
    rows, lo, hi = row_extremes(image)
    n = rows.shape[0]
    x = np.empty(2 * n, np.float64)
    y = np.empty(2 * n, np.float64)
    x[0::2] = lo.astype(np.float64) - float(crpix1)
    x[1::2] = hi.astype(np.float64) - float(crpix1)
    yr = rows.astype(np.float64) - float(crpix2)
    y[0::2] = yr
    y[1::2] = yr
    return x, y


def bounding_box(image: np.ndarray, crpix1: float,
                 crpix2: float) -> tuple[float, float, float, float, float]:
    """mFitplane's bounding box of the finite pixels, before its final fix-ups.

    Parameters
    ----------
    image : numpy.ndarray
        2-D array indexed ``[row j, column i]``. NaN and +-inf pixels are blank.
    crpix1, crpix2 : float
        Reference pixel of the image. Coordinates are ``x = i - crpix1``, ``y = j - crpix2``.

    Returns
    -------
    boxx, boxy, boxwidth, boxheight, boxang : float
        Centre, extent along and across the winning hull edge, and that edge's direction in
        degrees (range [-180, 180), ``-0.0`` possible). With a single usable row the
        two-point fallback is used. With none, all five are ``0.0``. The caller must apply
        mFitplane's fix-ups: if ``boxwidth == 0`` then ``boxx = xmin, boxwidth = 1,
        boxang = 0``; if ``boxheight == 0`` then ``boxy = ymin, boxheight = 1, boxang = 0``.
    """
    rows, lo, hi = row_extremes(image)
    return bounding_box_from_rows(rows, lo, hi, crpix1, crpix2)


def bounding_box_from_rows(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                           crpix1: float,
                           crpix2: float) -> tuple[float, float, float, float, float]:
    """:func:`bounding_box` from row extremes that are already known.

    Parameters
    ----------
    rows, lo, hi : numpy.ndarray
        As returned by :func:`row_extremes`: strictly increasing row indices, and for each
        row the first and last finite column, with ``lo < hi``. Rows with fewer than two
        finite pixels must be left out.
    crpix1, crpix2 : float
        Reference pixel of the image.

    Returns
    -------
    boxx, boxy, boxwidth, boxheight, boxang : float
        As for :func:`bounding_box`.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    lo = np.ascontiguousarray(lo, dtype=np.int64)
    hi = np.ascontiguousarray(hi, dtype=np.int64)
    c1 = float(crpix1)
    c2 = float(crpix2)
    nrow = rows.shape[0]

    if nrow == 0:
        return 0.0, 0.0, 0.0, 0.0, 0.0

    if nrow == 1:
        # Montage's small-area branch, written out for its two points (min first).
        xa = float(lo[0]) - c1
        xb = float(hi[0]) - c1
        yv = float(rows[0]) - c2
        boxx = (xa + xb) / 2.0
        boxy = (yv + yv) / 2.0
        minx = xa - 0.5
        maxx = xa + 0.5
        if xb - 0.5 < minx:
            minx = xb - 0.5
        if xb + 0.5 > maxx:
            maxx = xb + 0.5
        return boxx, boxy, maxx - minx, (yv + 0.5) - (yv - 0.5), 0.0

    return _boundingbox.hull_box(rows, lo, hi, c1, c2)
