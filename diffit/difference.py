"""Area-weighted difference of two overlap windows, as Montage's mDiff forms it.

Pure computation: takes the flux (and optionally area) windows of the two images over
their overlap and returns the trimmed difference image. The arithmetic follows mDiff
step by step so that the result is bit-identical:

* a pixel is valid in image ``k`` when its flux is finite and its area is ``> 0``;
* ``D = f1*a1 - f2*a2`` and ``A = a1 + a2`` where both are valid;
* pixels whose total area strays more than 33.3 % from the sum of the two mean areas
  are dropped (Montage's coverage rule);
* kept pixels become ``2*D/A`` (``f1 - f2`` for equal areas), the rest NaN;
* the result is trimmed to the bounding box of the kept pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

COVERAGE_TOLERANCE = 0.333


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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _difference_kernel(flux1, area1, flux2, area2, use_areas, tolerance):  # pragma: no cover - jitted
    ny, nx = flux1.shape
    data = np.empty((ny, nx))
    area = np.zeros((ny, nx))
    sum1 = 0.0
    count1 = 0.0
    sum2 = 0.0
    count2 = 0.0
    for j in range(ny):
        for i in range(nx):
            f = flux1[j, i]
            w = area1[j, i] if use_areas else 1.0
            if not np.isfinite(f) or w <= 0.0:
                data[j, i] = np.nan
                area[j, i] = 0.0
            else:
                data[j, i] = f * w
                area[j, i] = w
                count1 += 1.0
                sum1 += w
    for j in range(ny):
        for i in range(nx):
            f = flux2[j, i]
            w = area2[j, i] if use_areas else 1.0
            if not np.isfinite(f) or w <= 0.0 or area[j, i] == 0.0:
                data[j, i] = np.nan
                area[j, i] = 0.0
            else:
                data[j, i] = data[j, i] - f * w
                area[j, i] = area[j, i] + w
                count2 += 1.0
                sum2 += w
    reference = sum1 / count1 + sum2 / count2
    imin, imax, jmin, jmax = nx, -1, ny, -1
    for j in range(ny):
        for i in range(nx):
            a = area[j, i]
            keep = np.isfinite(a) and a != 0.0
            if keep and abs(a - reference) / reference > tolerance:
                keep = False
            if keep and a > 0.0:
                data[j, i] = 2.0 * data[j, i] / a
                if j < jmin:
                    jmin = j
                if j > jmax:
                    jmax = j
                if i < imin:
                    imin = i
                if i > imax:
                    imax = i
            else:
                data[j, i] = np.nan
                area[j, i] = 0.0
    return data, area, imin, imax, jmin, jmax


def difference(
    flux1: np.ndarray,
    flux2: np.ndarray,
    area1: np.ndarray | None = None,
    area2: np.ndarray | None = None,
) -> Difference | None:
    """Difference ``image1 - image2`` over their overlap window.

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
    if flux1.shape != flux2.shape or flux1.ndim != 2:
        raise ValueError(f"windows differ in shape: {flux1.shape} vs {flux2.shape}")
    use_areas = area1 is not None and area2 is not None
    f1 = np.ascontiguousarray(flux1, dtype=np.float64)
    f2 = np.ascontiguousarray(flux2, dtype=np.float64)
    if use_areas:
        if area1.shape != flux1.shape or area2.shape != flux2.shape:
            raise ValueError("area windows differ in shape from the flux windows")
        a1 = np.ascontiguousarray(area1, dtype=np.float64)
        a2 = np.ascontiguousarray(area2, dtype=np.float64)
    else:
        a1 = a2 = f1  # placeholders, never read
    data, area, imin, imax, jmin, jmax = _difference_kernel(
        f1, a1, f2, a2, use_areas, COVERAGE_TOLERANCE
    )
    if imax < imin or jmax < jmin:
        return None
    rows = slice(jmin, jmax + 1)
    cols = slice(imin, imax + 1)
    return Difference(
        data=np.ascontiguousarray(data[rows, cols]),
        area=np.ascontiguousarray(area[rows, cols]),
        imin=int(imin),
        jmin=int(jmin),
    )


def fits_rounded(value: float) -> float:
    """Round a value to 14 significant digits, as a CFITSIO ``-14`` header write does."""
    return float(f"{value:.14G}")
