from __future__ import annotations

import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba  # test-only: compiles the reference (plain) kernel below
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from diffit import _difference
from diffit.boundingbox import row_extremes
from diffit.difference import (
    COVERAGE_TOLERANCE,
    Workspace,
    difference,
    difference_pixels,
    fits_rounded,
)
from diffit.fitplane import FitError, _valid_pixels, fit_pixels, fit_plane


def test_equal_areas_give_plain_difference() -> None:
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(6, 7))
    f2 = rng.normal(size=(6, 7))
    result = difference(f1, f2)
    assert result is not None and (result.imin, result.jmin) == (0, 0)
    np.testing.assert_allclose(result.data, f1 - f2, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(result.area, np.full((6, 7), 2.0))


def test_area_weighting_formula() -> None:
    f1 = np.array([[3.0, 5.0]])
    f2 = np.array([[1.0, 2.0]])
    a1 = np.array([[1.0, 1.1]])
    a2 = np.array([[0.9, 1.0]])
    result = difference(f1, f2, a1, a2)
    expected = 2.0 * (f1 * a1 - f2 * a2) / (a1 + a2)
    np.testing.assert_array_equal(result.data, expected)
    np.testing.assert_array_equal(result.area, a1 + a2)


def test_low_coverage_pixels_are_dropped_and_result_trimmed() -> None:
    f = np.ones((5, 6))
    a1 = np.ones((5, 6))
    a1[:, 0] = 0.2  # total area 1.2 vs reference 1.84: more than 33.3 % off
    a1[:, 5] = 0.0  # invalid in image 1
    f2 = 2 * f
    f2[0, :] = np.nan  # invalid in image 2
    result = difference(f, f2, a1, np.ones((5, 6)))
    assert result is not None
    assert (result.imin, result.jmin) == (1, 1)
    assert result.data.shape == (4, 4)
    assert np.all(result.data == -1.0)


def test_nan_area_disables_coverage_rule_as_in_montage() -> None:
    # Montage quirk: a NaN area makes the mean area NaN, so no pixel fails the 0.333 test.
    f = np.ones((4, 4))
    a1 = np.ones((4, 4))
    a1[:, 0] = 0.4
    a1[0, 3] = np.nan
    result = difference(f, 2 * f, a1, np.ones((4, 4)))
    assert result.imin == 0 and np.isnan(result.data[0, 3 - result.imin])
    assert np.all(np.isfinite(result.data[:, 0]))


def test_coverage_rule_keeps_a_pixel_exactly_at_the_tolerance() -> None:
    """Montage drops a pixel when ``|A - reference|/reference > 0.333``: a pixel whose
    quotient is exactly the double 0.333 stays; one an ulp of area further goes.
    (MontagePy 2.3.0's mDiff does the same with these areas.)"""
    at = 0.20072007200720055  # area1 of pixel 0 that puts it exactly at the tolerance
    ones = np.ones((1, 4))
    f1 = np.array([[3.0, 2.0, 2.0, 2.0]])
    for area, kept in ((at, True), (float(np.nextafter(at, 0.0)), False)):
        reference = (((area + 1.0) + 1.0) + 1.0) / 4.0 + 4.0 / 4.0  # scan-order sums
        quotient = abs((area + 1.0) - reference) / reference
        assert (quotient == COVERAGE_TOLERANCE) == kept and quotient >= COVERAGE_TOLERANCE
        a1 = np.array([[area, 1.0, 1.0, 1.0]])
        for dtype in (np.float64, np.float32):  # float32 fluxes, float64 areas alike
            result = difference(f1.astype(dtype), ones.astype(dtype), a1, ones)
            assert (result.imin == 0) == kept, (area, dtype)
        assert_fused_matches_plain(f1, ones, a1, ones)


def test_reference_area_is_summed_in_scan_order() -> None:
    """The mean areas are summed row by row, as Montage sums them: with those sums
    pixel (0, 0) sits exactly at the tolerance and stays; summed column by column, the
    reference would round differently and drop it. (MontagePy 2.3.0's mDiff keeps it.)"""
    a1 = np.array([[0.5160316978491646, 1.1022391763796258, 1.462423093124381],
                   [0.5722652655298768, 0.9999728236586185, 1.2440974792826482]])
    a2 = np.array([[0.6772267404746588, 0.8880667317845192, 0.5628954984549713],
                   [1.2258808637757768, 0.5877678867594868, 0.8950917083579676]])

    def quotient(order: str) -> float:
        sum1 = sum2 = 0.0
        for w1, w2 in zip(a1.ravel(order=order).tolist(), a2.ravel(order=order).tolist()):
            sum1 += w1
            sum2 += w2
        reference = sum1 / 6.0 + sum2 / 6.0
        return abs((a1[0, 0] + a2[0, 0]) - reference) / reference

    assert quotient("C") == COVERAGE_TOLERANCE < quotient("F")
    f1 = np.full((2, 3), 2.0)
    f2 = np.ones((2, 3))
    for dtype in (np.float64, np.float32):
        result = difference(f1.astype(dtype), f2.astype(dtype), a1, a2)
        assert np.all(np.isfinite(result.data)), dtype
    assert_fused_matches_plain(f1, f2, a1, a2)


def test_nan_and_inf_pixels_blank() -> None:
    f1 = np.array([[1.0, np.nan, 3.0], [np.inf, 5.0, 6.0]])
    f2 = np.array([[0.0, 0.0, -np.inf], [0.0, 1.0, 1.0]])
    result = difference(f1, f2)
    assert np.isnan(result.data[0, 1]) and np.isnan(result.data[0, 2]) and np.isnan(result.data[1, 0])
    assert result.area[0, 1] == 0.0
    assert result.data[1, 1] == 4.0


def test_all_blank_is_none() -> None:
    f = np.full((3, 3), np.nan)
    assert difference(f, np.ones((3, 3))) is None
    assert difference(np.ones((3, 3)), np.ones((3, 3)), np.zeros((3, 3)), np.ones((3, 3))) is None


def test_crpix_rounding_matches_cfitsio_14_digits() -> None:
    assert fits_rounded(-31.189999999999998) == -31.19
    assert fits_rounded(100.25) == 100.25
    assert fits_rounded(1.0 / 3.0) == 0.33333333333333


arrays = hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 8)),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=32))


@settings(max_examples=80, deadline=None)
@given(arrays, st.data())
def test_difference_never_crashes_and_keeps_consistent_masks(f1, data) -> None:
    f2 = data.draw(hnp.arrays(np.float64, f1.shape, elements=st.floats(width=32)))
    areas = data.draw(st.booleans())
    a1 = a2 = None
    if areas:
        a1 = data.draw(hnp.arrays(np.float64, f1.shape, elements=st.floats(-1, 3, width=32)))
        a2 = data.draw(hnp.arrays(np.float64, f1.shape, elements=st.floats(-1, 3, width=32)))
    result = difference(f1, f2, a1, a2)
    if result is None:
        return
    kept = result.area > 0
    assert kept[0, :].any() and kept[-1, :].any() and kept[:, 0].any() and kept[:, -1].any()
    assert np.all(np.isnan(result.data[~kept]))
    assert np.all(result.area[~kept] == 0)


# --------------------------------------------------------------------------------------
# the fused path (difference_pixels -> coordinates -> fit_pixels) against the plain one
# --------------------------------------------------------------------------------------


@numba.njit(error_model="numpy")
def _plain_difference_kernel(flux1, area1, flux2, area2, use_areas, tolerance):
    """The three-pass mDiff kernel diffit used before the fused one, verbatim."""
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


def plain_difference(f1, f2, a1, a2):
    """``(data, area, imin, jmin)`` of the trimmed difference as the plain path forms it."""
    f1, f2 = (np.ascontiguousarray(v, dtype=np.float64) for v in (f1, f2))
    use_areas = a1 is not None
    if use_areas:
        a1, a2 = (np.ascontiguousarray(v, dtype=np.float64) for v in (a1, a2))
    else:
        a1, a2 = f1, f2
    data, area, imin, imax, jmin, jmax = _plain_difference_kernel(
        f1, a1, f2, a2, use_areas, COVERAGE_TOLERANCE)
    if imax < imin:
        return None
    rows, cols = slice(jmin, jmax + 1), slice(imin, imax + 1)
    return (np.ascontiguousarray(data[rows, cols]), np.ascontiguousarray(area[rows, cols]),
            int(imin), int(jmin))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bits (NaN payloads and signed zeros included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == np.float64:
        a, b = a.view(np.uint64), b.view(np.uint64)
    return bool(np.array_equal(a, b))


def fit_or_error(fit):
    try:
        result = fit()
    except FitError as error:
        return str(error)
    return tuple(np.float64(getattr(result, name)).view(np.uint64) for name in FIT_FIELDS)


FIT_FIELDS = ("a", "b", "c", "crpix1", "crpix2", "xmin", "xmax", "ymin", "ymax", "xcenter",
              "ycenter", "npixel", "rms", "boxx", "boxy", "boxwidth", "boxheight", "boxang")
TEMPLATE_CRPIX = (0.0, 100.5, -3.25, 1000.0, 123.456, -77.7, 2.0 ** 20 + 0.5, 1e-7, 9876.54321)


def assert_fused_matches_plain(f1, f2, a1=None, a2=None, crpix=(100.5, -3.25), offset=(0, 0),
                               level_only=False, workspace=None, fit=True, context=None):
    """The fused path gives bit for bit what difference() + fit_plane() gave before."""
    plain = plain_difference(f1, f2, a1, a2)
    kept = difference_pixels(f1, f2, a1, a2, workspace=workspace)
    if plain is None:
        assert kept is None, context
        assert difference(f1, f2, a1, a2) is None, context
        return
    assert kept is not None, context
    data, area, imin, jmin = plain
    assert (kept.imin, kept.jmin, kept.shape) == (imin, jmin, data.shape), context
    images = kept.images()
    assert same_bits(images.data, data) and same_bits(images.area, area), context
    public = difference(f1, f2, a1, a2)
    assert same_bits(public.data, data) and same_bits(public.area, area), context
    assert (public.imin, public.jmin) == (imin, jmin), context
    crpix1 = fits_rounded(crpix[0] - (offset[0] + imin))
    crpix2 = fits_rounded(crpix[1] - (offset[1] + jmin))
    xs, ys, zs, rows, lo, hi = kept.coordinates(crpix1, crpix2)
    pxs, pys, pzs = _valid_pixels(data, crpix1, crpix2)
    assert same_bits(xs, pxs) and same_bits(ys, pys) and same_bits(zs, pzs), context
    prows, plo, phi = row_extremes(data)
    assert same_bits(rows, prows) and same_bits(lo, plo) and same_bits(hi, phi), context
    if fit:
        fused = fit_or_error(lambda: fit_pixels(xs, ys, zs, rows, lo, hi, crpix1, crpix2,
                                                level_only, shape=kept.shape))
        assert fused == fit_or_error(lambda: fit_plane(data, crpix1, crpix2, level_only)), context


def _layout(rng, array: np.ndarray, dtype) -> np.ndarray:
    """``array`` as ``dtype``, contiguous or as a strided view into a larger array."""
    ny, nx = array.shape
    kind = rng.integers(0, 5)
    if kind == 0:
        return array.astype(dtype)
    if kind == 1:  # a column slice of a wider image (rows not contiguous)
        left = int(rng.integers(0, 5))
        big = np.full((ny, nx + left + int(rng.integers(1, 5))), np.nan, dtype=dtype)
        big[:, left:left + nx] = array
        return big[:, left:left + nx]
    if kind == 2:  # every other column
        big = np.full((ny, 2 * nx), 7.0, dtype=dtype)
        big[:, ::2] = array
        return big[:, ::2]
    if kind == 3:  # Fortran order
        return np.asfortranarray(array.astype(dtype))
    big = np.full((ny + 3, nx + 2), -1.0, dtype=dtype)  # rows and columns cut from an image
    big[2:2 + ny, 1:1 + nx] = array
    return big[2:2 + ny, 1:1 + nx]


def random_windows(rng):
    """Flux and area windows with blanks, bad areas, low coverage and overflow."""
    shape_kind = rng.integers(0, 10)
    if shape_kind == 0:
        ny, nx = 1, int(rng.integers(1, 60))
    elif shape_kind == 1:
        ny, nx = int(rng.integers(1, 60)), 1
    elif shape_kind == 2:
        ny, nx = int(rng.integers(40, 120)), int(rng.integers(40, 200))
    else:
        ny, nx = (int(v) for v in rng.integers(1, 30, 2))
    yy, xx = np.mgrid[0:ny, 0:nx]
    f1 = 0.01 * xx - 0.02 * yy + rng.normal(0, 1, (ny, nx)) * 10.0 ** rng.uniform(-3, 3)
    f2 = rng.normal(0, 1, (ny, nx)) + rng.choice([0.0, 5.0])
    a1 = rng.uniform(0.9, 1.1, (ny, nx))
    a2 = rng.uniform(0.9, 1.1, (ny, nx))
    if rng.random() < 0.3:  # exact, dyadic areas
        a1 = np.round(a1 * 16) / 16
        a2 = np.ones((ny, nx))
    for f in (f1, f2):
        f[rng.random((ny, nx)) < rng.choice([0.0, 0.05, 0.5])] = np.nan
        f[rng.random((ny, nx)) < rng.choice([0.0, 0.02])] = rng.choice([np.inf, -np.inf])
        if rng.random() < 0.3:  # a blank edge, as reprojected images have
            angle = rng.uniform(0, 2 * np.pi)
            f[np.cos(angle) * (xx - nx / 2) + np.sin(angle) * (yy - ny / 2) > nx / 4] = np.nan
    for a in (a1, a2):
        bad = rng.random((ny, nx)) < rng.choice([0.0, 0.05])
        a[bad] = rng.choice([0.0, -0.0, -1.0, np.nan, np.inf], bad.sum())
        low = rng.random((ny, nx)) < rng.choice([0.0, 0.1, 0.6])  # coverage rule
        a[low] *= rng.choice([0.1, 0.3, 0.7, 2.5])
    if rng.random() < 0.1:  # products overflow: kept pixels with non-finite values
        f1[rng.random((ny, nx)) < 0.1] = rng.choice([1e308, -1e308])
        f2[rng.random((ny, nx)) < 0.1] = 1e308
    if rng.random() < 0.05:
        f1[:] = np.nan
    if rng.random() < 0.03:
        a2[:] = 0.0
    return f1, f2, a1, a2


@pytest.mark.parametrize("seed", range(6))
def test_fused_path_matches_plain_path(seed) -> None:
    rng = np.random.default_rng(4000 + seed)
    workspace = Workspace(max_pixels=int(rng.choice([64, 1 << 21])))
    for case in range(150):
        f1, f2, a1, a2 = random_windows(rng)
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        with np.errstate(all="ignore"):
            windows = [_layout(rng, v, dtype) for v in (f1, f2, a1, a2)]
        if rng.random() < 0.2:
            windows[2] = windows[3] = None  # noAreas
        crpix = tuple(float(v) for v in rng.choice(TEMPLATE_CRPIX, 2))
        offset = tuple(int(v) for v in rng.integers(-50, 50, 2))
        assert_fused_matches_plain(*windows, crpix=crpix, offset=offset,
                                   level_only=bool(rng.random() < 0.3),
                                   workspace=workspace if rng.random() < 0.7 else None,
                                   context=(seed, case, dtype, f1.shape))


def test_fused_path_reads_float32_and_views_without_copies_as_float64_would() -> None:
    rng = np.random.default_rng(11)
    big = [rng.normal(0, 1, (50, 90)).astype(np.float32) for _ in range(4)]
    for area in big[2:]:
        area[:] = np.abs(area) + 0.5
    big[0][rng.random((50, 90)) < 0.1] = np.nan
    views = [v[5:45, 10:70] for v in big]  # column slices: rows not contiguous
    assert not views[0].flags.c_contiguous
    assert_fused_matches_plain(*views)
    widened = [v.astype(np.float64) for v in views]
    a = difference_pixels(*views).images()
    b = difference_pixels(*widened).images()
    assert same_bits(a.data, b.data) and same_bits(a.area, b.area)


def test_fused_path_other_dtypes_are_widened() -> None:
    f1 = np.arange(12, dtype=np.int16).reshape(3, 4)
    f2 = np.ones((3, 4), dtype=">f8")
    a1 = np.full((3, 4), 2, dtype=np.int64)
    a2 = np.full((3, 4), 1.5, dtype=">f4")
    assert_fused_matches_plain(f1, f2, a1, a2)
    assert_fused_matches_plain(f1, f2, None, None)


def test_fused_path_edge_cases() -> None:
    nan = np.nan
    one = np.ones((3, 3))
    cases = [
        (np.full((3, 3), nan), one, None, None),  # all blank
        (one, one, np.zeros((3, 3)), one),  # no valid area
        (np.array([[1.0, 2.0, 3.0]]), np.array([[0.5, nan, 0.25]]), None, None),  # one row
        (np.array([[1.0], [2.0], [4.0]]), np.zeros((3, 1)), None, None),  # one column
        (np.array([[nan, nan], [nan, 5.0]]), np.ones((2, 2)), None, None),  # one pixel
        (np.array([[1e308, 1.0, 1e308], [2.0, 1e308, 3.0]]), np.array([[-1e308, 0.0, 1e308], [1.0, 1.0, 1.0]]),
         np.full((2, 3), 1.5), np.full((2, 3), 1.5)),  # overflow: inf and nan values kept
        (np.array([[1e308, 1e308], [1e308, 1e308]]), -np.full((2, 2), 1e308),
         np.full((2, 2), 1.5), np.full((2, 2), 1.5)),  # every kept value infinite
        (one, 2 * one, np.array([[1, 1, 0.2], [1, nan, 1], [1, 1, 1.0]]), one),  # NaN area
    ]
    for level_only in (False, True):
        for crpix in ((0.0, 0.0), (100.5, -3.25), (123.456, 9876.54321)):
            for f1, f2, a1, a2 in cases:
                with np.errstate(all="ignore"):
                    assert_fused_matches_plain(f1, f2, a1, a2, crpix=crpix,
                                               level_only=level_only, workspace=Workspace())


def test_workspace_arrays_are_reused_and_huge_windows_get_fresh_ones() -> None:
    rng = np.random.default_rng(3)
    workspace = Workspace(max_pixels=400)
    f = rng.normal(0, 1, (10, 20))
    first = difference_pixels(f, f * 0.5, workspace=workspace)
    second = difference_pixels(f[:5], f[:5] * 0.5, workspace=workspace)
    assert np.shares_memory(first.values, second.values)
    big = rng.normal(0, 1, (30, 30))
    huge = difference_pixels(big, big, workspace=workspace)
    assert not np.shares_memory(huge.values, second.values)
    assert_fused_matches_plain(big, 0.5 * big, workspace=workspace)
    assert_fused_matches_plain(f, 0.5 * f, workspace=workspace)


_ELEMENTS = st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.0, 1.5, 0.1, 3.0, -1.0, 1e308, np.nan, np.inf])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fused_path_matches_plain_path_property(data) -> None:
    shape = data.draw(st.tuples(st.integers(1, 6), st.integers(1, 6)))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    windows = [data.draw(hnp.arrays(np.float64, shape, elements=st.one_of(
        _ELEMENTS, st.floats(-10, 10)))) for _ in range(4)]
    with np.errstate(all="ignore"):
        windows = [w.astype(dtype) for w in windows]
    if data.draw(st.booleans()):
        windows[2] = windows[3] = None
    elif data.draw(st.booleans()):
        windows = [np.repeat(w, 2, axis=1)[:, ::2] for w in windows]  # strided views
    crpix = data.draw(st.sampled_from([(0.0, 0.0), (100.5, -3.25), (123.456, -77.7)]))
    with np.errstate(all="ignore"):
        assert_fused_matches_plain(*windows, crpix=crpix, level_only=data.draw(st.booleans()))


def kept_fields(kept) -> tuple:
    """Everything a :class:`KeptPixels` holds and gives, as comparable bytes."""
    images = kept.images()
    arrays = (kept.cols, kept.values, kept.areas, kept.row_starts,
              *kept.coordinates(100.5, -3.25), images.data, images.area)
    box = (kept.imin, kept.imax, kept.jmin, kept.jmax, kept.n_finite)
    return box + tuple((a.dtype.str, a.shape, a.tobytes()) for a in arrays)


def layouts(array: np.ndarray, tmp_path: Path) -> dict[str, np.ndarray]:
    """``array`` (contiguous) as windows of every layout the kernel must read in place."""
    ny, nx = array.shape
    wide = np.full((ny + 4, nx + 7), np.nan, dtype=array.dtype)
    wide[2:2 + ny, 3:3 + nx] = array
    every_other = np.repeat(array, 2, axis=1)
    reversed_rows = np.ascontiguousarray(array[::-1])
    readonly = array.copy()
    readonly.flags.writeable = False
    path = tmp_path / f"window-{len(list(tmp_path.iterdir()))}.npy"
    np.save(path, wide)
    return {
        "contiguous": array,
        "column slice": wide[2:2 + ny, 3:3 + nx],
        "every other column": every_other[:, ::2],
        "fortran": np.asfortranarray(array),
        "negative row stride": reversed_rows[::-1],
        "read-only": readonly,
        "read-only memmap slice": np.load(path, mmap_mode="r")[2:2 + ny, 3:3 + nx],
    }


@pytest.mark.parametrize("flux_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("area_dtype", [np.float32, np.float64])
def test_every_dtype_and_layout_gives_what_the_float64_contiguous_copy_gives(
        flux_dtype, area_dtype, tmp_path) -> None:
    """float32/float64 fluxes and areas (in any combination) of any layout, read in
    place, give bit for bit what their float64, C-contiguous copies give."""
    rng = np.random.default_rng(21)
    f1, f2, a1, a2 = random_windows(rng)
    while difference(f1, f2, a1, a2) is None or min(f1.shape) < 5:
        f1, f2, a1, a2 = random_windows(rng)
    with np.errstate(all="ignore"):
        fluxes = [v.astype(flux_dtype) for v in (f1, f2)]
        areas = [v.astype(area_dtype) for v in (a1, a2)]
    widened = [np.ascontiguousarray(v, dtype=np.float64) for v in (*fluxes, *areas)]
    expected = kept_fields(difference_pixels(*widened))
    expected_no_areas = kept_fields(difference_pixels(*widened[:2]))
    flux_views = [layouts(v, tmp_path) for v in fluxes]
    area_views = [layouts(v, tmp_path) for v in areas]
    for name in flux_views[0]:
        f1v, f2v = (views[name] for views in flux_views)
        a1v, a2v = (views[name] for views in area_views)
        assert np.array_equal(f1v, fluxes[0], equal_nan=True), name
        assert kept_fields(difference_pixels(f1v, f2v, a1v, a2v)) == expected, name
        assert kept_fields(difference_pixels(f1v, f2v)) == expected_no_areas, name
        mixed = (flux_views[0]["contiguous"], f2v, a1v, area_views[1]["column slice"])
        assert kept_fields(difference_pixels(*mixed)) == expected, name
    assert_fused_matches_plain(*(views["column slice"] for views in (*flux_views, *area_views)))


def test_strided_float32_windows_are_read_without_a_copy() -> None:
    """Column slices of float32 images are read in place: the call allocates a few
    rows of scratch, not a copy of the windows (which a byte-swapped window needs)."""
    rng = np.random.default_rng(8)
    big = [rng.uniform(1.0, 2.0, (300, 1000)).astype(np.float32) for _ in range(4)]
    views = [v[:, 100:900] for v in big]
    assert not views[0].flags.c_contiguous
    workspace = Workspace(max_pixels=1 << 21)
    difference_pixels(*views, workspace=workspace)  # the workspace's arrays, once

    def peak_allocation(windows) -> int:
        tracemalloc.start()
        try:
            assert difference_pixels(*windows, workspace=workspace) is not None
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    window_bytes = views[0].nbytes
    assert peak_allocation(views) < window_bytes // 10
    swapped = [v.astype(">f4") for v in views]  # must be converted: the check sees copies
    assert peak_allocation(swapped) > 4 * window_bytes


def test_worker_threads_difference_pairs_concurrently_with_the_same_results() -> None:
    rng = np.random.default_rng(9)
    pairs = []
    for _ in range(24):
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        with np.errstate(all="ignore"):
            pairs.append([_layout(rng, v, dtype) for v in random_windows(rng)])

    def fields(windows):
        kept = difference_pixels(*windows, workspace=Workspace())
        return None if kept is None else kept_fields(kept)

    serial = [fields(w) for w in pairs]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(fields, pairs * 3)) == serial * 3


def test_kernel_rejects_mismatched_windows_and_short_outputs() -> None:
    window = np.ones((4, 5))
    outputs = (np.empty(20, np.int32), np.empty(20), np.empty(20))
    assert _difference.difference_kernel(window, window, window, window, True,
                                         COVERAGE_TOLERANCE, *outputs)[5] == 20
    with pytest.raises(ValueError, match="differ in shape"):
        _difference.difference_kernel(window, window[:, :4], window, window, True,
                                      COVERAGE_TOLERANCE, *outputs)
    with pytest.raises(ValueError, match="smaller than the window"):
        _difference.difference_kernel(window, window, window, window, True,
                                      COVERAGE_TOLERANCE, *(v[:19] for v in outputs))
    with pytest.raises(ValueError, match="differ in shape"):
        difference_pixels(window, window[:3])


def test_importing_difference_does_not_import_numba() -> None:
    """diffit.difference is compiled ahead of time: importing it imports no JIT.

    The package's ``__init__`` imports the rest of diffit, so the module is imported on
    its own, under an empty ``diffit`` package.
    """
    root = Path(__file__).resolve().parent.parent
    script = (
        "import sys, types\n"
        "package = types.ModuleType('diffit')\n"
        f"package.__path__ = [{str(root / 'diffit')!r}]\n"
        "sys.modules['diffit'] = package\n"
        "import diffit.difference\n"
        "assert diffit.difference._difference.__file__.startswith(package.__path__[0])\n"
        "assert 'numba' not in sys.modules, 'numba was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root)
