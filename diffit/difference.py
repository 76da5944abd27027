"""Area-weighted difference of two overlap windows, as Montage's mDiff forms it.

Pure computation: takes the flux (and optionally area) windows of the two images over
their overlap and returns the pixels that survive. The arithmetic follows mDiff step by
step so that the result is bit-identical:

* a pixel is valid in image ``k`` when its flux is finite and its area is not ``<= 0``
  (a NaN area counts as valid, as in Montage);
* ``D = f1*a1 - f2*a2`` and ``A = a1 + a2`` where both are valid;
* pixels whose total area strays more than 33.3 % from the sum of the two mean areas
  are dropped (Montage's coverage rule);
* kept pixels become ``2*D/A`` (``f1 - f2`` for equal areas), the rest NaN;
* the result is trimmed to the bounding box of the kept pixels.

:func:`difference_pixels` does this in one compiled kernel and keeps only the surviving
pixels (:class:`KeptPixels`), in scan order. From those, :meth:`KeptPixels.coordinates`
builds what the plane fit needs (compact coordinates and values of the finite pixels and
the per-row extremes, relative to the trimmed image) and :meth:`KeptPixels.images` the
trimmed difference and area images (Montage's mDiff output, only needed for keepAll).
:func:`difference` is the image-returning form.

Windows may be float32 or float64 arrays of any strides (e.g. column slices of a larger
image); each value is widened to float64 exactly as numpy would, without a copy. Other
dtypes are converted to float64 first.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from numba import types

COVERAGE_TOLERANCE = 0.333

_KERNEL_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))


@dataclass(frozen=True)
class Difference:
    """A trimmed difference image and its area image.

    Attributes
    ----------
    data : numpy.ndarray
        ``2*(f1*a1 - f2*a2)/(a1 + a2)`` on kept pixels, NaN elsewhere.
    area : numpy.ndarray
        ``a1 + a2`` on kept pixels, 0 elsewhere.
    imin, jmin : int
        Position of ``data[0, 0]`` inside the input windows (0-based column, row).
    """

    data: np.ndarray
    area: np.ndarray
    imin: int
    jmin: int


class Workspace:
    """Scratch arrays reused from one pair to the next (one per thread, never shared).

    Fresh arrays of a few hundred kB cost page faults on every pair, as the allocator
    hands the memory back to the system in between. With a workspace,
    :func:`difference_pixels` and :meth:`KeptPixels.coordinates` write into arrays kept
    here instead; what they return is then valid only until the workspace is used again
    for the same purpose. Windows larger than ``max_pixels`` get fresh arrays, so a
    single huge pair does not pin its memory.

    Parameters
    ----------
    max_pixels : int, optional
        Largest window (in pixels) whose arrays are kept for reuse.
    """

    def __init__(self, max_pixels: int = 1 << 20) -> None:
        self.max_pixels = max_pixels
        self._kept = (np.empty(0, np.int32), np.empty(0), np.empty(0))
        self._coordinates = (np.empty(0), np.empty(0), np.empty(0))

    def kept_arrays(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int32 columns, float64 values and areas of at least ``size`` elements."""
        if size > self.max_pixels:
            return _kept_arrays(size)
        if self._kept[0].shape[0] < size:
            self._kept = _kept_arrays(_grown(size, self.max_pixels))
        return self._kept

    def coordinate_arrays(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Three float64 arrays (xs, ys, zs) of at least ``size`` elements."""
        if size > self.max_pixels:
            return _coordinate_arrays(size)
        if self._coordinates[0].shape[0] < size:
            self._coordinates = _coordinate_arrays(_grown(size, self.max_pixels))
        return self._coordinates


def _grown(size: int, limit: int) -> int:
    return min(max(size, 2 * size - size // 2), limit)  # 1.5x headroom, within the limit


def _kept_arrays(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(size, np.int32), np.empty(size), np.empty(size)


def _coordinate_arrays(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(size), np.empty(size), np.empty(size)


@dataclass(frozen=True)
class KeptPixels:
    """The pixels of a difference that survive, in scan order, with their trim box.

    Attributes
    ----------
    cols : numpy.ndarray
        int32 window column of each kept pixel.
    values : numpy.ndarray
        ``2*D/A`` of each kept pixel (non-finite only if the arithmetic overflowed).
    areas : numpy.ndarray
        ``A`` of each kept pixel.
    row_starts : numpy.ndarray
        int64, one more than the window has rows: the kept pixels of window row ``j``
        are ``row_starts[j]:row_starts[j + 1]``.
    imin, imax, jmin, jmax : int
        Trim box within the window (inclusive): the extent of the kept pixels.
    n_finite : int
        Number of kept pixels whose value is finite (the pixels the fit uses).
    workspace : Workspace or None
        Where :meth:`coordinates` puts its arrays (fresh arrays when ``None``).
    """

    cols: np.ndarray
    values: np.ndarray
    areas: np.ndarray
    row_starts: np.ndarray
    imin: int
    imax: int
    jmin: int
    jmax: int
    n_finite: int
    workspace: Workspace | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the trimmed image."""
        return self.jmax - self.jmin + 1, self.imax - self.imin + 1

    def coordinates(
        self, crpix1: float, crpix2: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the plane fit needs, relative to the trimmed image.

        Parameters
        ----------
        crpix1, crpix2 : float
            Reference pixel of the trimmed image.

        Returns
        -------
        xs, ys, zs : numpy.ndarray
            float64 coordinates ``x = i - crpix1``, ``y = j - crpix2`` (0-based column
            ``i`` and row ``j`` of the trimmed image) and values of the finite pixels in
            scan order, as :func:`diffit.fitplane.fit_plane` gathers them from the image.
        rows, lo, hi : numpy.ndarray
            As :func:`diffit.boundingbox.row_extremes` returns them for the trimmed image.
        """
        n = self.n_finite
        if self.workspace is None:
            xs, ys, zs = _coordinate_arrays(n)
        else:
            xs, ys, zs = self.workspace.coordinate_arrays(n)
        all_finite = n == self.values.shape[0]
        if all_finite:
            zs = self.values  # already the values of the finite pixels, in scan order
        rows, lo, hi, nrow = _coordinates(self.cols, self.values, self.row_starts, self.imin,
                                          self.jmin, self.jmax, float(crpix1), float(crpix2),
                                          all_finite, xs, ys, zs)
        return xs[:n], ys[:n], zs[:n], rows[:nrow], lo[:nrow], hi[:nrow]

    def images(self) -> Difference:
        """The trimmed difference and area images, exactly as mDiff writes them."""
        data, area = _images(self.cols, self.values, self.areas, self.row_starts,
                             self.imin, self.imax, self.jmin, self.jmax)
        return Difference(data=data, area=area, imin=self.imin, jmin=self.jmin)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _reference_area(flux1, area1, flux2, area2, use_areas):  # pragma: no cover - jitted
    """Montage's reference area: mean valid area of image 1 plus that of image 2.

    A pixel is valid in image 1 when its flux is finite and its area not ``<= 0``; the
    mean of image 2 is over the pixels valid in both. The sums run in scan order, as
    Montage's. Invalid pixels add exact zeros, which leaves a sum unchanged (it starts
    at +0, so it never becomes -0): the branch-free sums equal Montage's.
    """
    ny, nx = flux1.shape
    sum1 = 0.0
    count1 = 0.0
    sum2 = 0.0
    count2 = 0.0
    for j in range(ny):
        for i in range(nx):
            f1 = np.float64(flux1[j, i])
            f2 = np.float64(flux2[j, i])
            w1 = np.float64(area1[j, i]) if use_areas else 1.0
            w2 = np.float64(area2[j, i]) if use_areas else 1.0
            valid1 = np.isfinite(f1) & (not w1 <= 0.0)
            valid2 = valid1 & np.isfinite(f2) & (not w2 <= 0.0)
            sum1 += w1 if valid1 else 0.0
            count1 += 1.0 if valid1 else 0.0
            sum2 += w2 if valid2 else 0.0
            count2 += 1.0 if valid2 else 0.0
    return sum1 / count1 + sum2 / count2


def _difference_kernel(flux1, area1, flux2, area2, use_areas, tolerance,
                       cols, values, areas):  # pragma: no cover - jitted
    """mDiff's difference, keeping only the surviving pixels (compacted in scan order).

    After the reference area, each row is done in two loops: the first (branch-free, so
    it vectorises) forms ``D = f1*w1 - f2*w2``, ``A = w1 + w2``, the value ``2*D/A`` and
    whether the pixel is kept; the second appends the kept pixels to ``cols``,
    ``values`` and ``areas`` (each at least as long as the window has pixels). Every
    input value is widened to float64 before any arithmetic.

    Returns ``(row_starts, imin, imax, jmin, jmax, n_kept, n_finite)``; ``n_kept`` is 0
    when nothing survives. Compiled by :func:`_compiled_kernel`.
    """
    ny, nx = flux1.shape
    reference = _reference_area(flux1, area1, flux2, area2, use_areas)
    row_values = np.empty(nx)
    row_areas = np.empty(nx)
    row_keep = np.empty(nx, dtype=np.uint64)
    row_starts = np.empty(ny + 1, dtype=np.int64)
    n = np.uint64(0)
    n_finite = 0
    imin, imax, jmin, jmax = nx, -1, ny, -1
    for j in range(ny):
        row_starts[j] = n
        for i in range(nx):
            f1 = np.float64(flux1[j, i])
            f2 = np.float64(flux2[j, i])
            w1 = np.float64(area1[j, i]) if use_areas else 1.0
            w2 = np.float64(area2[j, i]) if use_areas else 1.0
            a = w1 + w2
            keep = np.isfinite(f1) & (not w1 <= 0.0) & np.isfinite(f2) & (not w2 <= 0.0)
            keep &= np.isfinite(a) & (a != 0.0)
            keep &= not abs(a - reference) / reference > tolerance
            keep &= a > 0.0
            row_values[i] = 2.0 * (f1 * w1 - f2 * w2) / a
            row_areas[i] = a
            row_keep[i] = keep
        start = n
        for i in range(np.uint64(nx)):
            z = row_values[i]
            cols[n] = i
            values[n] = z
            areas[n] = row_areas[i]
            n_finite += np.int64(row_keep[i] & np.isfinite(z))
            n += row_keep[i]
        if n > start:
            if j < jmin:
                jmin = j
            jmax = j
            first = np.int64(cols[start])
            last = np.int64(cols[n - np.uint64(1)])
            if first < imin:
                imin = first
            if last > imax:
                imax = last
    row_starts[ny] = n
    return row_starts, imin, imax, jmin, jmax, np.int64(n), n_finite


@functools.lru_cache(maxsize=None)
def _compiled_kernel(flux: np.dtype, area: np.dtype, contiguous: bool) -> Callable:
    """The difference kernel for float32/float64 fluxes and areas, compiled on first use.

    Each combination is compiled once (and kept in numba's cache). Writable C-contiguous
    windows get a version for that layout; any others (strided, Fortran-ordered or
    read-only) the general one. Fixing the signature keeps numba from compiling one
    version per combination of layouts and flags of the four windows.
    """
    layout, readonly = ("C", False) if contiguous else ("A", True)
    f = types.Array(numba.from_dtype(flux), 2, layout, readonly=readonly)
    a = types.Array(numba.from_dtype(area), 2, layout, readonly=readonly)
    signature = (f, a, f, a, types.boolean, types.float64,
                 types.int32[::1], types.float64[::1], types.float64[::1])
    return numba.njit([signature], cache=True, nogil=True, error_model="numpy")(
        _difference_kernel)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _coordinates(cols, values, row_starts, imin, jmin, jmax, crpix1, crpix2,
                 all_finite, xs, ys, zs):  # pragma: no cover - jitted
    """Fit inputs of the finite kept pixels, relative to the trimmed image.

    Fills ``xs``, ``ys``, ``zs`` with ``x = i - crpix1``, ``y = j - crpix2`` (the
    integer column ``i`` and row ``j`` of the trimmed image, as mFitplane computes them)
    and the values, and returns ``(rows, lo, hi, count)``: the first ``count`` entries
    are the rows with at least two finite pixels and their first and last finite column.
    When ``all_finite`` (every kept value is finite) ``zs`` is ``values`` itself and is
    left alone.
    """
    nrow = jmax - jmin + 1
    rows = np.empty(nrow, dtype=np.int64)
    lo = np.empty(nrow, dtype=np.int64)
    hi = np.empty(nrow, dtype=np.int64)
    p = 0
    r = 0
    for j in range(jmin, jmax + 1):
        row = j - jmin
        y = row - crpix2
        start = row_starts[j]
        end = row_starts[j + 1]
        first = -1
        last = -1
        if all_finite:  # no pixel is kept above row jmin: k is also the output index
            for k in range(start, end):
                xs[k] = (cols[k] - imin) - crpix1
                ys[k] = y
            if end > start:
                first = cols[start] - imin
                last = cols[end - 1] - imin
        else:
            for k in range(start, end):
                z = values[k]
                if np.isfinite(z):
                    i = cols[k] - imin
                    xs[p] = i - crpix1
                    ys[p] = y
                    zs[p] = z
                    p += 1
                    if first < 0:
                        first = i
                    last = i
        if last > first:
            rows[r] = row
            lo[r] = first
            hi[r] = last
            r += 1
    return rows, lo, hi, r


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _images(cols, values, areas, row_starts, imin, imax, jmin, jmax):  # pragma: no cover - jitted
    """Trimmed difference (NaN where not kept) and area (0 where not kept) images."""
    ny = jmax - jmin + 1
    nx = imax - imin + 1
    data = np.empty((ny, nx))
    area = np.empty((ny, nx))
    for j in range(ny):
        for i in range(nx):
            data[j, i] = np.nan
            area[j, i] = 0.0
        for k in range(row_starts[jmin + j], row_starts[jmin + j + 1]):
            i = cols[k] - imin
            data[j, i] = values[k]
            area[j, i] = areas[k]
    return data, area


def _kernel_inputs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two windows as the kernel reads them: in place when both are native, aligned
    float32 or both float64, else both converted to float64 (as numpy converts)."""
    first = np.asarray(first)
    second = np.asarray(second)
    if (first.dtype == second.dtype and first.dtype in _KERNEL_DTYPES
            and first.dtype.isnative and first.flags.aligned and second.flags.aligned):
        return first, second
    return (np.array(first, dtype=np.float64, order="C"),
            np.array(second, dtype=np.float64, order="C"))


def difference_pixels(
    flux1: np.ndarray,
    flux2: np.ndarray,
    area1: np.ndarray | None = None,
    area2: np.ndarray | None = None,
    *,
    workspace: Workspace | None = None,
) -> KeptPixels | None:
    """The pixels of ``image1 - image2`` that survive, over their overlap window.

    Parameters
    ----------
    flux1, flux2 : numpy.ndarray
        Flux of each image over the same overlap window (2-D). float32 and float64
        arrays of any strides are read in place (both fluxes of one dtype, and both
        areas of one dtype); other windows are converted to float64.
    area1, area2 : numpy.ndarray, optional
        Pixel-area (coverage) weights over the window; omit both for unit weights
        (Montage's ``noAreas``).
    workspace : Workspace, optional
        Reuse its arrays (the result is then valid until the workspace's next use).

    Returns
    -------
    KeptPixels or None
        ``None`` when no pixel survives ("All pixels are blank.").
    """
    if flux1.shape != flux2.shape or flux1.ndim != 2:
        raise ValueError(f"windows differ in shape: {flux1.shape} vs {flux2.shape}")
    use_areas = area1 is not None and area2 is not None
    f1, f2 = _kernel_inputs(flux1, flux2)
    if use_areas:
        if area1.shape != flux1.shape or area2.shape != flux2.shape:
            raise ValueError("area windows differ in shape from the flux windows")
        a1, a2 = _kernel_inputs(area1, area2)
    else:
        a1, a2 = f1, f2  # placeholders, never read
    size = f1.shape[0] * f1.shape[1]
    cols, values, areas = (_kept_arrays(size) if workspace is None
                           else workspace.kept_arrays(size))
    contiguous = all(w.flags.c_contiguous and w.flags.writeable for w in (f1, a1, f2, a2))
    kernel = _compiled_kernel(f1.dtype, a1.dtype, contiguous)
    row_starts, imin, imax, jmin, jmax, n_kept, n_finite = kernel(
        f1, a1, f2, a2, use_areas, COVERAGE_TOLERANCE, cols, values, areas)
    if n_kept == 0:
        return None
    return KeptPixels(cols=cols[:n_kept], values=values[:n_kept], areas=areas[:n_kept],
                      row_starts=row_starts, imin=int(imin), imax=int(imax),
                      jmin=int(jmin), jmax=int(jmax), n_finite=int(n_finite),
                      workspace=workspace)


def difference(
    flux1: np.ndarray,
    flux2: np.ndarray,
    area1: np.ndarray | None = None,
    area2: np.ndarray | None = None,
) -> Difference | None:
    """Difference ``image1 - image2`` over their overlap window, as trimmed images.

    Parameters
    ----------
    flux1, flux2 : numpy.ndarray
        Flux of each image over the same overlap window (2-D, any float or int dtype).
    area1, area2 : numpy.ndarray, optional
        Pixel-area (coverage) weights over the window; omit both for unit weights
        (Montage's ``noAreas``).

    Returns
    -------
    Difference or None
        ``None`` when no pixel survives ("All pixels are blank.").
    """
    kept = difference_pixels(flux1, flux2, area1, area2)
    return None if kept is None else kept.images()


def fits_rounded(value: float) -> float:
    """Round a value to 14 significant digits, as a CFITSIO ``-14`` header write does."""
    return float(f"{value:.14G}")
