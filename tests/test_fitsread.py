"""The compiled window reader (``diffit._fitsread``): the same values as numpy's
conversion of the raw data (with CFITSIO's screen of float pixels) for every BITPIX,
scaling and BLANK, any window; errors as exceptions the caller words; file signatures as
:func:`os.stat` gives them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffit import _fitsread

BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def write_raw(path: Path, raw: np.ndarray, offset: int = 2880, tail: int = 0) -> int:
    """Write ``raw`` (big-endian) after ``offset`` bytes of padding; returns the data size."""
    data = raw.tobytes()
    path.write_bytes(b"\0" * offset + data + b"\0" * tail)
    return len(data)


def cfitsio_classes(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CFITSIO's screen of float pixels, from their bits: (NaN or infinity, zero or subnormal)."""
    if raw.dtype.kind != "f":
        none = np.zeros(raw.shape, dtype=bool)
        return none, none
    bits = raw.view(">u4" if raw.dtype.itemsize == 4 else ">u8").astype(np.uint64)
    mask = np.uint64(0x7F800000 if raw.dtype.itemsize == 4 else 0x7FF0000000000000)
    exponent = bits & mask
    return exponent == mask, exponent == 0


def reference(raw: np.ndarray, scale: float, zero: float, blank: int | None) -> np.ndarray:
    """numpy's conversion with CFITSIO's screen of float pixels (NaN and infinities to
    NaN, zeros and subnormals to +0.0, or BZERO when scaled), as Montage reads images."""
    nan_or_inf, underflow = cfitsio_classes(raw)
    if raw.dtype.kind == "f" and scale == 1.0 and zero == 0.0:
        values = raw.astype(raw.dtype.newbyteorder("="))
        values[underflow] = 0.0
        values[nan_or_inf] = np.nan
        return values
    values = np.asarray(raw, dtype=np.float64)
    if scale != 1.0 or zero != 0.0:
        with np.errstate(all="ignore"):
            values = values * scale + zero
    else:
        values = values.copy()
    if blank is not None and raw.dtype.kind in "iu":
        values[raw == blank] = np.nan
    values[underflow] = zero
    values[nan_or_inf] = np.nan
    return values


def raw_values(draw, bitpix: int, shape: tuple[int, int]) -> np.ndarray:
    dtype = np.dtype(BITPIX_DTYPES[bitpix])
    if dtype.kind == "f":
        tiny = float(np.finfo(dtype).tiny)  # the smallest normal value: kept
        special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 3.4e38,
                                   tiny, -tiny, tiny * (1 - 2.0 ** -20), 5e-324, -1e-310])
        values = st.one_of(st.floats(width=8 * dtype.itemsize, allow_nan=False), special)
    else:
        info = np.iinfo(dtype)
        values = st.integers(int(info.min), int(info.max))
    flat = draw(st.lists(values, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    return np.array(flat, dtype=dtype).reshape(shape)


@st.composite
def cases(draw):
    bitpix = draw(st.sampled_from(sorted(BITPIX_DTYPES)))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 7)))
    raw = raw_values(draw, bitpix, shape)
    row0 = draw(st.integers(0, shape[0]))
    row1 = draw(st.integers(row0, shape[0]))
    col0 = draw(st.integers(0, shape[1]))
    col1 = draw(st.integers(col0, shape[1]))
    scale, zero = draw(st.sampled_from([(1.0, 0.0), (1.0, 32768.0), (0.5, 0.0), (0.01, -3.25),
                                        (1e300, 1e300)]))
    blank = None
    if bitpix > 0 and draw(st.booleans()):
        blank = int(raw.flat[draw(st.integers(0, raw.size - 1))]) if draw(st.booleans()) else -1
    return bitpix, raw, (row0, row1, col0, col1), scale, zero, blank


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_windows_convert_as_numpy_does(tmp_path: Path, case, monkeypatch) -> None:
    """Bit for bit, with the GIL released and with it kept (small windows keep it,
    NOGIL_MIN_BYTES)."""
    bitpix, raw, (row0, row1, col0, col1), scale, zero, blank = case
    path = tmp_path / "image.fits"
    size = write_raw(path, raw, offset=2880, tail=17)
    want = reference(raw, scale, zero, blank)[row0:row1, col0:col1]
    for threshold in (0, 1 << 62):  # always released, always kept
        monkeypatch.setattr(_fitsread, "NOGIL_MIN_BYTES", threshold)
        got = _fitsread.read_window(str(path), 2880, bitpix, raw.shape[1], size,
                                    row0, row1, col0, col1, scale, zero, blank)
        assert got.dtype == want.dtype and got.dtype.isnative
        assert got.shape == want.shape
        # bit for bit, NaN payloads and signed zeros included
        assert got.tobytes() == want.tobytes()


def test_window_of_a_later_row_band(tmp_path: Path) -> None:
    raw = np.arange(12 * 9, dtype=">f8").reshape(12, 9)
    size = write_raw(tmp_path / "a.fits", raw, offset=5760)
    got = _fitsread.read_window(str(tmp_path / "a.fits"), 5760, -64, 9, size, 7, 11, 2, 5,
                                1.0, 0.0, None)
    np.testing.assert_array_equal(got, raw[7:11, 2:5])


def test_truncated_file(tmp_path: Path) -> None:
    raw = np.ones((4, 5), dtype=">f4")
    size = write_raw(tmp_path / "t.fits", raw)
    os.truncate(tmp_path / "t.fits", 2880 + size - 1)
    with pytest.raises(_fitsread.TruncatedFile):
        _fitsread.read_window(str(tmp_path / "t.fits"), 2880, -32, 5, size, 0, 1, 0, 5, 1.0, 0.0, None)


def test_missing_file_is_an_oserror_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "gone.fits")
    with pytest.raises(FileNotFoundError) as error:
        _fitsread.read_window(path, 0, -32, 5, 100, 0, 1, 0, 5, 1.0, 0.0, None)
    assert error.value.filename == path


def test_a_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        _fitsread.read_window(str(tmp_path), 0, -32, 5, 0, 0, 1, 0, 5, 1.0, 0.0, None)


@pytest.mark.parametrize("bad", [dict(bitpix=12), dict(col1=6), dict(row0=2, row1=1)])
def test_bad_arguments(tmp_path: Path, bad: dict) -> None:
    args = dict(path=str(tmp_path / "x.fits"), data_offset=0, bitpix=-32, naxis1=5,
                data_bytes=100, row0=0, row1=1, col0=0, col1=5, scale=1.0, zero=0.0, blank=None)
    args.update(bad)
    with pytest.raises(ValueError):
        _fitsread.read_window(*args.values())


def test_signature_is_what_os_stat_gives(tmp_path: Path) -> None:
    path = tmp_path / "s.fits"
    path.write_bytes(b"x" * 100)
    st_ = os.stat(path)
    assert _fitsread.signature(str(path)) == (st_.st_dev, st_.st_ino, st_.st_size,
                                              st_.st_mtime_ns, st_.st_ctime_ns)
    assert _fitsread.signature(path) == _fitsread.signature(str(path))  # path-like
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))
    assert _fitsread.signature(str(path))[3] == st_.st_mtime_ns + 1


@pytest.mark.parametrize("bad", ["", "no/such/file", "nul\0byte", 12.5, None])
def test_signature_of_what_cannot_be_stat_ed_is_none(bad) -> None:
    assert _fitsread.signature(bad) is None


def test_read_head_gives_the_start_size_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "h.fits"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    assert _fitsread.read_head(str(path), 100) == ("file", 10240, bytes(range(100)))
    assert _fitsread.read_head(str(path), 20000) == ("file", 10240, path.read_bytes())
    assert _fitsread.read_head(str(path), 0) == ("file", 10240, b"")
    (tmp_path / "empty.fits").write_bytes(b"")
    assert _fitsread.read_head(str(tmp_path / "empty.fits"), 2880) == ("file", 0, b"")
    assert _fitsread.read_head(str(tmp_path), 2880) == ("directory", 0, b"")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_read_head_does_not_open_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    assert _fitsread.read_head(str(fifo), 2880) == ("other", 0, b"")  # returns: never blocks


def test_read_head_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.fits")
    with pytest.raises(FileNotFoundError) as error:
        _fitsread.read_head(missing, 2880)
    assert error.value.filename == missing
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        _fitsread.read_head(str(tmp_path / "file" / "below.fits"), 2880)
    with pytest.raises(ValueError):
        _fitsread.read_head(str(tmp_path / "nul\0.fits"), 2880)
