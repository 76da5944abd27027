"""Compiled kernels of :mod:`diffit.boundingbox`: row extremes, convex hull, minimum-area box.

:mod:`diffit.boundingbox` describes the algorithm (Montage's ``pixbounds``) and holds the
public functions. This module does the work, with the GIL released (except on inputs too
small to be worth the hand-off), so that worker threads can bound several images at once:

* :func:`row_extremes` finds, for every row, the first and last finite pixel.
* :func:`hull_box` turns those row extremes (two rows or more) into the box: convex hull,
  minimum-area rectangle over its edges, and the box angle in degrees.

Every floating-point operation is the one Montage makes, in the same order. The extension
is compiled without FMA contraction and without fast-math (see ``setup.py``), so the
results are Montage's bit for bit. ``sqrt``, ``atan2`` and ``atan`` come from the C
library, as in Montage (CPython's :func:`math.atan2` calls the same ``atan2``).
"""
from libc.math cimport INFINITY, atan, atan2, fabs, sqrt
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

import numpy as np

#: Smaller images and hulls are bounded without releasing the GIL: releasing and
#: retaking it costs two thread hand-offs whenever another worker thread waits for it,
#: more than the work on inputs this small (see diffit._fitsread.NOGIL_MIN_BYTES).
NOGIL_MIN_PIXELS = 32768
NOGIL_MIN_ROWS = 256

# Compile-time constants (so that the C compiler can unroll and fold with them).
cdef extern from *:
    """
    #define DIFFIT_EXP_MASK UINT64_C(0x7FF0000000000000)
    #define DIFFIT_ALL_ONES UINT64_C(0xFFFFFFFFFFFFFFFF)
    """
    # A double is NaN or +-inf iff all its exponent bits are set.
    const uint64_t _EXP_MASK "DIFFIT_EXP_MASK"
    const uint64_t _ALL_ONES "DIFFIT_ALL_ONES"

cdef enum:
    _BLOCK = 32  # blank pixels are skipped this many at a time

# Montage converts radians to degrees as  angle * 45. / atan(1).
cdef double _DEG_PER_RAD_NUM = 45.0


ctypedef struct Box:
    # Result of the minimum-area rectangle search.
    bint found      # some hull edge gave a positive area
    double A        # unit normal (A, B) of the winning edge
    double B
    double xcen     # centre of the rectangle
    double ycen
    double width    # extent along the winning edge
    double height   # extent across it


# --------------------------------------------------------------------------- row extremes


def row_extremes(const double[:, ::1] image):
    """Rows with >= 2 finite pixels and their first and last finite column.

    Parameters
    ----------
    image : numpy.ndarray
        C-contiguous native float64 2-D array, indexed ``[row j, column i]``. NaN and
        +-inf pixels are blank.

    Returns
    -------
    rows, lo, hi : numpy.ndarray
        int64 arrays of equal length: the row indices in increasing order, and for each
        row the smallest and largest column index of a finite pixel (``lo < hi``).
    """
    cdef Py_ssize_t ny = image.shape[0]
    cdef Py_ssize_t nx = image.shape[1]
    # The pixels' bit patterns, read as integers (a view: no copy).
    cdef const uint64_t[::1] bits = np.asarray(image).reshape(-1).view(np.uint64)
    result = np.empty((3, ny), np.int64)  # rows, lo, hi
    cdef int64_t[:, ::1] out = result
    cdef Py_ssize_t k = 0
    if ny > 0 and nx > 0 and ny * nx >= NOGIL_MIN_PIXELS:
        with nogil:
            k = _row_extremes(&bits[0], ny, nx, &out[0, 0], &out[1, 0], &out[2, 0])
    elif ny > 0 and nx > 0:
        k = _row_extremes(&bits[0], ny, nx, &out[0, 0], &out[1, 0], &out[2, 0])
    return result[0, :k], result[1, :k], result[2, :k]


cdef inline bint _all_blank(const uint64_t *p, Py_ssize_t n) noexcept nogil:
    """Whether all ``n`` doubles whose bits are ``p[0..n)`` are NaN or +-inf.

    The bitwise AND of the block has all exponent bits set only if every one of its
    doubles has.
    """
    cdef uint64_t acc = _ALL_ONES
    cdef Py_ssize_t t
    for t in range(n):
        acc &= p[t]
    return (acc & _EXP_MASK) == _EXP_MASK


cdef inline bint _is_blank(uint64_t bits) noexcept nogil:
    """Whether the double with these bits is NaN or +-inf."""
    return (bits & _EXP_MASK) == _EXP_MASK


cdef Py_ssize_t _row_extremes(const uint64_t *bits, Py_ssize_t ny, Py_ssize_t nx,
                              int64_t *rows, int64_t *lo, int64_t *hi) noexcept nogil:
    """Fill ``rows``/``lo``/``hi`` with the usable rows of an ``ny x nx`` image; return their
    number.

    Each row is scanned inwards from both ends, so pixels between the extremes are never
    read. Blank runs are skipped a block of :data:`_BLOCK` pixels at a time.
    """
    cdef Py_ssize_t k = 0
    cdef Py_ssize_t j, i0, i1
    cdef const uint64_t *row
    for j in range(ny):
        row = bits + j * nx
        i0 = 0
        while i0 + _BLOCK <= nx and _all_blank(row + i0, _BLOCK):
            i0 += _BLOCK
        while i0 < nx and _is_blank(row[i0]):
            i0 += 1
        if i0 >= nx - 1:  # no finite pixel, or only the last one
            continue
        i1 = nx  # exclusive
        while i1 - _BLOCK > i0 and _all_blank(row + i1 - _BLOCK, _BLOCK):
            i1 -= _BLOCK
        i1 -= 1
        while _is_blank(row[i1]):  # stops at i0 at the latest
            i1 -= 1
        if i1 > i0:
            rows[k] = j
            lo[k] = i0
            hi[k] = i1
            k += 1
    return k


# --------------------------------------------------------------------------- hull and box


def hull_box(const int64_t[::1] rows, const int64_t[::1] lo, const int64_t[::1] hi,
             double crpix1, double crpix2):
    """Montage's bounding box from the row extremes of two or more rows.

    Parameters
    ----------
    rows, lo, hi : numpy.ndarray
        C-contiguous int64 arrays of equal length >= 2, as :func:`row_extremes` returns
        them: strictly increasing rows, and for each row its first and last finite column
        (``lo < hi``).
    crpix1, crpix2 : float
        Reference pixel of the image.

    Returns
    -------
    boxx, boxy, boxwidth, boxheight, boxang : float
        Centre, extent along and across the winning hull edge, and the edge's direction in
        degrees, before mFitplane's fix-ups. All ``0.0`` if no edge gave a positive area
        (which two or more rows cannot cause).

    Raises
    ------
    ValueError
        If the arrays differ in length or hold fewer than two rows.
    MemoryError
        If the scratch memory cannot be allocated.
    """
    cdef Py_ssize_t nrow = rows.shape[0]
    if lo.shape[0] != nrow or hi.shape[0] != nrow:
        raise ValueError("rows, lo and hi must have the same length")
    if nrow < 2:
        raise ValueError("hull_box needs at least two rows")
    cdef Box box
    cdef int status
    cdef double angle = 0.0
    if nrow >= NOGIL_MIN_ROWS:
        with nogil:
            status = _hull_box(&rows[0], &lo[0], &hi[0], nrow, crpix1, crpix2, &box)
    else:
        status = _hull_box(&rows[0], &lo[0], &hi[0], nrow, crpix1, crpix2, &box)
    if status == 0 and box.found:
        angle = _box_angle(box.A, box.B)
    if status != 0:
        raise MemoryError("no memory for the convex hull")
    if not box.found:  # unreachable for >= 2 usable rows; Montage would leak stale statics
        return 0.0, 0.0, 0.0, 0.0, 0.0
    return box.xcen, box.ycen, box.width, box.height, angle


cdef double _box_angle(double A, double B) noexcept nogil:
    """Montage's ``boxang`` for the winning edge with unit normal ``(A, B)``: ``-theta``
    with ``theta = atan2(A, B) * 45 / atan(1)`` degrees."""
    cdef double theta = atan2(A, B) * _DEG_PER_RAD_NUM / atan(1.0)
    return -1.0 * theta


cdef int _hull_box(const int64_t *rows, const int64_t *lo, const int64_t *hi,
                   Py_ssize_t nrow, double crpix1, double crpix2, Box *box) noexcept nogil:
    """Convex hull of the row-extreme points, then the minimum-area box over its edges.

    Needs ``nrow >= 2`` (i.e. four points). Returns 0, or -1 if out of memory. The scratch
    memory is one block of five int64 and five double arrays, each of length ``m + 1``
    for the ``m = 2 nrow - 1`` points besides the pivot.
    """
    cdef Py_ssize_t m = 2 * nrow - 1
    cdef Py_ssize_t size = m + 1
    cdef void *block = malloc(size * (5 * sizeof(int64_t) + 5 * sizeof(double)))
    if block == NULL:
        return -1
    cdef int64_t *pi = <int64_t *> block
    cdef int64_t *pj = pi + size
    cdef int64_t *order_a = pj + size
    cdef int64_t *order_b = order_a + size
    cdef int64_t *ints = order_b + size  # run starts, then the kept points, then the stack
    cdef double *key = <double *> (ints + size)
    cdef double *x = key + size
    cdef double *y = x + size
    cdef double *hx = y + size
    cdef double *hy = hx + size
    cdef int64_t *order
    cdef Py_ssize_t nk, n, top

    _lattice_points(rows, lo, hi, nrow, pi, pj)
    _angle_keys(pi, pj, m, hi[0], rows[0], key)
    order = _argsort_keys(key, m, order_a, order_b, ints)
    nk = _farthest_per_ray(order, key, pj, m, ints)
    n = _shifted_points(ints, nk, pi, pj, hi[0], rows[0], crpix1, crpix2, x, y)
    # The kept points are in x, y now: ``ints`` is free for the stack.
    top = _graham_scan(x, y, n, ints, hx, hy)
    _min_area_box(hx, hy, top, box)
    free(block)
    return 0


cdef void _lattice_points(const int64_t *rows, const int64_t *lo, const int64_t *hi,
                          Py_ssize_t nrow, int64_t *pi, int64_t *pj) noexcept nogil:
    """Integer lattice coordinates ``(column, row)`` of all points except the pivot.

    The pivot is ``P0 = (hi[0], rows[0])``, the lowest point, the rightmost one on that
    row. The other ``2 nrow - 1`` points are listed in boundary order (right ends upwards,
    then left ends downwards), which makes the angular sort cheap for convex regions. The
    order of the points does not matter otherwise, as their angular order is strict.
    """
    cdef Py_ssize_t t = 0
    cdef Py_ssize_t k
    for k in range(1, nrow):
        pi[t] = hi[k]
        pj[t] = rows[k]
        t += 1
    for k in range(nrow - 1, -1, -1):
        pi[t] = lo[k]
        pj[t] = rows[k]
        t += 1


cdef void _angle_keys(const int64_t *pi, const int64_t *pj, Py_ssize_t m,
                      int64_t i0, int64_t j0, double *key) noexcept nogil:
    """Angle key of each point about the pivot ``(i0, j0)``.

    ``-dx/dy`` grows with the angle for ``dy > 0``. Equal rationals give equal doubles and
    distinct ones (small denominators) distinct doubles, so ties are exactly the points on
    one ray. The single point with ``dy == 0`` lies at 180 degrees: key ``+inf``.
    """
    cdef Py_ssize_t t
    cdef int64_t dy
    for t in range(m):
        dy = pj[t] - j0
        if dy == 0:
            key[t] = INFINITY
        else:
            key[t] = <double> (-(pi[t] - i0)) / <double> dy


cdef int64_t *_argsort_keys(const double *key, Py_ssize_t n, int64_t *a, int64_t *b,
                            int64_t *starts) noexcept nogil:
    """Ascending argsort of ``key[0..n)``; returns ``a`` or ``b``, whichever holds it.

    A natural merge sort: the ascending runs of ``key`` are merged pairwise until one is
    left. The points come in boundary order, which for convex regions is already (nearly)
    sorted by angle, so there are few runs and the sort is (nearly) linear; it is
    ``O(n log n)`` in any case. Ragged boundaries give many runs, but mostly one-sided
    merges, and the sort still beats numpy's argsort (which would need the GIL). Only for
    keys in random order (a boundary with no shape at all) is it about twice as slow.
    The order among equal keys does not matter (the farthest point of each ray is picked
    afterwards), although the merge happens to be stable. ``a``, ``b`` and ``starts`` are
    scratch arrays of length ``n + 1``.
    """
    cdef Py_ssize_t nruns = 0
    cdef Py_ssize_t t, w, r
    cdef int64_t *swap
    starts[0] = 0
    for t in range(1, n):
        if key[t] < key[t - 1]:
            nruns += 1
            starts[nruns] = t
    nruns += 1
    starts[nruns] = n
    for t in range(n):
        a[t] = t
    while nruns > 1:
        w = 0
        r = 0
        while r < nruns:
            if r + 1 == nruns:  # odd run out: copy through
                for t in range(starts[r], n):
                    b[t] = a[t]
                starts[w] = starts[r]
                w += 1
                break
            _merge_runs(key, a, b, starts[r], starts[r + 1], starts[r + 2])
            starts[w] = starts[r]
            w += 1
            r += 2
        starts[w] = n
        nruns = w
        swap = a
        a = b
        b = swap
    return a


cdef inline void _merge_runs(const double *key, const int64_t *a, int64_t *b,
                             Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2) noexcept nogil:
    """Merge the sorted runs ``a[s0..s1)`` and ``a[s1..s2)`` (by ``key``) into ``b[s0..s2)``."""
    cdef Py_ssize_t i = s0
    cdef Py_ssize_t j = s1
    cdef Py_ssize_t t = s0
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


cdef Py_ssize_t _farthest_per_ray(const int64_t *order, const double *key, const int64_t *pj,
                                  Py_ssize_t m, int64_t *keep) noexcept nogil:
    """Of the points on each ray from the pivot keep only the farthest; return how many.

    ``order`` lists the points by angle; ``keep`` receives the kept ones, in that order.
    The farthest point of a ray is the one with the largest row (``dy == 0`` occurs once).
    """
    cdef Py_ssize_t nk = 0
    cdef Py_ssize_t t = 0
    cdef Py_ssize_t u
    cdef int64_t best
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
    return nk


cdef Py_ssize_t _shifted_points(const int64_t *keep, Py_ssize_t nk, const int64_t *pi,
                                const int64_t *pj, int64_t i0, int64_t j0, double crpix1,
                                double crpix2, double *x, double *y) noexcept nogil:
    """Coordinates of the pivot and the kept points as Montage holds them; return how many.

    ``(x, y) = (column - crpix1, row - crpix2)``, the pivot first.
    """
    cdef Py_ssize_t t
    x[0] = <double> i0 - crpix1
    y[0] = <double> j0 - crpix2
    for t in range(nk):
        x[t + 1] = <double> pi[keep[t]] - crpix1
        y[t + 1] = <double> pj[keep[t]] - crpix2
    return nk + 1


cdef Py_ssize_t _graham_scan(const double *x, const double *y, Py_ssize_t n, int64_t *stack,
                             double *hx, double *hy) noexcept nogil:
    """Graham scan with Montage's strict left-turn test, evaluated in doubles.

    The points ``0..n)`` are the pivot and then the others in angular order. A point is
    pushed only if it lies *strictly* left of the top two stack points; the stack never
    drops below two entries. The hull vertices are written to ``hx``/``hy`` in Montage's
    stack order (last pushed first, the pivot last); their number is returned.
    """
    cdef Py_ssize_t top = 2
    cdef Py_ssize_t i = 2
    cdef Py_ssize_t t
    cdef int64_t a, b, v
    cdef double cross
    stack[0] = 0
    stack[1] = 1
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
    for t in range(top):
        v = stack[top - 1 - t]
        hx[t] = x[v]
        hy[t] = y[v]
    return top


cdef void _min_area_box(const double *hx, const double *hy, Py_ssize_t k,
                        Box *box) noexcept nogil:
    """Montage's minimum-area rectangle over the hull (``k`` vertices in stack order).

    The hull edges are walked from vertex 0 on (clockwise), the last edge closing the
    polygon. For each edge, the normalised line ``A x + B y + C1 = 0`` gives the extent
    across the edge (up to the first vertex at the largest distance: two vertices can tie,
    and their ``C2`` differ in the last bit) and the extent along it. The first edge with
    the smallest positive area wins (strict ``<``).
    """
    cdef double areamin = -1.0
    cdef double Amin = 0.0, Bmin = 0.0
    cdef double C1min = 0.0, C2min = 0.0, C3min = 0.0, C4min = 0.0
    cdef double cx, cy, nxx, nyy, A, B, C1, C2, C3, C4, norm, d, dmax, c, h, w, area
    cdef double x0, y0, x1, y1, x2, y2, x3, y3
    cdef Py_ssize_t e, f, v, vmax
    box.found = False
    box.width = 0.0
    box.height = 0.0
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
        norm = sqrt(A * A + B * B)
        A = A / norm
        B = B / norm
        C1 = C1 / norm

        # One pass over the vertices: the first one at the largest distance across the
        # edge (strict >), and the extreme positions along it, with the comparisons
        # Montage makes. (The conditional expressions compile to branch-free code.)
        dmax = fabs(A * hx[0] + B * hy[0] + C1)
        vmax = 0
        C3 = B * hx[0] - A * hy[0]
        C4 = C3
        for v in range(1, k):
            d = fabs(A * hx[v] + B * hy[v] + C1)
            c = B * hx[v] - A * hy[v]
            vmax = v if d > dmax else vmax
            dmax = d if d > dmax else dmax
            C3 = c if c < C3 else C3
            C4 = c if c > C4 else C4
        C2 = -A * hx[vmax] - B * hy[vmax]

        h = fabs(C1 - C2)
        w = fabs(C3 - C4)
        area = w * h
        if area > 0.0 and (area < areamin or areamin < 0.0):
            box.found = True
            areamin = area
            Amin = A
            Bmin = B
            C1min = C1
            C2min = C2
            C3min = C3
            C4min = C4
            box.width = w
            box.height = h

    # The rectangle's corners, and their mean as the centre.
    x0 = -Amin * C1min + Bmin * C3min
    y0 = -Bmin * C1min - Amin * C3min
    x1 = -Amin * C2min + Bmin * C3min
    y1 = -Bmin * C2min - Amin * C3min
    x2 = -Amin * C2min + Bmin * C4min
    y2 = -Bmin * C2min - Amin * C4min
    x3 = -Amin * C1min + Bmin * C4min
    y3 = -Bmin * C1min - Amin * C4min
    box.A = Amin
    box.B = Bmin
    box.xcen = (x0 + x1 + x2 + x3) / 4.0
    box.ycen = (y0 + y1 + y2 + y3) / 4.0
