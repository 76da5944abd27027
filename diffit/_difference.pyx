# cython: cdivision=True
# (Also set by setup.py; here because the kernels rely on it: C division, where 0/0 is
# a NaN as in Montage, not Python's ZeroDivisionError.)
"""Compiled kernels of :mod:`diffit.difference` (mDiff's arithmetic, bit for bit).

The flux and area windows are read in place through strided, read-only memoryviews:
float32 or float64 (both fluxes of one type, both areas of one type, the two types
independent), any strides, no copy. Every value is widened to double before any
arithmetic, exactly as numpy widens it, and the operations are Montage's, in Montage's
order; the build forbids the C compiler to contract ``a*b + c`` into fused
multiply-adds or to reassociate, so the doubles are Montage's.

The kernels run without the GIL (worker threads difference pairs concurrently), except on
windows too small to be worth the hand-off (:data:`NOGIL_MIN_PIXELS`); every array they
return is allocated before the GIL is released.
"""
from libc.float cimport DBL_MIN
from libc.math cimport NAN, fabs, isfinite
from libc.stdint cimport int32_t, int64_t

import numpy as np

ctypedef fused flux_t:
    float
    double

ctypedef fused area_t:
    float
    double

#: Windows of fewer pixels are differenced without releasing the GIL: releasing and
#: retaking it costs two thread hand-offs whenever another worker thread waits for it,
#: more than the work on a window this small (see diffit._fitsread.NOGIL_MIN_BYTES).
NOGIL_MIN_PIXELS = 8192


cdef inline bint _finite(double x) noexcept nogil:
    """``isfinite`` as a 0/1 flag (the C macro promises only a nonzero int)."""
    return isfinite(x) != 0


cdef double _reference_area(const flux_t[:, :] flux1, const area_t[:, :] area1,
                            const flux_t[:, :] flux2, const area_t[:, :] area2) noexcept nogil:
    """Montage's reference area: mean valid area of image 1 plus that of image 2.

    A pixel is valid in image 1 when its flux is finite and its area not ``<= 0`` (a
    NaN area is valid, as in Montage); the mean of image 2 is over the pixels valid in
    both. The sums run in scan order, as Montage's. Invalid pixels add exact zeros,
    which leaves a sum unchanged (it starts at +0, so it never becomes -0): the
    branch-free sums equal Montage's. No valid pixel gives 0/0, a NaN, as in C.
    """
    cdef Py_ssize_t ny = flux1.shape[0]
    cdef Py_ssize_t nx = flux1.shape[1]
    cdef Py_ssize_t j, i
    cdef double sum1 = 0.0
    cdef double count1 = 0.0
    cdef double sum2 = 0.0
    cdef double count2 = 0.0
    cdef double f1, f2, w1, w2
    cdef bint valid1, valid2
    for j in range(ny):
        for i in range(nx):
            f1 = <double>flux1[j, i]
            f2 = <double>flux2[j, i]
            w1 = <double>area1[j, i]
            w2 = <double>area2[j, i]
            valid1 = _finite(f1) & (not w1 <= 0.0)
            valid2 = valid1 & _finite(f2) & (not w2 <= 0.0)
            sum1 += w1 if valid1 else 0.0
            count1 += 1.0 if valid1 else 0.0
            sum2 += w2 if valid2 else 0.0
            count2 += 1.0 if valid2 else 0.0
    return sum1 / count1 + sum2 / count2


cdef inline void _pixel(double f1, double w1, double f2, double w2, double reference,
                        double tolerance, double *value, double *kept_area) noexcept nogil:
    """mDiff on one pixel: its value ``2*D/A``, and its area ``A`` if it is kept, else 0.

    ``D = f1*w1 - f2*w2`` and ``A = w1 + w2``. A pixel is kept when it is valid in
    both images (finite flux, area not ``<= 0``), ``A`` is finite and nonzero, passes
    the coverage rule ``not |A - reference|/reference > tolerance`` (a NaN reference
    keeps every pixel, as in Montage) and ``A > 0``; so a pixel is kept exactly when
    its stored area is ``> 0``. Branch-free, so that the row loops vectorise: the value
    is formed for every pixel, kept or not.
    """
    cdef double a = w1 + w2
    cdef bint keep = _finite(f1) & (not w1 <= 0.0) & _finite(f2) & (not w2 <= 0.0)
    keep &= _finite(a) & (a != 0.0)
    keep &= not fabs(a - reference) / reference > tolerance
    keep &= a > 0.0
    value[0] = 2.0 * (f1 * w1 - f2 * w2) / a
    kept_area[0] = a if keep else 0.0


cdef void _row_differences(const flux_t[:, :] flux1, const area_t[:, :] area1,
                           const flux_t[:, :] flux2, const area_t[:, :] area2,
                           Py_ssize_t j, double reference, double tolerance,
                           double[::1] row_values, double[::1] row_areas) noexcept nogil:
    """:func:`_pixel` on every pixel of window row ``j``, whatever the strides."""
    cdef Py_ssize_t i
    for i in range(flux1.shape[1]):
        _pixel(<double>flux1[j, i], <double>area1[j, i], <double>flux2[j, i],
               <double>area2[j, i], reference, tolerance, &row_values[i], &row_areas[i])


cdef void _unit_row_differences(const flux_t *flux1, const area_t *area1,
                                const flux_t *flux2, const area_t *area2, Py_ssize_t nx,
                                double reference, double tolerance, double *row_values,
                                double *row_areas) noexcept nogil:
    """:func:`_pixel` on the ``nx`` pixels of one row whose four windows are each
    contiguous along the row (column slices of images are): the loop the compiler
    vectorises. Two output rows, not three (a keep flag), keep the checks that the
    outputs do not overlap the windows few enough for it to do so."""
    cdef Py_ssize_t i
    for i in range(nx):
        _pixel(<double>flux1[i], <double>area1[i], <double>flux2[i], <double>area2[i],
               reference, tolerance, &row_values[i], &row_areas[i])


cdef Py_ssize_t _append_kept(const double[::1] row_values, const double[::1] row_areas,
                             int32_t[::1] cols, double[::1] values, double[::1] areas,
                             Py_ssize_t n, Py_ssize_t *n_finite) noexcept nogil:
    """Append the kept pixels of one row at ``cols[n:]``, ``values[n:]``, ``areas[n:]``.

    A pixel is kept when its area (as :func:`_pixel` stores it) is ``> 0``.
    Branch-free: every pixel is written at position ``n``, which then advances by one
    if it is kept, so a dropped pixel is overwritten by the next one (the arrays need
    room for one pixel more than are kept so far). Adds the number of kept finite
    values to ``n_finite`` and returns the new ``n``.
    """
    cdef Py_ssize_t nx = row_values.shape[0]
    cdef Py_ssize_t i
    cdef Py_ssize_t finite = 0
    cdef Py_ssize_t keep
    cdef double z
    for i in range(nx):
        z = row_values[i]
        keep = row_areas[i] > 0.0
        cols[n] = <int32_t>i
        values[n] = z
        areas[n] = row_areas[i]
        finite += keep & _finite(z)
        n += keep
    n_finite[0] += finite
    return n


cdef int _check_windows(Py_ssize_t ny, Py_ssize_t nx, Py_ssize_t other_ny,
                        Py_ssize_t other_nx) except -1:
    """Raise ValueError unless a window has the shape ``(ny, nx)``."""
    if other_ny != ny or other_nx != nx:
        raise ValueError(f"windows differ in shape: {(ny, nx)} vs {(other_ny, other_nx)}")
    return 0


def difference_kernel(const flux_t[:, :] flux1, const area_t[:, :] area1,
                      const flux_t[:, :] flux2, const area_t[:, :] area2,
                      bint use_areas, double tolerance,
                      int32_t[::1] cols, double[::1] values, double[::1] areas):
    """mDiff's difference, keeping only the surviving pixels (compacted in scan order).

    After the reference area, each row is done in two loops: the first (branch-free, so
    it vectorises) forms every pixel's value and, if it is kept, area
    (:func:`_pixel`); the second appends the kept pixels to ``cols``, ``values`` and
    ``areas``. When the four windows are all contiguous along their rows (column
    slices of images are), the first loop reads them through plain pointers, which the
    compiler vectorises.

    Parameters
    ----------
    flux1, area1, flux2, area2 : memoryview of float32 or float64
        The four windows (2-D, one shape, any strides, aligned, read-only is fine); both
        fluxes of one type and both areas of one type. Without areas, pass any two
        windows as ``area1``, ``area2`` (e.g. the fluxes): they are not read.
    use_areas : bool
        Weigh by the areas; else every pixel has area 1 (Montage's ``noAreas``).
    tolerance : float
        Coverage rule: drop pixels whose area strays more than this fraction from the
        reference area.
    cols, values, areas : memoryview
        int32, float64, float64 outputs with at least as many elements as the window
        has pixels: the window column, value ``2*D/A`` and area ``A`` of each kept
        pixel, in scan order.

    Returns
    -------
    row_starts : numpy.ndarray
        int64, ``ny + 1`` entries: the kept pixels of row ``j`` are
        ``row_starts[j]:row_starts[j + 1]``.
    imin, imax, jmin, jmax : int
        Extent of the kept pixels (``nx, -1, ny, -1`` when none is kept).
    n_kept, n_finite : int
        Number of kept pixels and of those whose value is finite.
    """
    cdef Py_ssize_t ny = flux1.shape[0]
    cdef Py_ssize_t nx = flux1.shape[1]
    _check_windows(ny, nx, flux2.shape[0], flux2.shape[1])
    if use_areas:
        _check_windows(ny, nx, area1.shape[0], area1.shape[1])
        _check_windows(ny, nx, area2.shape[0], area2.shape[1])
    else:  # unit areas: one row of ones, repeated (row stride 0), multiplies exactly
        ones = np.ones(nx, dtype=np.float32 if area_t is float else np.float64)
        area1 = area2 = np.ndarray((ny, nx), ones.dtype, ones, 0, (0, ones.itemsize))
    if min(cols.shape[0], values.shape[0], areas.shape[0]) < ny * nx:
        raise ValueError("output arrays are smaller than the window")
    cdef bint unit = (flux1.strides[1] == sizeof(flux_t) and flux2.strides[1] == sizeof(flux_t)
                      and area1.strides[1] == sizeof(area_t)
                      and area2.strides[1] == sizeof(area_t))
    row_starts_array = np.empty(ny + 1, dtype=np.int64)
    cdef int64_t[::1] row_starts = row_starts_array
    cdef double[::1] row_values = np.empty(nx)
    cdef double[::1] row_areas = np.empty(nx)
    cdef Py_ssize_t extent[4]
    cdef Py_ssize_t n, n_finite = 0
    if ny * nx >= NOGIL_MIN_PIXELS:
        with nogil:
            n = _difference_rows(flux1, area1, flux2, area2, unit, tolerance, cols, values,
                                 areas, row_starts, row_values, row_areas, extent, &n_finite)
    else:
        n = _difference_rows(flux1, area1, flux2, area2, unit, tolerance, cols, values, areas,
                             row_starts, row_values, row_areas, extent, &n_finite)
    return row_starts_array, extent[0], extent[1], extent[2], extent[3], n, n_finite


cdef Py_ssize_t _difference_rows(const flux_t[:, :] flux1, const area_t[:, :] area1,
                                 const flux_t[:, :] flux2, const area_t[:, :] area2,
                                 bint unit, double tolerance, int32_t[::1] cols,
                                 double[::1] values, double[::1] areas,
                                 int64_t[::1] row_starts, double[::1] row_values,
                                 double[::1] row_areas, Py_ssize_t *extent,
                                 Py_ssize_t *n_finite) noexcept nogil:
    """The body of :func:`difference_kernel`: returns the number of kept pixels and sets
    ``extent`` to ``imin, imax, jmin, jmax`` and ``n_finite``."""
    cdef Py_ssize_t ny = flux1.shape[0]
    cdef Py_ssize_t nx = flux1.shape[1]
    cdef Py_ssize_t imin = nx, imax = -1, jmin = ny, jmax = -1
    cdef Py_ssize_t n = 0, start, j
    cdef double reference = _reference_area(flux1, area1, flux2, area2)
    for j in range(ny):
        row_starts[j] = n
        if unit and nx > 0:
            _unit_row_differences(&flux1[j, 0], &area1[j, 0], &flux2[j, 0], &area2[j, 0],
                                  nx, reference, tolerance, &row_values[0], &row_areas[0])
        else:
            _row_differences(flux1, area1, flux2, area2, j, reference, tolerance,
                             row_values, row_areas)
        start = n
        n = _append_kept(row_values, row_areas, cols, values, areas, n, n_finite)
        if n > start:
            if j < jmin:
                jmin = j
            jmax = j
            imin = min(imin, <Py_ssize_t>cols[start])
            imax = max(imax, <Py_ssize_t>cols[n - 1])
    row_starts[ny] = n
    extent[0] = imin
    extent[1] = imax
    extent[2] = jmin
    extent[3] = jmax
    return n


cdef inline double _scaled_read_back(double z, double scale, double zero) noexcept nogil:
    """A value as mFitplane reads it back from a difference file with BSCALE/BZERO
    (mDiff copies them from the template): CFITSIO stores ``(z - zero) / scale`` and
    reads ``stored * scale + zero``, or ``zero`` when the stored value is a zero or
    subnormal, or NaN when it is not finite."""
    cdef double stored = (z - zero) / scale
    if not isfinite(stored):
        return NAN
    if fabs(stored) < DBL_MIN:
        return zero
    stored = stored * scale
    return stored + zero


cdef inline double _read_back(double z) noexcept nogil:
    """A finite difference value as mFitplane reads it back from mDiff's file: CFITSIO
    turns a zero of either sign and a subnormal value (exponent bits all zero) into +0.0."""
    return 0.0 if fabs(z) < DBL_MIN else z


cdef Py_ssize_t _fill_coordinates(const int32_t[::1] cols, const double[::1] values,
                                  const int64_t[::1] row_starts, Py_ssize_t imin,
                                  Py_ssize_t jmin, Py_ssize_t jmax, double crpix1,
                                  double crpix2, bint all_finite, bint scaled, double scale,
                                  double zero, double[::1] xs, double[::1] ys, double[::1] zs,
                                  int64_t[::1] rows, int64_t[::1] lo, int64_t[::1] hi,
                                  Py_ssize_t *n_pixels) noexcept nogil:
    """The loop of :func:`coordinates`; returns the number of rows it fills in and sets
    ``n_pixels`` to the number of pixels."""
    cdef Py_ssize_t p = 0
    cdef Py_ssize_t r = 0
    cdef Py_ssize_t j, k, row, start, end, first, last, i
    cdef double y, z
    for j in range(jmin, jmax + 1):
        row = j - jmin
        y = row - crpix2
        start = row_starts[j]
        end = row_starts[j + 1]
        first = -1
        last = -1
        if all_finite and not scaled:  # no pixel is kept above row jmin: k is the output index
            for k in range(start, end):
                xs[k] = (cols[k] - imin) - crpix1
                ys[k] = y
                zs[k] = _read_back(values[k])
            if end > start:
                first = cols[start] - imin
                last = cols[end - 1] - imin
            p = end
        else:
            for k in range(start, end):
                z = values[k]
                if scaled and isfinite(z):
                    z = _scaled_read_back(z, scale, zero)
                if isfinite(z):
                    i = cols[k] - imin
                    xs[p] = i - crpix1
                    ys[p] = y
                    zs[p] = z if scaled else _read_back(z)
                    p += 1
                    if first < 0:
                        first = i
                    last = i
        if last > first:
            rows[r] = row
            lo[r] = first
            hi[r] = last
            r += 1
    n_pixels[0] = p
    return r


def coordinates(const int32_t[::1] cols, const double[::1] values,
                const int64_t[::1] row_starts, Py_ssize_t imin, Py_ssize_t jmin,
                Py_ssize_t jmax, double crpix1, double crpix2, bint all_finite,
                double[::1] xs, double[::1] ys, double[::1] zs, double scale=1.0,
                double zero=0.0):
    """Fit inputs of the finite kept pixels, relative to the trimmed image.

    Fills ``xs``, ``ys``, ``zs`` with ``x = i - crpix1``, ``y = j - crpix2`` (the
    integer column ``i`` and row ``j`` of the trimmed image, as mFitplane computes them)
    and the values of the finite kept pixels, in scan order, as mFitplane reads them
    back from the difference file (zeros and subnormal values as +0.0; with a ``scale``
    or ``zero``, the BSCALE/BZERO the file carries, through CFITSIO's scaling, which may
    leave fewer finite pixels). ``all_finite`` (every kept value is finite) lets the
    loop skip the finiteness test.

    Parameters
    ----------
    cols, values, row_starts : memoryview
        The kept pixels (:class:`diffit.difference.KeptPixels`).
    imin, jmin, jmax : int
        The trim box.
    crpix1, crpix2 : float
        Reference pixel of the trimmed image.
    all_finite : bool
        Every kept value is finite.
    xs, ys, zs : memoryview
        float64 outputs with room for every finite kept pixel.
    scale, zero : float, optional
        BSCALE and BZERO of the difference file.

    Returns
    -------
    rows, lo, hi : numpy.ndarray
        int64: the first ``count`` entries are the rows with at least two finite pixels
        and their first and last finite column.
    count : int
    n_pixels : int
        Number of pixels written to ``xs``, ``ys``, ``zs``.
    """
    if row_starts.shape[0] < jmax + 2 or jmin < 0:
        raise ValueError("row_starts does not cover the trim box")
    nrow = max(jmax - jmin + 1, 0)
    rows_array = np.empty(nrow, dtype=np.int64)
    lo_array = np.empty(nrow, dtype=np.int64)
    hi_array = np.empty(nrow, dtype=np.int64)
    cdef int64_t[::1] rows = rows_array
    cdef int64_t[::1] lo = lo_array
    cdef int64_t[::1] hi = hi_array
    cdef Py_ssize_t count
    cdef Py_ssize_t n_pixels = 0
    cdef bint scaled = scale != 1.0 or zero != 0.0
    cdef Py_ssize_t kept = row_starts[jmax + 1] - row_starts[jmin] if jmax >= jmin else 0
    if kept >= 3 * NOGIL_MIN_PIXELS:  # about a third of the difference's work per pixel
        with nogil:
            count = _fill_coordinates(cols, values, row_starts, imin, jmin, jmax, crpix1,
                                      crpix2, all_finite, scaled, scale, zero, xs, ys, zs,
                                      rows, lo, hi, &n_pixels)
    else:
        count = _fill_coordinates(cols, values, row_starts, imin, jmin, jmax, crpix1, crpix2,
                                  all_finite, scaled, scale, zero, xs, ys, zs, rows, lo, hi,
                                  &n_pixels)
    return rows_array, lo_array, hi_array, count, n_pixels


cdef void _scatter(const int32_t[::1] cols, const double[::1] values,
                   const double[::1] areas, const int64_t[::1] row_starts,
                   Py_ssize_t imin, Py_ssize_t jmin, double[:, ::1] data,
                   double[:, ::1] area) noexcept nogil:
    """Write each kept pixel's value and area at its place in the trimmed images."""
    cdef Py_ssize_t j, k, i
    for j in range(data.shape[0]):
        for k in range(row_starts[jmin + j], row_starts[jmin + j + 1]):
            i = cols[k] - imin
            data[j, i] = values[k]
            area[j, i] = areas[k]


def images(const int32_t[::1] cols, const double[::1] values, const double[::1] areas,
           const int64_t[::1] row_starts, Py_ssize_t imin, Py_ssize_t imax,
           Py_ssize_t jmin, Py_ssize_t jmax):
    """Trimmed difference (NaN where not kept) and area (0 where not kept) images.

    Parameters
    ----------
    cols, values, areas, row_starts : memoryview
        The kept pixels (:class:`diffit.difference.KeptPixels`).
    imin, imax, jmin, jmax : int
        The trim box (inclusive).

    Returns
    -------
    data, area : numpy.ndarray
        float64, ``(jmax - jmin + 1, imax - imin + 1)``.
    """
    if row_starts.shape[0] < jmax + 2 or jmin < 0:
        raise ValueError("row_starts does not cover the trim box")
    shape = (jmax - jmin + 1, imax - imin + 1)
    data_array = np.full(shape, np.nan)
    area_array = np.zeros(shape)
    cdef double[:, ::1] data = data_array
    cdef double[:, ::1] area = area_array
    with nogil:
        _scatter(cols, values, areas, row_starts, imin, jmin, data, area)
    return data_array, area_array
