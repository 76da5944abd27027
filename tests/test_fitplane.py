from __future__ import annotations

import numba
import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from diffit._fitplane import exact_scale_bits
from diffit.fitplane import N_ITERATIONS, FitError, _fit_kernel, _valid_pixels, fit_plane

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


# ---------------------------------------------------------------------------------------
# The optimised kernel against the plain transcription of mFitplane's loop.
#
# ``_fit_kernel_reference`` is the straightforward loop (sequential scan-order sums,
# branches for clipping) that the optimised, compiled ``_fit_kernel`` replaced, jitted
# with numba (a test-only dependency) so that thousands of random inputs run in seconds.
# The 3x3 solver and the state comparison are transcribed from mFitplane too; the tests
# above and tests/test_parity.py check the whole fit against MontagePy. Every returned
# double must match bit for bit (sign of zero included) on a wide range of random
# inputs, so that the exact coordinate sums and the branch-free, two-pixels-at-a-time
# passes can never drift from it.
# ---------------------------------------------------------------------------------------


@numba.njit(nogil=True, error_model="numpy")
def _solve3_reference(m, v):  # pragma: no cover - jitted
    """Gauss-Jordan elimination with full pivoting on a 3x3 system, in place.

    Returns 0 on success (``v`` holds the solution), 1 when a pivot is chosen twice
    ("Singular Matrix-1") and 2 on an exactly zero pivot ("Singular Matrix-2").
    """
    n = 3
    used = np.zeros(n, dtype=np.int64)
    row = 0
    col = 0
    for step in range(n):
        largest = 0.0
        for r in range(n):
            if used[r] == 1:
                continue
            for c in range(n):
                if used[c] == 0:
                    if abs(m[r, c]) >= largest:
                        largest = abs(m[r, c])
                        row = r
                        col = c
                elif used[c] > 1:
                    return 1
        used[col] += 1
        if row != col:
            for c in range(n):
                tmp = m[row, c]
                m[row, c] = m[col, c]
                m[col, c] = tmp
            tmp = v[row]
            v[row] = v[col]
            v[col] = tmp
        if m[col, col] == 0.0:
            return 2
        inverse = 1.0 / m[col, col]
        m[col, col] = 1.0
        for c in range(n):
            m[col, c] *= inverse
        v[col] *= inverse
        for r in range(n):
            if r != col:
                factor = m[r, col]
                m[r, col] = 0.0
                for c in range(n):
                    m[r, c] -= m[col, c] * factor
                v[r] -= v[col] * factor
    return 0


@numba.njit(nogil=True, error_model="numpy")
def _same_reference(x, y):  # pragma: no cover - jitted
    """True when two doubles are identical, including the sign of zero."""
    return x == y and np.signbit(x) == np.signbit(y)


@numba.njit(nogil=True, error_model="numpy")
def _fit_kernel_reference(xs, ys, zs, level_only, n_iterations, stop_early):  # pragma: no cover
    n = xs.shape[0]
    m = np.empty((3, 3))
    v = np.zeros(3)
    a = 0.0
    b = 0.0
    c = 0.0
    rms = 0.0
    residual = np.empty(n)
    used_residual = np.empty(n)
    used_limit = 0.0
    used_clip = False
    xcenter = 0.0
    ycenter = 0.0
    npixel = 0.0
    for iteration in range(n_iterations):
        sxx = syy = sxy = sx = sy = sxz = syz = sz = sn = 0.0
        clip = rms > 0.0
        limit = 2.0 * rms
        for k in range(n):
            if clip and residual[k] > limit:
                continue
            x = xs[k]
            y = ys[k]
            z = zs[k]
            sxx += x * x
            syy += y * y
            sxy += x * y
            sx += x
            sy += y
            sxz += x * z
            syz += y * z
            sz += z
            sn += 1.0
        used_residual, residual = residual, used_residual
        used_limit = limit
        used_clip = clip
        xcenter = sx / sn
        ycenter = sy / sn
        if level_only:
            new_a = 0.0
            new_b = 0.0
            new_c = sz / sn
        else:
            m[0, 0] = sxx
            m[0, 1] = sxy
            m[0, 2] = sx
            m[1, 0] = sxy
            m[1, 1] = syy
            m[1, 2] = sy
            m[2, 0] = sx
            m[2, 1] = sy
            m[2, 2] = sn
            v[0] = sxz
            v[1] = syz
            v[2] = sz
            status = _solve3_reference(m, v)
            if status != 0:
                return (status, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            new_a = v[0]
            new_b = v[1]
            new_c = v[2]
        szz = 0.0
        count = 0.0
        clip_rms = iteration > 0
        for k in range(n):
            dz = abs(zs[k] - (new_a * xs[k] + new_b * ys[k] + new_c))
            residual[k] = dz
            if clip_rms and dz > limit:
                continue
            szz += dz * dz
            count += 1.0
        new_rms = np.sqrt(szz / count)
        converged = (
            iteration >= 1
            and _same_reference(new_a, a) and _same_reference(new_b, b)
            and _same_reference(new_c, c) and _same_reference(new_rms, rms)
        )
        a = new_a
        b = new_b
        c = new_c
        rms = new_rms
        npixel = count
        if converged and stop_early:
            break
    xmin = 1000000.0
    xmax = -1000000.0
    ymin = 1000000.0
    ymax = -1000000.0
    for k in range(n):
        if used_clip and used_residual[k] > used_limit:
            continue
        if xs[k] < xmin:
            xmin = xs[k]
        if xs[k] > xmax:
            xmax = xs[k]
        if ys[k] < ymin:
            ymin = ys[k]
        if ys[k] > ymax:
            ymax = ys[k]
    return (0, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms)


def assert_identical(xs, ys, zs, level_only, stop_early, label=""):
    """All 12 results equal, including the sign of zero and of NaN.

    With finite coordinates and values (always the case for real images) every NaN
    the fit can produce is x86's default NaN, or its absolute value in the rms pass, so
    NaN signs are fixed too. With NaN *inputs* two NaNs of different sign can meet in
    one addition, and which one survives depends on the operand order the compiler
    picks (which IEEE 754 leaves open), so only the NaN positions are compared.
    """
    args = (xs, ys, zs, level_only, N_ITERATIONS, stop_early)
    want = _fit_kernel_reference(*args)
    got = _fit_kernel(*args)
    finite = np.isfinite(xs).all() and np.isfinite(ys).all() and np.isfinite(zs).all()
    assert len(want) == len(got)
    for index, (w, g) in enumerate(zip(want, got)):
        same_sign = np.signbit(w) == np.signbit(g) or (not finite and np.isnan(w))
        assert np.array_equal(w, g, equal_nan=True) and same_sign, (label, index, want, got)
    return want


# Reference pixels: dyadic (exact coordinate sums), non-dyadic, large and tiny offsets.
CRPIX_CHOICES = (
    0.0, 1.0, 10.5, 20.5, -3.25, 150.5, 1500.5, -1711.0, 0.125, 7.0625, 12345.5, -9999.75,
    10.3, 20.7, 100.3, 0.25 + 1e-7, 1e-7, -0.3, 12345.3, 1e4 + 0.1, 2.0 ** 26 + 0.5, 3e7,
    1e15, -2.0 ** 40, 1.0 / 3.0, 2.0 ** -20, 2.0 ** -30, 5e8 + 0.5,
)


def random_image(rng, ny, nx, crpix1, crpix2):
    kind = rng.integers(0, 12)
    yy, xx = np.mgrid[0:ny, 0:nx]
    sigma = 10.0 ** rng.uniform(-4, 2)
    a, b = rng.normal(0, 0.02, 2)
    noise = rng.normal(0, sigma, (ny, nx))
    image = a * (xx - crpix1) + b * (yy - crpix2) + rng.normal(0, 10) + noise
    if kind == 0:  # constant: rms 0, clipping stays off
        image = np.full((ny, nx), rng.choice([0.0, -0.0, 1.5, -7.0]))
    elif kind == 1:  # small integers: exact zeros and ties at the clipping limit
        image = rng.integers(-3, 4, (ny, nx)).astype(np.float64)
    elif kind == 2:  # mostly exact zeros, some -0.0
        image = np.where(rng.random((ny, nx)) < 0.8, 0.0, noise)
        image[rng.random((ny, nx)) < 0.2] = -0.0
    elif kind == 3:  # an exact plane (rms ~ rounding noise)
        image = 0.5 * (xx - crpix1) - 0.25 * (yy - crpix2) + 3.0
    elif kind == 4:  # huge values: products overflow
        image = noise * 1e300 + rng.choice([0.0, 1e305])
    elif kind == 5:  # subnormal values
        image = noise * 1e-310
    elif kind == 6:  # quantised data
        image = np.round(image * 8) / 8
    # outliers
    if rng.random() < 0.7:
        outliers = rng.random((ny, nx)) < rng.choice([0.001, 0.01, 0.05, 0.3])
        image[outliers] += rng.choice([-1, 1], outliers.sum()) * 10.0 ** rng.uniform(0, 6)
    # blank pixels: random holes, blank rows/columns, a blank wedge
    holes = rng.integers(0, 6)
    if holes == 1:
        image[rng.random((ny, nx)) < rng.uniform(0, 1)] = np.nan
    elif holes == 2:
        image[rng.random(ny) < 0.3, :] = np.nan
        image[:, rng.random(nx) < 0.3] = np.nan
    elif holes == 3:
        angle = rng.uniform(0, np.pi)
        image[np.cos(angle) * (xx - nx / 2) + np.sin(angle) * (yy - ny / 2) > nx / 4] = np.nan
    elif holes == 4:  # keep only a few pixels
        keep = rng.random((ny, nx)) < rng.integers(1, 5) / (ny * nx)
        image[~keep] = np.nan
    elif holes == 5:
        image[rng.random((ny, nx)) < 0.05] = rng.choice([np.inf, -np.inf])
    return image


@pytest.mark.parametrize("seed", range(8))
def test_random_images(seed) -> None:
    rng = np.random.default_rng(1000 + seed)
    for case in range(400):
        if rng.random() < 0.1:
            ny, nx = (int(v) for v in rng.integers(1, 300, 2))
        else:
            ny, nx = (int(v) for v in rng.integers(1, 40, 2))
        crpix1 = float(rng.choice(CRPIX_CHOICES)) if rng.random() < 0.8 else float(
            np.round(rng.uniform(-1e4, 1e4), rng.integers(0, 4)))
        crpix2 = float(rng.choice(CRPIX_CHOICES)) if rng.random() < 0.8 else float(
            np.round(rng.uniform(-1e4, 1e4), rng.integers(0, 4)))
        image = random_image(rng, ny, nx, crpix1, crpix2)
        xs, ys, zs = _valid_pixels(np.ascontiguousarray(image), crpix1, crpix2)
        for level_only in (False, True):
            for stop_early in (False, True):
                assert_identical(xs, ys, zs, level_only, stop_early,
                                 (seed, case, ny, nx, crpix1, crpix2))


def test_realistic_strips() -> None:
    """Long diff strips with Gaussian noise and outliers, as mDiffExec produces."""
    rng = np.random.default_rng(7)
    for ny, nx, crpix1, crpix2 in ((30, 1024, 10.5, 20.5), (1024, 30, 10.3, 20.7),
                                   (300, 300, 150.5, -149.5), (200, 257, 1500.5, -2000.0),
                                   (64, 64, 3.3, 1e-7)):
        for _ in range(3):
            yy, xx = np.mgrid[0:ny, 0:nx]
            image = 0.01 * (xx - crpix1) - 0.02 * (yy - crpix2) + 3 + rng.normal(0, 0.3, (ny, nx))
            image[rng.random(image.shape) < 0.01] += 50
            image[rng.random(image.shape) < 0.02] = np.nan
            xs, ys, zs = _valid_pixels(image, crpix1, crpix2)
            for level_only in (False, True):
                for stop_early in (False, True):
                    assert_identical(xs, ys, zs, level_only, stop_early)


def test_tiny_and_degenerate_inputs() -> None:
    """No pixels, one to three pixels, collinear pixels (singular matrices), overflow."""
    cases = [
        ([], [], []),
        ([0.5], [1.5], [2.0]),
        ([0.0, 1.0], [0.0, 0.0], [1.0, 2.0]),
        ([0.0, 1.0], [0.0, 1.0], [1.0, 2.0]),
        ([-0.5, 0.5, 1.5], [2.5, 2.5, 3.5], [1.0, -1.0, 4.0]),
        ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [1.0, 0.0, 1.0]),        # exact diagonal
        ([0.3, 1.3, 2.3], [0.7, 1.7, 2.7], [1.0, 0.0, 1.0]),        # diagonal, inexact
        ([0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 2.5, 9.0]),  # one row
        ([4.0, 4.0, 4.0], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0]),        # one column
        ([0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]),
        ([0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [-0.0, -0.0, -0.0, -0.0]),
        ([1e-7, 1.0, 1e-7, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 3.0, 5.0]),
        # an outlier whose squared residual overflows once it is rejected: it must add
        # nothing (inf * 0 would add NaN)
        ([1.0, 4.0, 0.0, -3.0, -4.0, -5.0, 2.0, 3.0, 1.0],
         [0.0, 1.0, -5.0, 4.0, -2.0, 3.0, 4.0, -5.0, -5.0],
         [-0.8, -0.17, 0.8, 1.39e154, 0.5, -0.79, -1.16, 0.64, -0.38]),
    ]
    for xs, ys, zs in cases:
        xs, ys, zs = (np.array(v, dtype=np.float64) for v in (xs, ys, zs))
        for level_only in (False, True):
            for stop_early in (False, True):
                assert_identical(xs, ys, zs, level_only, stop_early, (xs, ys, zs))


@pytest.mark.parametrize("seed", range(3))
def test_arbitrary_coordinate_arrays(seed) -> None:
    """Coordinates that do not come from an image grid: any order, repeats, -0.0,
    non-finite values, huge and tiny magnitudes."""
    rng = np.random.default_rng(2000 + seed)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e308, -1e308, 5e-324, 2.0 ** 26,
                         2.0 ** 27, 0.5, -0.25, 3.0])
    for case in range(300):
        n = int(rng.integers(0, 200))
        kind = rng.integers(0, 4)
        if kind == 0:
            xs = rng.integers(-50, 50, n) / 2.0 ** rng.integers(0, 5)
            ys = np.sort(rng.integers(-50, 50, n)) / 2.0 ** rng.integers(0, 5)
        elif kind == 1:
            xs = rng.normal(0, 10 ** rng.uniform(-3, 8), n)
            ys = rng.normal(0, 10 ** rng.uniform(-3, 8), n)
        else:
            xs = rng.integers(-5, 5, n).astype(np.float64)
            ys = np.repeat(rng.integers(-5, 5, (n + 3) // 4).astype(np.float64), 4)[:n]
        zs = rng.normal(0, 1, n) + (rng.random(n) < 0.05) * 100
        if kind == 3 and n:
            for arr in (xs, ys, zs):
                pick = rng.random(n) < 0.05
                arr[pick] = rng.choice(specials, pick.sum())
        if rng.random() < 0.3 and n:
            zs[rng.random(n) < 0.3] = rng.choice([0.0, -0.0])
        xs, ys, zs = (np.ascontiguousarray(v, dtype=np.float64) for v in (xs, ys, zs))
        for level_only in (False, True):
            for stop_early in (False, True):
                assert_identical(xs, ys, zs, level_only, stop_early, (seed, case, kind))


def test_kernel_takes_read_only_arrays_and_checks_lengths() -> None:
    rng = np.random.default_rng(5)
    xs, ys, zs = _valid_pixels(noisy_plane(rng, 20, 30, 4.5, 2.5), 4.5, 2.5)
    want = _fit_kernel(xs, ys, zs, False, N_ITERATIONS, True)
    for array in (xs, ys, zs):
        array.flags.writeable = False
    assert _fit_kernel(xs, ys, zs, False, N_ITERATIONS, True) == want
    with pytest.raises(ValueError):
        _fit_kernel(xs, ys[:-1], zs, False, N_ITERATIONS, True)


# ---------------------------------------------------------------------------------------
# The exact path's choice against the numba kernel's guess-and-verify.
#
# The choice never changes a result (both paths give Montage's sums), so the tests above
# cannot see it. The compiled kernel computes ``q`` directly; the numba kernel it
# replaced guessed it from ``v - floor(v)`` and verified the guess. Both must choose the
# same path and ``q``.
# ---------------------------------------------------------------------------------------


@numba.njit(error_model="numpy")
def _fraction_bits_reference(values):  # pragma: no cover - jitted
    unit = float(2 ** 26)
    bits = 0
    bad = False
    for k in range(values.shape[0]):
        v = values[k]
        fraction = (v - np.floor(v)) * unit
        bad |= fraction != np.floor(fraction)
        if not bad:
            bits |= np.int32(fraction)
    if bad:
        return -1
    q = 26
    while bits != 0 and bits % 2 == 0:
        bits //= 2
        q -= 1
    return q if bits != 0 else 0


@numba.njit(error_model="numpy")
def _exact_scale_bits_reference(xs, ys):  # pragma: no cover - jitted
    qx = _fraction_bits_reference(xs)
    qy = _fraction_bits_reference(ys)
    if qx < 0 or qy < 0:
        return -1
    q = max(qx, qy)
    scale = 2.0 ** q
    for values in (xs, ys):
        for k in range(values.shape[0]):
            v = values[k] * scale
            if v != np.floor(v):
                return -1
    total = 0.0
    for k in range(xs.shape[0]):
        total += xs[k] * xs[k] + ys[k] * ys[k]
    if not total * (scale * scale) <= 2.0 ** 52:
        return -1
    return q


def test_exact_path_choice() -> None:
    rng = np.random.default_rng(3000)
    specials = np.array([0.0, -0.0, -2.0 ** -60, -1e-20, 2.0 ** -26, -2.0 ** -27, 2.0 ** 26,
                         -2.0 ** 26, 2.0 ** 26 + 0.5, 2.0 ** 37, -2.0 ** 37 + 1, 2.0 ** 52,
                         2.0 ** 63, 1e300, -1e300, 5e-324, 0.1, -0.5])
    chosen = set()
    for case in range(3000):
        n = int(rng.integers(1, 60))
        q = int(rng.integers(0, 30))
        scale = 2.0 ** -q
        xs = rng.integers(-2 ** 20, 2 ** 20, n) * scale * 2.0 ** rng.integers(-3, 8)
        ys = np.repeat(rng.integers(-2 ** 12, 2 ** 12, n) * scale, 1)[:n]
        if rng.random() < 0.3:
            xs, ys = xs / 2.0 ** 14, ys / 2.0 ** 14
        if rng.random() < 0.4:
            for arr in (xs, ys):
                pick = rng.random(n) < 0.2
                arr[pick] = rng.choice(specials, pick.sum())
        if rng.random() < 0.1:  # one large coordinate with all others zero
            xs[:] = 0.0
            ys[:] = 0.0
            xs[0] = rng.choice([2.0 ** 26, 2.0 ** 26 + 1, 2.0 ** 25 + 0.5, 2.0 ** 37])
        xs, ys = np.ascontiguousarray(xs), np.ascontiguousarray(ys)
        want = _exact_scale_bits_reference(xs, ys)
        assert exact_scale_bits(xs, ys) == want, (case, xs, ys)
        chosen.add(want)
    assert -1 in chosen and len(chosen) > 20


# ---------------------------------------------------------------------------------------
# The portable pair type (machines without SSE2, e.g. ARM) against the same reference.
#
# x86-64 builds always take the SSE2 branch, so the plain-struct branch is compiled here
# on purpose (``-DDIFFIT_PORTABLE_PAIRS``, with the real setup.py and its strict
# floating-point flags) and must give the same doubles.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def portable_fit_kernel(tmp_path_factory):
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import diffit

    repo = Path(__file__).resolve().parents[1]
    build = tmp_path_factory.mktemp("portable")
    (build / "diffit").mkdir()
    shutil.copy(Path(diffit.__file__).parent / "_fitplane.pyx", build / "diffit")
    env = dict(os.environ, CFLAGS=(os.environ.get("CFLAGS", "") + " -DDIFFIT_PORTABLE_PAIRS"))
    done = subprocess.run([sys.executable, str(repo / "setup.py"), "-q", "build_ext", "--inplace"],
                          cwd=build, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DIFFIT_PORTABLE_PAIRS" in (build / "diffit" / "_fitplane.c").read_text()
    (library,) = (build / "diffit").glob("_fitplane.*.so")
    spec = importlib.util.spec_from_file_location("portable._fitplane", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fit_kernel


def test_portable_pairs_give_the_same_doubles(portable_fit_kernel) -> None:
    rng = np.random.default_rng(4000)
    compared = 0
    for case in range(600):
        ny, nx = (int(v) for v in rng.integers(1, 60, 2))
        crpix1, crpix2 = (float(rng.choice(CRPIX_CHOICES)) for _ in range(2))
        image = random_image(rng, ny, nx, crpix1, crpix2)
        xs, ys, zs = _valid_pixels(np.ascontiguousarray(image), crpix1, crpix2)
        for level_only in (False, True):
            for stop_early in (False, True):
                args = (xs, ys, zs, level_only, N_ITERATIONS, stop_early)
                want = _fit_kernel_reference(*args)
                got = portable_fit_kernel(*args)
                assert len(got) == len(want)
                for index, (w, g) in enumerate(zip(want, got)):
                    assert np.array_equal(w, g, equal_nan=True), (case, index, want, got)
                    assert np.signbit(w) == np.signbit(g) or np.isnan(w), (case, index)
                compared += want[0] == 0
    assert compared > 1000  # most cases are successful fits, not early failures
