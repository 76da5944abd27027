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

Floating-point operations follow Montage's order of evaluation. The numba kernels are
compiled without fast-math, so no FMA contraction happens. ``atan2``/``atan`` are
evaluated with Python's :mod:`math`, i.e. with the same C library that MontagePy calls.

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

import math

import numba
import numpy as np

__all__ = ["boundary_points", "bounding_box", "bounding_box_from_rows", "row_extremes"]

_DEG_PER_RAD_NUM = 45.0  # Montage converts radians as  angle * 45. / atan(1)


_EXP_MASK = np.uint64(0x7FF0000000000000)  # a double is non-finite iff all these bits are set
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_BLOCK = 32


@numba.njit(cache=True, nogil=True)
def _row_extremes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with >= 2 finite pixels and their first and last finite column.

    ``image`` must be C-contiguous float64. Each row is scanned inwards from both ends, so
    pixels between the extremes are never read. Blank runs are skipped a block at a time:
    the bitwise AND of a block of doubles has all exponent bits set only if every one of
    them is NaN or +-inf.
    """
    ny, nx = image.shape
    bits = image.reshape(-1).view(np.uint64)
    rows = np.empty(ny, np.int64)
    lo = np.empty(ny, np.int64)
    hi = np.empty(ny, np.int64)
    k = 0
    for j in range(ny):
        base = j * nx
        i0 = 0
        while i0 + _BLOCK <= nx:
            acc = _ALL_ONES
            for t in range(_BLOCK):
                acc &= bits[base + i0 + t]
            if (acc & _EXP_MASK) != _EXP_MASK:
                break
            i0 += _BLOCK
        while i0 < nx and (bits[base + i0] & _EXP_MASK) == _EXP_MASK:
            i0 += 1
        if i0 >= nx - 1:  # no finite pixel, or only the last one
            continue
        i1 = nx  # exclusive
        while i1 - _BLOCK > i0:
            acc = _ALL_ONES
            for t in range(i1 - _BLOCK, i1):
                acc &= bits[base + t]
            if (acc & _EXP_MASK) != _EXP_MASK:
                break
            i1 -= _BLOCK
        i1 -= 1
        while (bits[base + i1] & _EXP_MASK) == _EXP_MASK:  # stops at i0 at the latest
            i1 -= 1
        if i1 > i0:
            rows[k] = j
            lo[k] = i0
            hi[k] = i1
            k += 1
    return rows[:k], lo[:k], hi[:k]


@numba.njit(cache=True, nogil=True)
def _argsort_keys(key: np.ndarray) -> np.ndarray:
    """Ascending argsort of ``key`` (order among equal keys unspecified).

    The points are fed in boundary order, which for convex regions is already (nearly)
    sorted by angle: then a natural merge sort over the few ascending runs is linear.
    Otherwise numpy's quicksort is used.
    """
    n = key.shape[0]
    nruns = 1
    for t in range(1, n):
        if key[t] < key[t - 1]:
            nruns += 1
    if nruns > 8:
        return np.argsort(key)
    starts = np.empty(nruns + 1, np.int64)
    r = 0
    starts[0] = 0
    for t in range(1, n):
        if key[t] < key[t - 1]:
            r += 1
            starts[r] = t
    starts[nruns] = n
    a = np.arange(n)
    b = np.empty(n, np.int64)
    while nruns > 1:
        w = 0
        r = 0
        while r < nruns:
            s0 = starts[r]
            if r + 1 == nruns:  # odd run out: copy through
                for t in range(s0, n):
                    b[t] = a[t]
                starts[w] = s0
                w += 1
                break
            s1 = starts[r + 1]
            s2 = starts[r + 2]
            i = s0
            j = s1
            t = s0
            while i < s1 and j < s2:
                if key[a[j]] < key[a[i]]:
                    b[t] = a[j]
                    j += 1
                else:
                    b[t] = a[i]
                    i += 1
                t += 1
            while i < s1:
                b[t] = a[i]
                i += 1
                t += 1
            while j < s2:
                b[t] = a[j]
                j += 1
                t += 1
            starts[w] = s0
            w += 1
            r += 2
        starts[w] = n
        nruns = w
        a, b = b, a
    return a


@numba.njit(cache=True, nogil=True)
def _hull(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray,
          crpix1: float, crpix2: float) -> tuple[np.ndarray, np.ndarray]:
    """Convex hull vertices in Montage's stack order (last pushed first, P0 last).

    Needs at least two entries in ``rows`` (i.e. four points).
    """
    nrow = rows.shape[0]
    # Integer lattice coordinates of all points except the pivot P0 = (hi[0], rows[0]).
    # They are listed in boundary order (right ends upwards, then left ends downwards),
    # which makes the angular sort cheap for convex regions; the order of the input does
    # not matter otherwise, as the angular order of the points is strict.
    m = 2 * nrow - 1
    pi = np.empty(m, np.int64)
    pj = np.empty(m, np.int64)
    t = 0
    for k in range(1, nrow):
        pi[t] = hi[k]
        pj[t] = rows[k]
        t += 1
    for k in range(nrow - 1, -1, -1):
        pi[t] = lo[k]
        pj[t] = rows[k]
        t += 1
    i0 = hi[0]
    j0 = rows[0]

    # Angle key about P0: -dx/dy grows with the angle for dy > 0. Equal rationals give
    # equal doubles and distinct ones (small denominators) distinct doubles, so ties are
    # exactly the points on one ray. The single point with dy == 0 lies at 180 degrees.
    key = np.empty(m, np.float64)
    for t in range(m):
        dy = pj[t] - j0
        if dy == 0:
            key[t] = np.inf
        else:
            key[t] = -(pi[t] - i0) / dy
    order = _argsort_keys(key)

    # Keep only the farthest point of each ray (largest dy; dy == 0 occurs once).
    keep = np.empty(m, np.int64)
    nk = 0
    t = 0
    while t < m:
        best = order[t]
        u = t + 1
        while u < m and key[order[u]] == key[order[t]]:
            if pj[order[u]] > pj[best]:
                best = order[u]
            u += 1
        keep[nk] = best
        nk += 1
        t = u

    # Point coordinates as Montage holds them: (column - crpix1, row - crpix2).
    n = nk + 1
    x = np.empty(n, np.float64)
    y = np.empty(n, np.float64)
    x[0] = float(i0) - crpix1
    y[0] = float(j0) - crpix2
    for t in range(nk):
        x[t + 1] = float(pi[keep[t]]) - crpix1
        y[t + 1] = float(pj[keep[t]]) - crpix2

    # Graham scan with Montage's strict left-turn test, evaluated in doubles.
    stack = np.empty(n, np.int64)
    stack[0] = 0
    stack[1] = 1
    top = 2
    i = 2
    while i < n:
        a = stack[top - 2]
        b = stack[top - 1]
        cross = (x[b] - x[a]) * (y[i] - y[a]) - (x[i] - x[a]) * (y[b] - y[a])
        if cross > 0.0 or top < 3:
            stack[top] = i
            top += 1
            i += 1
        else:
            top -= 1

    hx = np.empty(top, np.float64)
    hy = np.empty(top, np.float64)
    for t in range(top):
        v = stack[top - 1 - t]
        hx[t] = x[v]
        hy[t] = y[v]
    return hx, hy


@numba.njit(cache=True, nogil=True)
def _min_area_box(hx: np.ndarray, hy: np.ndarray) -> tuple[bool, float, float, float, float,
                                                           float, float]:
    """Montage's minimum-area rectangle over the hull (vertices in stack order).

    Returns ``(found, A, B, xcen, ycen, width, height)`` for the winning edge.
    """
    k = hx.shape[0]
    areamin = -1.0
    found = False
    Amin = 0.0
    Bmin = 0.0
    C1min = 0.0
    C2min = 0.0
    C3min = 0.0
    C4min = 0.0
    width = 0.0
    height = 0.0
    dist = np.empty(k, np.float64)
    along = np.empty(k, np.float64)
    for e in range(k):
        f = e + 1
        if f == k:
            f = 0
        cx = hx[e]
        cy = hy[e]
        nxx = hx[f]
        nyy = hy[f]
        A = cy - nyy
        B = nxx - cx
        C1 = cx * nyy - nxx * cy
        norm = math.sqrt(A * A + B * B)
        A = A / norm
        B = B / norm
        C1 = C1 / norm

        # Distances across the edge and positions along it, for all vertices (a loop
        # that vectorises); then the first vertex at the largest distance (strict >) and
        # the extreme positions, with the comparisons Montage makes.
        for v in range(k):
            dist[v] = abs(A * hx[v] + B * hy[v] + C1)
            along[v] = B * hx[v] - A * hy[v]
        vmax = 0
        dmax = dist[0]
        for v in range(1, k):
            if dist[v] > dmax:
                dmax = dist[v]
                vmax = v
        C2 = -A * hx[vmax] - B * hy[vmax]

        C3 = along[0]
        C4 = C3
        for v in range(1, k):
            c = along[v]
            if c < C3:
                C3 = c
            if c > C4:
                C4 = c

        h = abs(C1 - C2)
        w = abs(C3 - C4)
        area = w * h
        if area > 0.0 and (area < areamin or areamin < 0.0):
            found = True
            areamin = area
            Amin = A
            Bmin = B
            C1min = C1
            C2min = C2
            C3min = C3
            C4min = C4
            width = w
            height = h

    x0 = -Amin * C1min + Bmin * C3min
    y0 = -Bmin * C1min - Amin * C3min
    x1 = -Amin * C2min + Bmin * C3min
    y1 = -Bmin * C2min - Amin * C3min
    x2 = -Amin * C2min + Bmin * C4min
    y2 = -Bmin * C2min - Amin * C4min
    x3 = -Amin * C1min + Bmin * C4min
    y3 = -Bmin * C1min - Amin * C4min
    xcen = (x0 + x1 + x2 + x3) / 4.0
    ycen = (y0 + y1 + y2 + y3) / 4.0
    return found, Amin, Bmin, xcen, ycen, width, height


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
    return _row_extremes(_as_image(image))


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

    hx, hy = _hull(rows, lo, hi, c1, c2)
    found, A, B, xcen, ycen, width, height = _min_area_box(hx, hy)
    if not found:  # unreachable for >= 2 usable rows; Montage would leak stale statics
        return 0.0, 0.0, 0.0, 0.0, 0.0
    theta = math.atan2(A, B) * _DEG_PER_RAD_NUM / math.atan(1.0)
    return float(xcen), float(ycen), float(width), float(height), -1.0 * theta
