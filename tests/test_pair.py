"""One pair end to end (``diffit.pair``): file naming, per-pair failures and their reasons.

Also home of the small generated-survey helpers shared with ``tests/test_faults.py``:
a 70x55 template and 40x30 noisy images cut from its grid, written as plain, scaled
integer, cube, gzip or tile-compressed FITS.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffit.fitsio import ImageReader
from diffit.headers import read_template
from diffit.pair import (
    PairOptions,
    diff_paths,
    file_path,
    input_names,
    process_pair,
)
from diffit.tables import OverlapPair, format_overlap_table

# --------------------------------------------------------------------------------------
# generated inputs (shared with test_faults.py)
# --------------------------------------------------------------------------------------

TC1, TC2 = 35.5, 27.25
CDELT = 0.000277777777777778
TEMPLATE = f"""SIMPLE  = T
BITPIX  = -64
NAXIS   = 2
NAXIS1  = 70
NAXIS2  = 55
CTYPE1  = 'RA---TAN'
CTYPE2  = 'DEC--TAN'
EQUINOX = 2000.0
CRVAL1  = 270.0
CRVAL2  = -16.0
CRPIX1  = {TC1}
CRPIX2  = {TC2}
CDELT1  = -{CDELT}
CDELT2  = {CDELT}
CROTA2  = 0.0
END
"""
#: Template-grid offsets of the standard four images: every pair of them overlaps.
OFFSETS = ((0, 0), (25, 20), (12, -5), (30, 3))
SHAPE = (30, 40)  # rows, columns


def wcs_header(ox: int, oy: int) -> fits.Header:
    """The header mProject would write for an image at offset (ox, oy) of the template."""
    header = fits.Header()
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["EQUINOX"] = 2000.0
    header["CRVAL1"] = 270.0
    header["CRVAL2"] = -16.0
    header["CRPIX1"] = TC1 - ox
    header["CRPIX2"] = TC2 - oy
    header["CDELT1"] = -CDELT
    header["CDELT2"] = CDELT
    header["CROTA2"] = 0.0
    return header


def noisy_image(rng: np.random.Generator, ox: int, oy: int, shape=SHAPE) -> np.ndarray:
    """Noise, a level and a slope in template coordinates, outliers and a few NaNs."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    data = (rng.normal(0.0, 0.3, shape) + rng.uniform(-3, 3)
            + 0.01 * (xx + ox) - 0.02 * (yy + oy))
    data[rng.random(shape) < 0.03] += 25.0
    data[rng.random(shape) < 0.02] = np.nan
    return data


def image_hdu(data: np.ndarray, header: fits.Header, fmt: str = "f4") -> fits.PrimaryHDU:
    """A primary HDU holding ``data`` (physical values, NaN = blank) in a pixel format.

    ``fmt``: ``f4``/``f8`` floats, ``>f4`` explicitly big-endian float32, ``i2`` int16
    with BSCALE/BZERO/BLANK, ``u2`` uint16 (BZERO 32768, no BLANK: NaN becomes 0),
    ``i4`` int32 with BLANK, ``cube`` float32 with NAXIS3 = 2 (garbage second plane),
    ``cube-i2`` the scaled int16 of ``i2`` with NAXIS3 = 2.
    """
    header = header.copy()
    finite = np.isfinite(data)
    if fmt in ("f4", "f8", ">f4", "cube"):
        array = data.astype({"f4": np.float32, "f8": np.float64, ">f4": ">f4",
                             "cube": np.float32}[fmt])
        if fmt == "cube":
            array = np.stack([array, np.full_like(array, 1.0e4)])
        return fits.PrimaryHDU(array, header=header)
    if fmt in ("i2", "cube-i2", "i4"):
        bscale, bzero = (0.000731, 2.5) if fmt != "i4" else (1.0e-6, -3.25)
        blank = -32768 if fmt != "i4" else -2147483648
        raw = np.where(finite, np.round((np.nan_to_num(data) - bzero) / bscale), blank)
        array = raw.astype(np.int16 if fmt != "i4" else np.int32)
        if fmt == "cube-i2":
            array = np.stack([array, np.full_like(array, 99)])
        hdu = fits.PrimaryHDU(array, header=header)
        hdu.header["BSCALE"] = bscale
        hdu.header["BZERO"] = bzero
        hdu.header["BLANK"] = blank
        return hdu
    if fmt == "u2":
        array = np.where(finite, np.round(data * 100.0 + 30000.0), 0).astype(np.uint16)
        return fits.PrimaryHDU(array, header=header)
    raise ValueError(fmt)


def write_hdu(hdu: fits.PrimaryHDU, path: Path) -> Path:
    """Write an image HDU; ``.gz`` names are gzip streams, ``.fz`` names tile-compressed.

    Tile compression is lossless: RICE_1 for integers, GZIP_2 without quantisation for
    floats, with the scaling keywords of the raw integers carried over.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".fz"):
        data = hdu.data
        header = hdu.header.copy()
        scaling = {k: header.pop(k) for k in ("BSCALE", "BZERO", "BLANK") if k in header}
        if data.dtype.kind == "f":
            comp = fits.CompImageHDU(data, header, compression_type="GZIP_2", quantize_level=0.0)
        else:
            if data.dtype == np.uint16:
                scaling = {}
            comp = fits.CompImageHDU(data, header, compression_type="RICE_1")
        for key, value in scaling.items():  # keep the raw integers and their scaling
            comp.header[key] = value
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(path)
    elif path.name.endswith(".gz"):
        plain = path.with_name(path.name[:-3] + ".tmp")
        hdu.writeto(plain)
        with open(plain, "rb") as source, gzip.open(path, "wb") as target:
            shutil.copyfileobj(source, target)
        plain.unlink()
    else:
        hdu.writeto(path)
    return path


@dataclass
class Survey:
    """A template, images on its grid (with area files) and an overlap table of all pairs.

    Attributes
    ----------
    root : Path
        Folder holding everything (images directly in it: ``projdir == root``).
    names : list of str
        Image names as listed in the table.
    """

    root: Path
    names: list[str] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)

    @property
    def template(self) -> Path:
        return self.root / "template.hdr"

    @property
    def diffs(self) -> Path:
        return self.root / "diffs.tbl"

    def pairs(self) -> list[tuple[int, int]]:
        return [(a, b) for a in range(len(self.names)) for b in range(a + 1, len(self.names))]

    def write_table(self, pairs: list[tuple[int, int]] | None = None) -> Path:
        rows = [(a, b, self.names[a], self.names[b], f"diff.{a:06d}.{b:06d}.fits")
                for a, b in (self.pairs() if pairs is None else pairs)]
        self.diffs.write_text(format_overlap_table(rows))
        return self.diffs


def make_survey(root: Path, fmt: str = "f4", suffix: str = ".fits", *, seed: int = 1,
                offsets=OFFSETS, areas: bool = True, area_suffix: str | None = None) -> Survey:
    """Write a survey of noisy images in one pixel format and file kind.

    The physical data depend only on ``seed`` and ``offsets``, so surveys written in
    different formats or compressions hold the same pixel values.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    survey = Survey(root)
    survey.template.write_text(TEMPLATE)
    for k, (ox, oy) in enumerate(offsets):
        data = noisy_image(rng, ox, oy)
        area = np.full(SHAPE, rng.uniform(0.9, 1.1))
        area[:, :2] = 0.5
        header = wcs_header(ox, oy)
        name = f"im{k}{suffix}"
        write_hdu(image_hdu(data, header, fmt), root / name)
        if areas:
            stem = name[: -len(suffix)]
            write_hdu(fits.PrimaryHDU(area, header=header), root / f"{stem}_area{area_suffix or suffix}")
        survey.names.append(name)
        survey.data.append(data)
    survey.write_table()
    return survey


def outcome_for(survey: Survey, plus: int, minus: int, *, reader: ImageReader | None = None,
                **options) -> object:
    """Run ``process_pair`` on one pair of a survey."""
    template = read_template(survey.template)
    pair = OverlapPair(0, plus, minus, survey.names[plus], survey.names[minus],
                       f"diff.{plus:06d}.{minus:06d}.fits")
    options.setdefault("projdir", str(survey.root))
    if reader is not None:  # the caller's: left open, its cache in use
        return process_pair(pair, template, PairOptions(**options), reader)
    with ImageReader() as own:
        return process_pair(pair, template, PairOptions(**options), own)


def assert_failed(outcome, stage: str, *fragments: str) -> None:
    """The outcome failed at ``stage`` with a one-line reason containing ``fragments``."""
    assert outcome.stage == stage, outcome
    assert outcome.fit is None and outcome.row is None
    assert outcome.reason and "\n" not in outcome.reason
    for fragment in fragments:
        assert fragment in outcome.reason, (fragment, outcome.reason)


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------

def test_file_path_follows_montage() -> None:
    assert file_path("proj", "a.fits") == "proj/a.fits"
    assert file_path("proj/", "./a.fits") == "proj/a.fits"
    assert file_path("proj", "/abs/a.fits") == "/abs/a.fits"
    assert file_path("", "a.fits") == "a.fits"


def test_diff_paths_follow_montage() -> None:
    assert diff_paths("d", "diff.000001.000002.fits") == ("d/diff.000001.000002.fits",
                                                          "d/diff.000001.000002_area.fits")
    assert diff_paths("d", "x.fit") == ("d/x.fits", "d/x_area.fits")
    assert diff_paths("d", "plain") == ("d/plains.fits", "d/plains_area.fits")


def test_input_names_montage_names_when_nothing_exists(tmp_path: Path) -> None:
    base = str(tmp_path / "x")
    assert input_names(base + ".fits") == (base + ".fits", base + "_area.fits")
    assert input_names(base) == (base + ".fits", base + "_area.fits")
    assert input_names(base + ".fit") == (base + ".fit.fits", base + ".fit_area.fits")
    assert input_names(base + ".fits.gz") == (base + ".fits.gz.fits", base + ".fits.gz_area.fits")


def test_input_names_prefer_montage_names_where_they_exist(tmp_path: Path) -> None:
    base = str(tmp_path / "x")
    for name in (".fit", ".fit.fits", ".fit_area.fits"):
        Path(base + name).touch()
    assert input_names(base + ".fit") == (base + ".fit.fits", base + ".fit_area.fits")


def test_input_names_compressed_as_given_with_matching_area(tmp_path: Path) -> None:
    base = str(tmp_path / "x")
    for suffix in (".fits.gz", ".fits.fz"):
        Path(base + suffix).touch()
        assert input_names(base + suffix) == (base + suffix, base + "_area" + suffix)  # none yet
        Path(base + "_area.fits").touch()
        assert input_names(base + suffix) == (base + suffix, base + "_area.fits")  # mixed
        Path(base + "_area" + suffix).touch()
        assert input_names(base + suffix) == (base + suffix, base + "_area" + suffix)
        for path in tmp_path.iterdir():
            path.unlink()


def test_input_names_find_compressed_copies_of_listed_fits(tmp_path: Path) -> None:
    base = str(tmp_path / "x")
    Path(base + ".fits.gz").touch()
    assert input_names(base + ".fits") == (base + ".fits.gz", base + "_area.fits.gz")
    Path(base + "_area.fits").touch()
    assert input_names(base + ".fits") == (base + ".fits.gz", base + "_area.fits")
    Path(base + ".fits").touch()
    Path(base + "_area.fits").unlink()
    Path(base + "_area.fits.fz").touch()
    assert input_names(base + ".fits") == (base + ".fits", base + "_area.fits.fz")


# --------------------------------------------------------------------------------------
# one pair: success and every per-pair failure, with its reason
# --------------------------------------------------------------------------------------

def test_good_pair_is_fitted(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    outcome = outcome_for(survey, 0, 1)
    assert outcome.stage == "ok" and outcome.reason is None
    assert outcome.row.startswith(f" {0:9d} {1:9d} ")
    assert outcome.fit.npixel > 100 and 0.2 < outcome.fit.rms < 0.7  # noise 0.3 per image


@pytest.mark.parametrize("fmt", ["f4", "f8", "i2"])
def test_kernels_give_the_same_fit_with_or_without_the_gil(tmp_path: Path, monkeypatch,
                                                          fmt: str) -> None:
    """Small inputs keep the GIL (each kernel's NOGIL_MIN_*), large ones release it: the
    same pairs give the same rows and pixels whichever way every kernel runs."""
    from diffit import _boundingbox, _difference, _fitplane, _fitsread

    survey = make_survey(tmp_path, fmt)
    thresholds = [(_fitsread, "NOGIL_MIN_BYTES"), (_difference, "NOGIL_MIN_PIXELS"),
                  (_fitplane, "NOGIL_MIN_PIXELS"), (_boundingbox, "NOGIL_MIN_PIXELS"),
                  (_boundingbox, "NOGIL_MIN_ROWS")]
    results = {}
    for way, value in (("released", 0), ("kept", 1 << 62)):
        for module, name in thresholds:
            monkeypatch.setattr(module, name, value)
        results[way] = [outcome_for(survey, a, b) for a, b in survey.pairs()]
    assert [o.row for o in results["released"]] == [o.row for o in results["kept"]]
    assert all(o.stage == "ok" for o in results["kept"])


@pytest.mark.parametrize("which", ["flux", "area"])
def test_missing_file(tmp_path: Path, which: str) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / ("im1.fits" if which == "flux" else "im1_area.fits")
    victim.unlink()
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim), "not found")


def test_missing_area_is_fine_with_no_areas(tmp_path: Path) -> None:
    survey = make_survey(tmp_path, areas=False)
    assert outcome_for(survey, 0, 1, no_areas=True).stage == "ok"
    assert_failed(outcome_for(survey, 0, 1), "diff", "im0_area.fits")


@pytest.mark.parametrize("which", ["flux", "area"])
def test_truncated_file(tmp_path: Path, which: str) -> None:
    survey = make_survey(tmp_path, fmt="f8")
    victim = tmp_path / ("im1.fits" if which == "flux" else "im1_area.fits")
    content = victim.read_bytes()
    victim.write_bytes(content[: 2880 + (len(content) - 2880) // 2])
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim))


@pytest.mark.parametrize("damage", ["garbage header", "empty", "text", "header only"])
def test_corrupt_file(tmp_path: Path, damage: str) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / "im1.fits"
    content = victim.read_bytes()
    victim.write_bytes({"garbage header": b"\x07GARBAGE" * 360 + content[2880:],
                        "empty": b"",
                        "text": b"this is not FITS\n" * 10,
                        "header only": content[:1000]}[damage])
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim))


@pytest.mark.parametrize("keyword", ["CRPIX1", "CRPIX2"])
def test_image_without_crpix(tmp_path: Path, keyword: str) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / "im1.fits"
    with fits.open(victim, mode="update") as hdul:
        del hdul[0].header[keyword]
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim), keyword)


def test_image_without_naxis1(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / "im1.fits"
    content = bytearray(victim.read_bytes())
    start = content.index(b"NAXIS1  =")
    content[start:start + 80] = b"COMMENT".ljust(80)  # the card is gone, the size kept
    victim.write_bytes(bytes(content))
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim), "NAXIS1")


@pytest.mark.parametrize("change, fragment", [
    ({"CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN"}, "CTYPE1"),
    ({"CDELT1": -2 * CDELT, "CDELT2": 2 * CDELT}, "CDELT"),
    ({"CROTA2": 10.0}, "rotation"),
    ({"CD1_1": -CDELT * 0.98, "CD1_2": CDELT * 0.17, "CD2_1": CDELT * 0.17, "CD2_2": CDELT * 0.98},
     "rotation"),
    ({"CRVAL1": 270.01}, "CRVAL1"),
    ({"CRVAL2": -15.5}, "CRVAL2"),
], ids=["ctype", "cdelt", "crota", "cd-rotation", "crval1", "crval2"])
def test_image_not_on_the_template_grid(tmp_path: Path, change: dict, fragment: str) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / "im1.fits"
    with fits.open(victim, mode="update") as hdul:
        for key, value in change.items():
            hdul[0].header[key] = value
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim), "template grid", fragment)
    assert outcome_for(survey, 0, 2).stage == "ok"


def test_image_without_wcs_beyond_crpix_is_accepted(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / "im1.fits"
    with fits.open(victim, mode="update") as hdul:
        for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2", "CROTA2", "EQUINOX"):
            del hdul[0].header[key]
    assert outcome_for(survey, 0, 1).stage == "ok"


def test_area_of_another_shape(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    victim = tmp_path / "im1_area.fits"
    fits.PrimaryHDU(np.ones((29, 40)), header=wcs_header(*OFFSETS[1])).writeto(victim, overwrite=True)
    assert_failed(outcome_for(survey, 0, 1), "diff", str(victim), "40x29", "40x30")


def test_all_nan_overlap(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    write_hdu(image_hdu(np.full(SHAPE, np.nan), wcs_header(*OFFSETS[1])), tmp_path / "x.fits")
    os.replace(tmp_path / "x.fits", tmp_path / "im1.fits")
    assert_failed(outcome_for(survey, 0, 1), "diff", "All pixels are blank.")


def test_zero_areas_blank_the_overlap(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    fits.PrimaryHDU(np.zeros(SHAPE), header=wcs_header(*OFFSETS[1])).writeto(
        tmp_path / "im1_area.fits", overwrite=True)
    assert_failed(outcome_for(survey, 0, 1), "diff", "All pixels are blank.")


def test_no_overlap(tmp_path: Path) -> None:
    survey = make_survey(tmp_path, offsets=((0, 0), (40, 0)))  # side by side, touching
    assert_failed(outcome_for(survey, 0, 1), "diff", "Images don't overlap")


@pytest.mark.parametrize("level_only", [False, True])
def test_single_row_overlap(tmp_path: Path, level_only: bool) -> None:
    survey = make_survey(tmp_path, offsets=((0, 0), (10, 29)))  # rows overlap in one row
    outcome = outcome_for(survey, 0, 1, level_only=level_only)
    if level_only:
        assert outcome.stage == "ok" and outcome.fit.a == outcome.fit.b == 0.0
    else:
        assert_failed(outcome, "fit", "Too few pixels to fit")


@pytest.mark.parametrize("fmt", ["cube", "cube-i2", "i2", "u2", "i4", ">f4", "f8"])
def test_pixel_formats_are_fitted(tmp_path: Path, fmt: str) -> None:
    survey = make_survey(tmp_path, fmt=fmt)
    outcome = outcome_for(survey, 0, 1)
    assert outcome.stage == "ok", outcome.reason


@pytest.mark.parametrize("suffix, area_suffix", [
    (".fits.gz", None), (".fits.fz", None), (".fits.gz", ".fits"), (".fits.fz", ".fits.gz")])
def test_compressed_inputs_equal_plain(tmp_path: Path, suffix: str, area_suffix) -> None:
    plain = make_survey(tmp_path / "plain", fmt="i2")
    packed = make_survey(tmp_path / "packed", fmt="i2", suffix=suffix, area_suffix=area_suffix)
    for plus, minus in plain.pairs():
        want = outcome_for(plain, plus, minus)
        got = outcome_for(packed, plus, minus)
        assert want.stage == "ok" and got.row == want.row


def test_keep_all_creates_missing_diffdir_and_writes_both_images(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    diffdir = tmp_path / "new" / "diffs"
    outcome = outcome_for(survey, 0, 1, keep_all=True, diffdir=str(diffdir))
    assert outcome.stage == "ok"
    assert sorted(p.name for p in diffdir.iterdir()) == [
        "diff.000000.000001.fits", "diff.000000.000001_area.fits"]


def test_without_keep_all_nothing_is_written(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    before = sorted(tmp_path.iterdir())
    assert outcome_for(survey, 0, 1, diffdir=str(tmp_path / "nowhere")).stage == "ok"
    assert sorted(tmp_path.iterdir()) == before


def test_unwritable_diff_file_is_a_diff_failure(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the diff folder should be")
    outcome = outcome_for(survey, 0, 1, keep_all=True, diffdir=str(blocker))
    assert_failed(outcome, "diff", "cannot write difference image", str(blocker))


def test_stale_diff_files_are_never_read(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    diffdir = tmp_path / "diffs"
    first = outcome_for(survey, 0, 1, keep_all=True, diffdir=str(diffdir))
    for path in diffdir.iterdir():
        path.write_bytes(b"garbage" * 100)
    for keep_all in (True, False):
        again = outcome_for(survey, 0, 1, keep_all=keep_all, diffdir=str(diffdir))
        assert again.row == first.row


def test_unexpected_errors_fail_only_that_pair(tmp_path: Path, monkeypatch) -> None:
    import diffit.pair

    survey = make_survey(tmp_path)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(diffit.pair, "fit_pixels", broken)
    assert_failed(outcome_for(survey, 0, 1), "fit", "unexpected error", "ZeroDivisionError", "boom")


def test_reader_cache_sees_rewritten_images(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    reader = ImageReader()
    first = outcome_for(survey, 0, 1, reader=reader)
    data = survey.data[1] + 5.0
    victim = tmp_path / "im1.fits"
    victim.unlink()
    write_hdu(image_hdu(data, wcs_header(*OFFSETS[1])), victim)
    second = outcome_for(survey, 0, 1, reader=reader)
    assert second.row == outcome_for(survey, 0, 1).row != first.row
    assert first.fit.c - second.fit.c > 2.0
    assert outcome_for(survey, 0, 1, reader=reader).row == second.row
    reader.close()


def test_grid_check_is_redone_for_another_template(tmp_path: Path) -> None:
    survey = make_survey(tmp_path)
    with ImageReader() as reader:
        assert outcome_for(survey, 0, 1, reader=reader).stage == "ok"
        survey.template.write_text(TEMPLATE.replace("CRVAL2  = -16.0", "CRVAL2  = -17.0"))
        assert_failed(outcome_for(survey, 0, 1, reader=reader), "diff", "CRVAL2")


# --------------------------------------------------------------------------------------
# property: random pairs never raise, and every failure has a reason
# --------------------------------------------------------------------------------------

_FLOATS = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0]))


@st.composite
def random_pairs(draw):
    """Two small images (random shapes, offsets, NaN masks, areas and pixel formats)."""
    images = []
    for _ in range(2):
        ny, nx = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        crpix = (10.5 - draw(st.floats(-4, 12)), 8.25 - draw(st.floats(-3, 10)))  # offsets
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        data = rng.normal(draw(st.floats(-10, 10)), draw(st.floats(0, 3)), (ny, nx))
        data[rng.random((ny, nx)) < draw(st.floats(0, 1))] = np.nan
        if draw(st.booleans()):
            data[rng.random((ny, nx)) < 0.2] = draw(_FLOATS)
        area = rng.uniform(0.2, 1.5, (ny, nx))
        area_kind = draw(st.sampled_from(["normal"] * 4 + ["zero", "negative", "nan", "mixed", "shape"]))
        if area_kind == "zero":
            area[:] = 0.0
        elif area_kind == "negative":
            area[rng.random((ny, nx)) < 0.5] = -1.0
        elif area_kind == "nan":
            area[rng.random((ny, nx)) < 0.3] = np.nan
        elif area_kind == "mixed":
            area[rng.random((ny, nx)) < 0.3] = draw(_FLOATS)
        elif area_kind == "shape":
            area = np.ones((ny + 1, nx))
        fmt = draw(st.sampled_from(["f4", "f8", "i2", "cube"]))
        images.append((data, area, crpix, fmt))
    level_only = draw(st.booleans())
    no_areas = draw(st.booleans())
    return images, level_only, no_areas


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=random_pairs())
def test_random_pairs_never_raise(case, tmp_path_factory: pytest.TempPathFactory) -> None:
    images, level_only, no_areas = case
    root = tmp_path_factory.mktemp("pair")
    (root / "template.hdr").write_text(TEMPLATE.replace("NAXIS1  = 70", "NAXIS1  = 20")
                                       .replace("NAXIS2  = 55", "NAXIS2  = 16")
                                       .replace(f"CRPIX1  = {TC1}", "CRPIX1  = 10.5")
                                       .replace(f"CRPIX2  = {TC2}", "CRPIX2  = 8.25"))
    names = []
    for k, (data, area, (crpix1, crpix2), fmt) in enumerate(images):
        header = wcs_header(0, 0)
        header["CRPIX1"] = crpix1
        header["CRPIX2"] = crpix2
        with np.errstate(invalid="ignore", over="ignore"):
            hdu = image_hdu(np.clip(data, -20.0, 20.0) if fmt == "i2" else data, header, fmt)
        write_hdu(hdu, root / f"p{k}.fits")
        fits.PrimaryHDU(area, header=header).writeto(root / f"p{k}_area.fits")
        names.append(f"p{k}.fits")
    template = read_template(root / "template.hdr")
    pair = OverlapPair(7, 0, 1, names[0], names[1], "d.fits")
    options = PairOptions(projdir=str(root), diffdir=str(root / "d"), keep_all=True,
                          level_only=level_only, no_areas=no_areas)
    with ImageReader() as reader:
        outcome = process_pair(pair, template, options, reader)
    assert outcome.index == 7 and outcome.stage in ("ok", "diff", "fit")
    event(outcome.stage if outcome.stage == "ok" else (outcome.reason or "").split("(")[0][-30:])
    if outcome.stage == "ok":
        assert outcome.reason is None and outcome.row.endswith(" \n")
    else:
        assert outcome.reason and outcome.reason.strip() and "\n" not in outcome.reason
        assert "unexpected error" not in outcome.reason
        assert outcome.fit is None
