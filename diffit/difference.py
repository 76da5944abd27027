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

:func:`difference_pixels` does this in one compiled kernel (Cython,
:mod:`diffit._difference`) and keeps only the surviving pixels (:class:`KeptPixels`), in
scan order. From those, :meth:`KeptPixels.coordinates` builds what the plane fit needs
(compact coordinates and values of the finite pixels and the per-row extremes, relative
to the trimmed image) and :meth:`KeptPixels.images` the trimmed difference and area
images (Montage's mDiff output, only needed for keepAll). :func:`difference` is the
image-returning form.

Windows may be float32 or float64 arrays of any strides (e.g. column slices of a larger
image); each value is widened to float64 exactly as numpy would, without a copy. Other
dtypes are converted to float64 first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffit import _difference

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
        self, crpix1: float, crpix2: float, scale: float = 1.0, zero: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the plane fit needs, relative to the trimmed image.

        Parameters
        ----------
        crpix1, crpix2 : float
            Reference pixel of the trimmed image.
        scale, zero : float, optional
            BSCALE and BZERO the difference file would carry (mDiff copies them from
            the template): the values are those CFITSIO reads back through them.

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
        rows, lo, hi, nrow, n = _difference.coordinates(
            self.cols, self.values, self.row_starts, self.imin, self.jmin, self.jmax,
            float(crpix1), float(crpix2), all_finite, xs, ys, zs, float(scale), float(zero))
        return xs[:n], ys[:n], zs[:n], rows[:nrow], lo[:nrow], hi[:nrow]

    def images(self) -> Difference:
        """The trimmed difference and area images, exactly as mDiff writes them."""
        data, area = _difference.images(self.cols, self.values, self.areas, self.row_starts,
                                        self.imin, self.imax, self.jmin, self.jmax)
        return Difference(data=data, area=area, imin=self.imin, jmin=self.jmin)


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
    row_starts, imin, imax, jmin, jmax, n_kept, n_finite = _difference.difference_kernel(
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
