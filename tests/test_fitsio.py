"""Reading image windows (``diffit.fitsio``): pixel conversion as CFITSIO does it, every
file kind (plain, big-endian, scaled integers, cubes, gzip, tile-compressed), and bad
files becoming one-line :class:`ImageError` reasons without tracebacks or warnings."""
from __future__ import annotations

import functools
import sys
import traceback
import os
import gzip
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffit._fitsread
import diffit.fitsio
from diffit.fitsio import ImageError, ImageReader, open_image, read_window
from test_pair import image_hdu, wcs_header, write_hdu

ROWS, COLS = slice(3, 17), slice(5, 31)


def _physical(rng: np.random.Generator, shape=(30, 40)) -> np.ndarray:
    data = rng.normal(5.0, 2.0, shape)
    data[rng.random(shape) < 0.05] = np.nan
    return data


def _window(path: Path, rows: slice = ROWS, cols: slice = COLS) -> np.ndarray:
    with ImageReader() as reader:
        return read_window(reader.get(str(path)), rows, cols)


def test_astropy_section_and_data_give_raw_values_when_not_scaling(tmp_path: Path) -> None:
    """The premise of fitsio: with do_not_scale_image_data, astropy hands out raw integers."""
    raw = np.arange(1200, dtype=np.int16).reshape(30, 40) - 600
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 10.0
    hdu.header["BLANK"] = -600
    hdu.writeto(tmp_path / "raw.fits")
    with fits.open(tmp_path / "raw.fits", do_not_scale_image_data=True, memmap=True) as hdul:
        assert hdul[0].section[ROWS, COLS].dtype.kind == "i"
        np.testing.assert_array_equal(hdul[0].section[ROWS, COLS], raw[ROWS, COLS])
        np.testing.assert_array_equal(hdul[0].data[ROWS, COLS], raw[ROWS, COLS])
    write_hdu(hdu, tmp_path / "raw.fits.fz")
    with fits.open(tmp_path / "raw.fits.fz", do_not_scale_image_data=True) as hdul:
        np.testing.assert_array_equal(hdul[1].section[ROWS, COLS], raw[ROWS, COLS])


@pytest.mark.parametrize("suffix", [".fits", ".fits.gz", ".fits.fz"])
@pytest.mark.parametrize("fmt", ["i2", "i4", "cube-i2"])
def test_scaled_integers_convert_in_double_with_blank_as_nan(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = _physical(np.random.default_rng(1))
    hdu = image_hdu(data, wcs_header(0, 0), fmt)
    raw = hdu.data if hdu.data.ndim == 2 else hdu.data[0]
    bscale, bzero, blank = hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"]
    path = write_hdu(hdu, tmp_path / f"img{suffix}")
    want = raw.astype(np.float64) * bscale + bzero  # CFITSIO: raw*BSCALE + BZERO in double
    want[raw == blank] = np.nan
    got = _window(path)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want[ROWS, COLS])
    assert np.isnan(got).any()


@pytest.mark.parametrize("suffix", [".fits", ".fits.gz", ".fits.fz"])
def test_unsigned_16_bit(tmp_path: Path, suffix: str) -> None:
    raw = np.random.default_rng(2).integers(0, 65535, (30, 40)).astype(np.uint16)
    path = write_hdu(fits.PrimaryHDU(raw, header=wcs_header(0, 0)), tmp_path / f"u{suffix}")
    np.testing.assert_array_equal(_window(path), raw[ROWS, COLS].astype(np.float64))


@pytest.mark.parametrize("suffix", [".fits", ".fits.gz", ".fits.fz"])
@pytest.mark.parametrize("fmt", [">f4", "f8", "cube"])
def test_floats_and_cubes_read_exactly(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = _physical(np.random.default_rng(3))
    path = write_hdu(image_hdu(data, wcs_header(0, 0), fmt), tmp_path / f"f{suffix}")
    want = data.astype(np.float32 if fmt != "f8" else np.float64).astype(np.float64)
    np.testing.assert_array_equal(_window(path), want[ROWS, COLS])


def test_windows_of_all_file_kinds_agree(tmp_path: Path) -> None:
    data = _physical(np.random.default_rng(4))
    windows = []
    for suffix in (".fits", ".fits.gz", ".fits.fz"):
        path = write_hdu(image_hdu(data, wcs_header(0, 0), "i2"), tmp_path / f"k{suffix}")
        for rows, cols in ((ROWS, COLS), (slice(0, 30), slice(0, 40)), (slice(29, 30), slice(39, 40))):
            windows.append((suffix, rows, cols, _window(path, rows, cols)))
    plain = {(w[1].start, w[2].start): w[3] for w in windows if w[0] == ".fits"}
    for suffix, rows, cols, window in windows:
        np.testing.assert_array_equal(window, plain[(rows.start, cols.start)])


def test_four_dimensional_image_uses_first_plane(tmp_path: Path) -> None:
    data = _physical(np.random.default_rng(5))
    hypercube = np.broadcast_to(data.astype(np.float32), (2, 3, 30, 40)).copy()
    hypercube[1:] = 1e4
    hypercube[0, 1:] = -1e4
    fits.PrimaryHDU(hypercube, header=wcs_header(0, 0)).writeto(tmp_path / "h.fits")
    np.testing.assert_array_equal(_window(tmp_path / "h.fits"),
                                  data.astype(np.float32)[ROWS, COLS].astype(np.float64))


def test_image_in_an_extension(tmp_path: Path) -> None:
    data = _physical(np.random.default_rng(6))
    fits.HDUList([fits.PrimaryHDU(),
                  fits.ImageHDU(data, header=wcs_header(0, 0))]).writeto(tmp_path / "e.fits")
    np.testing.assert_array_equal(_window(tmp_path / "e.fits"), data[ROWS, COLS])


def test_gzip_is_decompressed_once(tmp_path: Path, monkeypatch) -> None:
    data = _physical(np.random.default_rng(7))
    path = write_hdu(image_hdu(data, wcs_header(0, 0), "f8"), tmp_path / "g.fits.gz")
    calls = []
    plane = diffit.fitsio._plane
    monkeypatch.setattr(diffit.fitsio, "_plane", lambda *a: calls.append(1) or plane(*a))
    with ImageReader() as reader:
        image = reader.get(str(path))
        assert image.whole is not None
        for rows in (slice(0, 5), slice(5, 30), ROWS):
            np.testing.assert_array_equal(read_window(reader.get(str(path)), rows, COLS),
                                          data[rows, COLS])
    assert len(calls) == 1


def test_compression_is_recognised_by_content_not_name(tmp_path: Path) -> None:
    data = _physical(np.random.default_rng(12))
    packed = write_hdu(image_hdu(data, wcs_header(0, 0), "f8"), tmp_path / "a.fits.gz")
    packed.rename(tmp_path / "gzip-inside.fits")
    plain = write_hdu(image_hdu(data, wcs_header(0, 0), "f8"), tmp_path / "b.fits")
    plain.rename(tmp_path / "plain-inside.fits.gz")
    with ImageReader() as reader:
        assert reader.get(str(tmp_path / "gzip-inside.fits")).whole is not None
        assert reader.get(str(tmp_path / "plain-inside.fits.gz")).whole is None
    for name in ("gzip-inside.fits", "plain-inside.fits.gz"):
        np.testing.assert_array_equal(_window(tmp_path / name), data[ROWS, COLS])


@pytest.mark.parametrize("suffix", [".fits", ".fits.gz", ".fits.fz"])
def test_reader_keeps_files_open_and_evicts_least_recently_used(tmp_path: Path,
                                                                suffix: str) -> None:
    """Evicted images leave the cache but stay readable while still in use (another
    thread may be reading one); their files close once they are no longer used."""
    import gc

    data = np.arange(1200.0).reshape(30, 40)
    paths = [str(_write_kind(data, tmp_path / f"{k}{suffix}")) for k in range(3)]
    with ImageReader(max_open=2) as reader:
        first = reader.get(paths[0])
        assert reader.get(paths[0]) is first
        reader.get(paths[1])
        reader.get(paths[2])  # evicts the first
        assert paths[0] not in reader._open
        np.testing.assert_array_equal(read_window(first, ROWS, COLS), data[ROWS, COLS])
        hdul = first.hdul
        assert reader.get(paths[0]) is not first
        del first
        gc.collect()
        assert hdul is None or hdul._file is None or hdul._file.closed


def _write_kind(data: np.ndarray, path: Path) -> Path:
    """``data`` as a plain, gzip or tile-compressed (lossless) FITS image."""
    header = wcs_header(0, 0)
    if path.name.endswith(".fits.fz"):
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header, compression_type="GZIP_2",
                                                            quantize_level=0)]).writeto(path)
        return path
    plain = write_hdu(image_hdu(data, header, "f8"), path.with_name("plain-" + path.name.split(".")[0] + ".fits"))
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        plain.rename(path)
    return path


def test_reader_serves_threads_at_once(tmp_path: Path) -> None:
    """Lookups take no lock and files are opened outside the lock: threads sharing one
    reader, with a cache much smaller than the files they cycle through (constant
    eviction), always get the image they asked for, readable."""
    import threading

    # plain files, and compressed ones, whose images hold open astropy objects
    paths = [str(_write_kind(np.full((30, 40), float(k)),
                             tmp_path / f"{k}{('.fits', '.fits.gz', '.fits.fz')[k % 3]}"))
             for k in range(12)]
    failures: list[str] = []

    def work(seed: int) -> None:
        order = np.random.default_rng(seed).integers(0, len(paths), 300)
        for k in order:
            try:
                image = reader.get(paths[k])
                if image.path != paths[k] or read_window(image, ROWS, COLS)[0, 0] != float(k):
                    failures.append(f"{paths[k]} gave {image.path}")
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append(f"{paths[k]}: {error}")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between almost any two steps
    try:
        with ImageReader(max_open=3) as reader:
            threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(reader._open) <= 3
    finally:
        sys.setswitchinterval(switch)
    assert not failures, failures[:3]


def test_reader_reopens_a_file_that_changed(tmp_path: Path) -> None:
    path = tmp_path / "c.fits"
    with ImageReader() as reader:
        with pytest.raises(ImageError, match="not found"):
            reader.get(str(path))
        write_hdu(image_hdu(np.ones((30, 40)), wcs_header(0, 0), "f8"), path)
        assert read_window(reader.get(str(path)), ROWS, COLS)[0, 0] == 1.0
        path.unlink()
        write_hdu(image_hdu(np.full((30, 40), 2.0), wcs_header(0, 0), "f8"), path)
        assert read_window(reader.get(str(path)), ROWS, COLS)[0, 0] == 2.0


def test_reader_caches_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.fits").write_bytes(b"not a FITS file")
    with ImageReader() as reader:
        with pytest.raises(ImageError) as first:
            reader.get(str(tmp_path / "bad.fits"))
        depth = len(traceback.extract_tb(first.value.__traceback__))
        for _ in range(5):
            with pytest.raises(ImageError) as again:
                reader.get(str(tmp_path / "bad.fits"))
        assert first.value is again.value
        # re-raised from scratch each time: its traceback (and the frames it would keep
        # alive) does not grow with every pair that names the bad file
        assert len(traceback.extract_tb(again.value.__traceback__)) == depth


def test_reader_opens_a_file_once_for_threads_that_ask_at_once(tmp_path: Path,
                                                               monkeypatch) -> None:
    """A second thread asking for an image being opened waits for that open (a large
    compressed image is decompressed once, not once per thread)."""
    import threading
    import time

    path = str(_write_kind(np.ones((30, 40)), tmp_path / "slow.fits.gz"))
    calls = []
    real_open = diffit.fitsio.open_image

    def slow_open(name: str):
        calls.append(name)
        time.sleep(0.2)
        return real_open(name)

    monkeypatch.setattr(diffit.fitsio, "open_image", slow_open)
    got = []
    with ImageReader() as reader:
        threads = [threading.Thread(target=lambda: got.append(reader.get(path))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert calls == [path]
    assert len(got) == 3 and got[0] is got[1] is got[2]


# --------------------------------------------------------------------------------------
# bad files: one-line reasons naming the file (and keyword)
# --------------------------------------------------------------------------------------

def _to_bytes(hdu: fits.PrimaryHDU) -> bytes:
    import io

    buffer = io.BytesIO()
    hdu.writeto(buffer)
    return buffer.getvalue()


def _assert_reason(path: Path, *fragments: str) -> str:
    """Opening or reading ``path`` fails with a one-line ImageError naming it."""
    with pytest.raises(ImageError) as caught:
        image = open_image(str(path))
        try:
            read_window(image, ROWS, COLS)
        finally:
            image.close()
    reason = str(caught.value)
    assert reason.startswith(str(path)) and "\n" not in reason
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


@pytest.mark.parametrize("suffix, cut", [
    (".fits", "header"), (".fits", "data"), (".fits", "last pixel"),
    (".fits.gz", "header"), (".fits.gz", "data"), (".fits.gz", "last pixel"),
    (".fits.fz", "header"), (".fits.fz", "data"),
])
def test_truncated_files(tmp_path: Path, suffix: str, cut: str) -> None:
    """Files cut in the header, in the middle of the data or just before the last pixel."""
    hdu = image_hdu(_physical(np.random.default_rng(9)), wcs_header(0, 0), "f8")
    content = write_hdu(hdu, tmp_path / f"good{suffix}").read_bytes()
    if suffix == ".fits.gz":
        content = gzip.decompress(content)
    header_size = len(hdu.header.tostring())  # a whole number of 2880-byte blocks
    size = {"header": 1000, "data": len(content) // 2,
            "last pixel": header_size + hdu.data.nbytes - 1}[cut]
    truncated = content[:size]
    if suffix == ".fits.gz":  # a complete gzip stream of a truncated FITS file
        truncated = gzip.compress(truncated)
    (tmp_path / f"bad{suffix}").write_bytes(truncated)
    _assert_reason(tmp_path / f"bad{suffix}")


def test_gzip_stream_cut_short(tmp_path: Path) -> None:
    good = write_hdu(image_hdu(_physical(np.random.default_rng(10)), wcs_header(0, 0), "f8"),
                     tmp_path / "good.fits.gz")
    content = good.read_bytes()
    (tmp_path / "bad.fits.gz").write_bytes(content[: len(content) * 2 // 3])
    _assert_reason(tmp_path / "bad.fits.gz")


@pytest.mark.parametrize("content", [b"", b"SIMPLE  =", b"\x00" * 5760, b"hello\n" * 1000,
                                     b"\x1f\x8b\x08garbage"], ids=["empty", "stub", "zeros",
                                                                    "text", "bad gzip"])
def test_not_fits(tmp_path: Path, content: bytes) -> None:
    name = "x.fits.gz" if content.startswith(b"\x1f\x8b") else "x.fits"
    (tmp_path / name).write_bytes(content)
    _assert_reason(tmp_path / name)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _assert_reason(tmp_path / "absent.fits", "not found")
    (tmp_path / "folder.fits").mkdir()
    _assert_reason(tmp_path / "folder.fits", "directory")


@pytest.mark.parametrize("keyword", ["NAXIS1", "NAXIS2", "CRPIX1", "CRPIX2"])
def test_missing_geometry_keyword_is_named(tmp_path: Path, keyword: str) -> None:
    header = fits.PrimaryHDU(np.zeros((30, 40), np.float32), header=wcs_header(0, 0)).header
    cards = [card for card in header.cards if card.keyword != keyword]
    text = "".join(str(card) for card in cards) + "END".ljust(80)
    text += " " * (-len(text) % 2880)
    (tmp_path / "k.fits").write_bytes(text.encode("ascii") + b"\0" * 5760)
    _assert_reason(tmp_path / "k.fits", keyword)


def _with_card(tmp_path: Path, keyword: str, value: str, extra: str = "") -> Path:
    """A float image whose ``keyword`` card holds ``value`` as written (and an extra card)."""
    hdu = fits.PrimaryHDU(np.full((30, 40), 3.0, np.float32), header=wcs_header(0, 0))
    hdu.header[keyword] = 1.0
    hdu.header["SPARE"] = 0
    content = bytearray(_to_bytes(hdu))
    for key, text in ((keyword, value), ("SPARE", extra)):
        start = content.index(key.ljust(8).encode() + b"=")
        card = f"{key.ljust(8)}= {text:>20}" if key == keyword else text
        content[start:start + 80] = card.ljust(80).encode()
    (tmp_path / "v.fits").write_bytes(bytes(content))
    return tmp_path / "v.fits"


@pytest.mark.parametrize("keyword, value", [("CRPIX1", "'abc'"), ("CRPIX2", "'34.5d0'"),
                                            ("CRPIX2", "34.5d0"), ("CRPIX1", "1.0E-400"),
                                            ("CRPIX1", "1.0E400"), ("CRPIX2", "(1.0, 2.0)")])
def test_unusable_keyword_values_are_named(tmp_path: Path, keyword: str, value: str) -> None:
    _assert_reason(_with_card(tmp_path, keyword, value), keyword)


@pytest.mark.parametrize("keyword, value, extra, want", [
    ("CRPIX1", "'12.5'", "", ("crpix1", 12.5)),  # a number as a string: the number
    ("CRPIX2", "T", "", ("crpix2", 1.0)),  # a logical: 1 or 0
    ("CRPIX2", "'1.5 x'", "", ("crpix2", 1.5)),  # strtod: a blank may follow the number
    ("CRPIX2", "''", "", ("crpix2", 0.0)),  # an empty string converts to 0
    ("CRPIX1", "34.5D0", "", ("crpix1", 34.5)),  # an upper-case D exponent
    ("BSCALE", "1.0E-400", "", ("scale", 1.0)),  # underflow: the default
    ("BZERO", "1.0E-310", "", ("zero", 0.0)),
    ("CRPIX1", "7.0", "CRPIX1  =                 9.25", ("crpix1", 9.25)),  # the last card
    ("BSCALE", "'x'", "", ("scale", 1.0)),  # not a number: the default, with a warning
    ("BZERO", "'5.0'", "", ("zero", 0.0)),
    ("BZERO", "T", "", ("zero", 0.0)),
    ("BZERO", "2.0", "BZERO   =                  5.0", ("zero", 5.0)),  # the last card
])
def test_keywords_are_read_as_cfitsio_reads_them_for_montage(tmp_path: Path, keyword, value, extra,
                                                            want) -> None:
    with ImageReader() as reader:
        image = reader.get(str(_with_card(tmp_path, keyword, value, extra)))
        attribute, expected = want
        source = image.geometry if attribute.startswith("crpix") else image
        assert getattr(source, attribute) == expected


def test_one_dimensional_and_empty_images(tmp_path: Path) -> None:
    fits.PrimaryHDU(np.zeros(10, np.float32)).writeto(tmp_path / "line.fits")
    _assert_reason(tmp_path / "line.fits", "no 2-D image")
    fits.PrimaryHDU().writeto(tmp_path / "none.fits")
    _assert_reason(tmp_path / "none.fits", "no 2-D image")


def test_failures_close_the_file(tmp_path: Path) -> None:
    """A header that opens but is unusable must not leave the file open (ResourceWarning)."""
    hdu = fits.PrimaryHDU(np.zeros((30, 40), np.float32))  # no CRPIX
    hdu.writeto(tmp_path / "nocrpix.fits")
    import gc

    for _ in range(3):
        _assert_reason(tmp_path / "nocrpix.fits", "CRPIX1")
    gc.collect()  # an unclosed file would raise ResourceWarning here (warnings are errors)


def _float_blank_file(path: Path) -> Path:
    """A float image with a BLANK keyword: astropy warns about it whenever it opens it."""
    data = np.full((30, 40), -99.0, dtype=np.float32)
    header = fits.PrimaryHDU(data, header=wcs_header(0, 0)).header
    header["BLANK"] = -99
    with open(path, "wb") as stream:  # astropy would warn while writing it, too
        stream.write(header.tostring().encode("ascii"))
        stream.write(data.astype(">f4").tobytes())
        stream.write(b"\0" * (-data.nbytes % 2880))
    return path


def test_float_image_with_blank_keyword_ignores_it_quietly(tmp_path: Path) -> None:
    path = _float_blank_file(tmp_path / "fb.fits")
    np.testing.assert_array_equal(_window(path), np.full((14, 26), -99.0))


def test_concurrent_opens_leave_warning_filters_intact(tmp_path: Path) -> None:
    """Worker threads open files at once; the quiet sections must not garble the filters."""
    paths = [_float_blank_file(tmp_path / f"fb{k}.fits") for k in range(4)]
    before = list(warnings.filters)

    def work(k: int) -> float:
        total = 0.0
        for _ in range(15):
            image = open_image(str(paths[k % 4]))
            total += float(read_window(image, ROWS, COLS).sum())
            image.close()
        return total

    with ThreadPoolExecutor(8) as pool:
        totals = list(pool.map(work, range(16)))
    assert warnings.filters == before
    assert len(set(totals)) == 1


@functools.lru_cache(maxsize=None)
def _fuzz_source(kind: str, fmt: str) -> bytes:
    """A small valid image file's bytes (6x7 pixels, a NaN)."""
    data = _physical(np.random.default_rng(11), (6, 7))
    data[0, 0] = np.nan
    with tempfile.TemporaryDirectory() as folder:
        return write_hdu(image_hdu(data, wcs_header(0, 0), fmt), Path(folder) / f"x{kind}").read_bytes()


@st.composite
def damaged_files(draw) -> tuple[str, bytes]:
    """A small valid FITS image (plain, scaled int16 or a cube; plain, gzip or
    tile-compressed) with a few bytes changed in its headers, and possibly cut short."""
    kind = draw(st.sampled_from([".fits", ".fits.gz", ".fits.fz"]))
    content = bytearray(_fuzz_source(kind, draw(st.sampled_from(["f4", "i2", "cube"]))))
    if kind == ".fits.gz":
        content = bytearray(gzip.decompress(bytes(content)))
    for _ in range(draw(st.integers(0, 8))):
        where = draw(st.integers(0, min(len(content), 2880 * 3) - 1))
        content[where] = draw(st.sampled_from(list(b" =0123456789.-'TEX\x00\xffABCDNS")))
    if draw(st.booleans()):
        content = content[: draw(st.integers(0, len(content)))]
    data = bytes(content)
    return kind, gzip.compress(data) if kind == ".fits.gz" else data


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=damaged_files())
def test_damaged_files_give_reasons_or_pixels(case, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Damaged headers, damaged tile tables, cut files: a reason or pixels, nothing else
    (no other exception, no warning, no runaway memory or endless HDU scan)."""
    kind, content = case
    path = tmp_path_factory.mktemp("damaged") / f"x{kind}"
    path.write_bytes(content)
    try:
        with ImageReader() as reader:
            image = reader.get(str(path))
            rows = slice(0, min(3, image.geometry.naxis2))
            cols = slice(0, min(4, image.geometry.naxis1))
            window = read_window(image, rows, cols)
    except ImageError as error:
        reason = str(error)
        assert reason.startswith(str(path)) and "\n" not in reason
        assert "Warning" not in reason and "Memory" not in reason, reason
        return
    assert window.dtype in (np.float32, np.float64) and window.shape == (rows.stop, cols.stop)


@pytest.mark.parametrize("fmt", ["f4", "f8", "i2", "i4", "u2", "cube-i2"])
def test_plain_files_open_without_astropy_exactly_as_with_it(tmp_path: Path, fmt: str,
                                                              monkeypatch) -> None:
    """The direct header path gives the same geometry, scaling and pixels as astropy's."""
    data = _physical(np.random.default_rng(8))
    path = str(write_hdu(image_hdu(data, wcs_header(2.5, -3), fmt), tmp_path / "a.fits"))
    direct = open_image(path)
    assert direct.hdul is None  # not opened through astropy
    direct_window = read_window(direct, ROWS, COLS)
    monkeypatch.setattr(diffit.fitsio, "_open_plain", lambda path, stream, size: None)
    through_astropy = open_image(path)
    assert through_astropy.hdul is not None
    for name in ("geometry", "ndim", "scale", "zero", "blank"):
        assert getattr(direct, name) == getattr(through_astropy, name), name
    np.testing.assert_array_equal(direct_window, read_window(through_astropy, ROWS, COLS))
    assert read_window(through_astropy, ROWS, COLS).dtype == direct_window.dtype
    through_astropy.close()


@pytest.mark.parametrize("n_comments", [0, 200, 400])
def test_headers_longer_than_the_first_read_open_without_astropy(tmp_path: Path,
                                                                  n_comments: int) -> None:
    """open_image reads HEAD_BYTES first; a longer header is read again in full, still
    without astropy, with the same geometry, scaling and pixels."""
    data = _physical(np.random.default_rng(10))
    hdu = image_hdu(data, wcs_header(1.5, -2), "f8")
    for k in range(n_comments):
        hdu.header.add_comment(f"card {k}")
    path = str(write_hdu(hdu, tmp_path / "long.fits"))
    header_bytes = len(hdu.header.tostring())
    assert (header_bytes > diffit.fitsio.HEAD_BYTES) == (n_comments == 400)
    image = open_image(path)
    assert image.hdul is None and image.stream is None
    with fits.open(path) as reference:
        assert image.geometry.crpix1 == reference[0].header["CRPIX1"]
    np.testing.assert_array_equal(read_window(image, ROWS, COLS), data[ROWS, COLS])


@pytest.mark.parametrize("fmt", ["f4", "i2", "cube-i2"])
def test_row_band_and_window_row_reads_agree(tmp_path: Path, fmt: str, monkeypatch) -> None:
    """Windows read as whole-row bands and row by row (narrow windows) are the same."""
    data = _physical(np.random.default_rng(9))
    path = str(write_hdu(image_hdu(data, wcs_header(0, 0), fmt), tmp_path / "a.fits"))
    windows = [(ROWS, COLS), (slice(0, 30), slice(39, 40)), (slice(29, 30), slice(0, 40)),
               (slice(0, 30, 2), slice(1, 5))]
    with ImageReader() as reader:
        banded = [read_window(reader.get(path), *w) for w in windows]
    monkeypatch.setattr(diffit._fitsread, "BAND_FACTOR", 0)
    monkeypatch.setattr(diffit._fitsread, "BAND_BYTES", 0)
    with ImageReader() as reader:
        by_rows = [read_window(reader.get(path), *w) for w in windows]
    for (rows, cols), a, b in zip(windows, banded, by_rows):
        np.testing.assert_array_equal(a, b)
        expected = _window(Path(path), rows, cols)
        np.testing.assert_array_equal(a, expected)


@pytest.mark.parametrize("by_rows", [False, True])
def test_a_file_that_shrinks_after_it_was_opened_reads_as_truncated(tmp_path: Path, monkeypatch,
                                                                   by_rows: bool) -> None:
    """Nothing is mapped: an image cut short while a run reads it fails its pair (a map
    of the narrow-window path once killed the whole process with SIGBUS)."""
    data = _physical(np.random.default_rng(11))
    path = write_hdu(image_hdu(data, wcs_header(0, 0), "f4"), tmp_path / "a.fits")
    if by_rows:
        monkeypatch.setattr(diffit._fitsread, "BAND_FACTOR", 0)
        monkeypatch.setattr(diffit._fitsread, "BAND_BYTES", 0)
    with ImageReader() as reader:
        image = reader.get(str(path))
        with open(path, "r+b") as stream:
            stream.truncate(os.path.getsize(path) // 2)
        with pytest.raises(ImageError, match="a.fits: the file is truncated"):
            read_window(image, slice(20, 30), slice(0, 40))


def test_unscaled_float_images_keep_their_precision(tmp_path: Path) -> None:
    """Single-precision pixels come back as float32 (widening later is exact)."""
    data = _physical(np.random.default_rng(10)).astype(np.float32)
    for fmt, dtype in (("f4", np.float32), ("f8", np.float64)):
        path = write_hdu(image_hdu(data, wcs_header(0, 0), fmt), tmp_path / f"{fmt}.fits")
        window = _window(path, slice(0, 30), slice(0, 40))
        assert window.dtype == dtype and window.flags.c_contiguous
        np.testing.assert_array_equal(window, data.astype(dtype))


@pytest.mark.parametrize("fmt", ["f4", "f8"])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("path_kind", ["band", "rows", "gzip"])
def test_float_pixels_are_screened_as_cfitsio_does(tmp_path: Path, monkeypatch, fmt, scaled,
                                                   path_kind) -> None:
    """As Montage reads images (CFITSIO with a null value): NaN and infinities become
    NaN; zeros of either sign and subnormal values become +0.0, or BZERO when scaled;
    the smallest normal values are kept."""
    dtype = np.dtype(fmt)
    tiny = float(np.finfo(dtype).tiny)
    specials = [-0.0, 0.0, tiny / 2, -tiny / 4, float(np.nextafter(dtype.type(tiny), dtype.type(0))),
                tiny, -tiny, np.inf, -np.inf, np.nan, 1.5]
    data = np.full((6, 40), 2.0, dtype=dtype)
    data[2, :len(specials)] = specials
    header = wcs_header(0, 0)
    if scaled:
        header["BSCALE"] = 2.0
        header["BZERO"] = -3.0
    hdu = fits.PrimaryHDU(data.astype(">" + fmt), header=header)
    if scaled:  # astropy would rescale the data on writing: keep the raw values as given
        hdu.header["BSCALE"] = 2.0
        hdu.header["BZERO"] = -3.0
    name = tmp_path / ("img.fits.gz" if path_kind == "gzip" else "img.fits")
    hdu.writeto(name, output_verify="silentfix")
    if path_kind == "rows":
        monkeypatch.setattr(diffit._fitsread, "BAND_FACTOR", 0)
        monkeypatch.setattr(diffit._fitsread, "BAND_BYTES", 0)
    with ImageReader() as reader:
        window = read_window(reader.get(str(name)), slice(2, 3), slice(0, 20))[0]
    scale, zero = (2.0, -3.0) if scaled else (1.0, 0.0)
    want = [zero, zero, zero, zero, zero, tiny * scale + zero, -tiny * scale + zero,
            np.nan, np.nan, np.nan, 1.5 * scale + zero]
    got = [float(v) for v in window[:len(specials)]]
    np.testing.assert_array_equal(got, want)
    if not scaled:
        assert not any(np.signbit(v) for v in got[:5])  # +0.0, never -0.0
