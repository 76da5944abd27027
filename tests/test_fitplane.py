from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from diffit.fitplane import FitError, fit_plane

FIELDS = ("a", "b", "c", "crpix1", "crpix2", "xmin", "xmax", "ymin", "ymax", "xcenter",
          "ycenter", "npixel", "rms", "boxx", "boxy", "boxwidth", "boxheight", "boxang")


def noisy_plane(rng, ny, nx, crpix1, crpix2, sigma=0.3):
    yy, xx = np.mgrid[0:ny, 0:nx]
    return 0.01 * (xx - crpix1) - 0.02 * (yy - crpix2) + 3.0 + rng.normal(0, sigma, (ny, nx))


def test_recovers_plane_and_rejects_outliers() -> None:
    rng = np.random.default_rng(1)
    image = noisy_plane(rng, 60, 80, 10.5, -20.0, sigma=0.05)
    image[rng.random(image.shape) < 0.02] += 100.0
    fit = fit_plane(image, 10.5, -20.0)
    assert fit.a == pytest.approx(0.01, abs=2e-4)
    assert fit.b == pytest.approx(-0.02, abs=2e-4)
    assert fit.c == pytest.approx(3.0, abs=0.01)
    assert fit.rms < 0.06
    assert fit.npixel < 60 * 80
    # x = i - crpix1 for 0-based i: the first column is at -10.5.
    assert fit.xmin == -10.5 and fit.ymin == 20.0


def test_level_only_fits_mean_level_and_allows_single_row() -> None:
    rng = np.random.default_rng(2)
    image = 5.0 + rng.normal(0, 0.1, (1, 30))
    fit = fit_plane(image, 0.0, 0.0, level_only=True)
    assert fit.a == 0.0 and fit.b == 0.0
    assert fit.c == pytest.approx(5.0, abs=0.1)
    with pytest.raises(FitError, match="Too few pixels to fit"):
        fit_plane(image, 0.0, 0.0)
    with pytest.raises(FitError, match="Too few pixels to fit"):
        fit_plane(image.T, 0.0, 0.0)


def test_diagonal_pixels_are_singular() -> None:
    image = np.full((5, 5), np.nan)
    for k in range(5):
        image[k, k] = float(k % 2)
    with pytest.raises(FitError, match="Singular Matrix"):
        fit_plane(image, 0.0, 0.0)


def test_early_stop_gives_identical_result() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        image = noisy_plane(rng, 40, 50, 3.25, 7.5, sigma=rng.uniform(0.01, 1))
        image[rng.random(image.shape) < 0.05] = np.nan
        image[rng.random(image.shape) < 0.02] -= 40
        fast = fit_plane(image, 3.25, 7.5)
        full = fit_plane(image, 3.25, 7.5, stop_early=False)
        for name in FIELDS:
            assert np.array_equal(getattr(fast, name), getattr(full, name), equal_nan=True), name


def test_bit_identical_to_montage_mfitplane(tmp_path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    rng = np.random.default_rng(7)
    for case in range(60):
        ny, nx = (int(v) for v in rng.integers(2, 70, 2))
        crpix1, crpix2 = (round(float(v), 2) for v in rng.uniform(-300, 300, 2))
        image = noisy_plane(rng, ny, nx, crpix1, crpix2, sigma=rng.uniform(0.01, 2))
        image[rng.random(image.shape) < 0.1] = np.nan
        image[rng.random(image.shape) < 0.02] += 50
        if case % 3 == 0:  # a rotated blank edge, as reprojected images have
            yy, xx = np.mgrid[0:ny, 0:nx]
            angle = rng.uniform(0, np.pi)
            image[np.cos(angle) * (xx - nx / 2) + np.sin(angle) * (yy - ny / 2) > nx / 4] = np.nan
        level_only = case % 4 == 0
        header = fits.Header()
        header["CRPIX1"] = crpix1
        header["CRPIX2"] = crpix2
        path = tmp_path / f"d{case}.fits"
        fits.writeto(path, image, header)
        expected = montage.mFitplane(str(path), 0, int(level_only), 0, 0)
        try:
            fit = fit_plane(image, crpix1, crpix2, level_only)
        except FitError as error:
            assert expected["status"] == "1" and expected["msg"].decode() == str(error)
            continue
        assert expected["status"] == "0", expected
        for name in FIELDS:
            want, got = expected[name], getattr(fit, name)
            assert np.array_equal(want, got, equal_nan=True), (case, name, want, got)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                  elements=st.floats(-1e6, 1e6) | st.just(np.nan)),
       st.floats(-1e3, 1e3), st.floats(-1e3, 1e3), st.booleans())
def test_fit_never_crashes(image, crpix1, crpix2, level_only) -> None:
    try:
        fit = fit_plane(image, crpix1, crpix2, level_only)
    except FitError as error:
        assert str(error)
        return
    assert fit.boxwidth > 0 and fit.boxheight > 0
