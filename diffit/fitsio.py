"""Reading image windows from FITS files (the only module that opens input images).

An :class:`ImageReader` opens each file once, keeps a small LRU cache of open files
(a worker's pairs share images), and reads only the requested window: the rows it spans
for plain files (one GIL-free compiled call, :mod:`diffit._fitsread`), tile by tile for
tile-compressed (``.fits.fz``) images, whole and once for gzip- or bzip2-compressed
files (recognised by their content, whatever their name; a stream cannot be windowed).
Pixel values are converted as CFITSIO converts them for Montage: ``raw*BSCALE + BZERO``
in double precision, with integer ``BLANK`` values becoming NaN, and only the first
plane of a cube.

A plain file whose primary header is standard (see :mod:`diffit.fitsheader`) is opened
without astropy: its header is parsed directly and its data offset computed, which is
about 5 times faster (0.2 against 1.2 ms per file) and leaves astropy unimported in a
run over plain files. Every
other file -- compressed, with the image in an extension, with an odd header, or with
any problem at all -- goes through astropy, which then also words the error.

Files that astropy opens are opened with ``do_not_scale_image_data=True`` for every kind of HDU
(astropy's own scaling would produce float32 for 16-bit integers and lose precision),
so :func:`read_window` always receives the raw stored values and scales them itself.
Tile-compressed images are decompressed by astropy (including the dequantisation of
lossy float compression), which in this mode leaves ``BSCALE``/``BZERO``/``BLANK``
to us as well.

Nothing here raises anything but :class:`ImageError` for a bad file, and no astropy
warning about an odd input escapes: a file that cannot be used becomes a one-line
reason naming the file. astropy warns while it parses headers, so headers are parsed
inside :func:`quiet_astropy`; ``warnings.catch_warnings`` changes process-wide state,
so those sections are serialised by a lock (workers may be threads). Pixel reads need
no warning filter and run concurrently.
"""
from __future__ import annotations

import atexit
import bz2
import gzip
import io
import logging
import math
import os
import re
import stat
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffit import _fitsread
from diffit.fitsheader import NotSimple, cfitsio_c2d, cfitsio_c2dd, cfitsio_value_text, read_header
from diffit.geometry import GridGeometry

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # astropy is imported only when a file needs it
    from astropy.io import fits


def _astropy_fits():
    """``astropy.io.fits``, imported on first use (the import takes about 0.5 s)."""
    from astropy.io import fits

    return fits


class ImageError(Exception):
    """An input image that cannot be used; the message names the file and the problem."""


_QUIET_LOCK = threading.RLock()


@contextmanager
def quiet_astropy() -> Iterator[None]:
    """Ignore warnings (astropy's about odd headers) inside the block, thread-safely.

    ``warnings.catch_warnings`` saves and restores the process-wide filter list, so two
    threads interleaving it could leave warnings silenced for good; the lock prevents
    that. Keep the blocks short: header parsing and file opening, not pixel reading.
    """
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class OpenImage:
    """An open image HDU with what is needed to read windows of it.

    Attributes
    ----------
    path : str
        The file, as given.
    geometry : GridGeometry
        NAXIS1/2 and CRPIX1/2 of the image.
    header : dict or astropy.io.fits.Header
        The image header's keyword values (for tile-compressed files, the uncompressed
        image's header); a ``dict`` when the file was opened without astropy.
    ndim : int
        NAXIS; windows are read from the first plane of the leading axes.
    scale, zero : float
        BSCALE and BZERO.
    blank : int or None
        BLANK of an integer image (those pixels read as NaN).
    whole : numpy.ndarray or None
        The first plane in physical values, for files read whole (gzip).
    checks : dict
        Results of checks made on this image (e.g. against a template), by key, so
        that they are made once per open file rather than once per pair.
    tiled : bool
        The image is tile-compressed (windows are decompressed tile by tile).
    layout : tuple or None
        ``(dtype, shape, data offset)`` of an uncompressed image's data in its file.
    """

    path: str
    geometry: GridGeometry
    header: Any
    hdul: "fits.HDUList | None" = field(repr=False)
    hdu: object = field(repr=False)
    ndim: int
    scale: float
    zero: float
    blank: int | None
    whole: np.ndarray | None = field(default=None, repr=False)
    stream: object = field(default=None, repr=False)
    checks: dict = field(default_factory=dict, repr=False)
    layout: tuple | None = field(default=None, repr=False)
    tiled: bool = False

    def close(self) -> None:
        """Close the file now (it is also closed once the image is no longer used)."""
        self.whole = None
        if self.hdul is None and self.stream is None:  # read without astropy: nothing open
            return
        _close_handles(self.hdul, self.stream)

    def close_when_unused(self) -> None:
        """Close the file when the last reference to this image goes, not before: the
        cache drops images that other threads may still be reading."""
        if self.hdul is not None or self.stream is not None:
            weakref.finalize(self, _close_handles, self.hdul, self.stream)


def _close_handles(*closables: object) -> None:
    """Close astropy's HDU list and our stream, quietly."""
    with quiet_astropy():
        for closable in closables:
            try:
                if closable is not None:
                    closable.close()  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover - closing a broken file
                pass


#: How many HDUs to look through for the image (the primary array, or the first image
#: extension, as in a ``.fits.fz`` file); a corrupt file must not be scanned for ever.
MAX_HDUS = 8


def _image_hdu(hdul: "fits.HDUList"):
    """The first HDU holding an image: the primary array, else the first image extension.

    Stops at the first HDU astropy cannot parse (its iteration over a damaged gzip
    stream may otherwise never end).
    """
    fits = _astropy_fits()
    for index, hdu in enumerate(hdul):
        if index >= MAX_HDUS or type(hdu).__name__ == "_CorruptedHDU":
            return None
        if isinstance(hdu, fits.CompImageHDU):
            return hdu
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)) and _int_value(hdu.header, "NAXIS") >= 2:
            return hdu
    return None


def _int_value(header, key: str) -> int:
    value = header.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _last_card(header, key: str) -> str | None:
    """The text of the last ``key`` card (None when there is none)."""
    if hasattr(header, "last_card"):  # diffit's own parser
        return header.last_card(key)
    images = [card.image for card in header.cards if card.keyword == key]  # astropy
    return images[-1] if images else None


def _keyword(header, key: str, path: str, kind: type) -> float | int:
    """A required numeric keyword, or an :class:`ImageError` naming the file and keyword."""
    if key not in header:
        raise ImageError(f"{path}: no {key} keyword in the header")
    return _number(header[key], key, path, kind)


def _number(value: object, key: str, path: str, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ImageError(f"{path}: {key} = {value!r} is not a number")
    if kind is int and not isinstance(value, int):
        raise ImageError(f"{path}: {key} = {value!r} is not a whole number")
    value = kind(value)
    if kind is float and not math.isfinite(value):
        raise ImageError(f"{path}: {key} is not finite")
    return value


def _crpix(header, key: str, path: str) -> float:
    """CRPIXn as CFITSIO reads it for Montage (``fits_read_keys_dbl``): from the last card
    of the keyword (it scans the whole header), converted as ``ffc2d`` converts it (a
    number written as a string is the number, a logical 1 or 0)."""
    card = _last_card(header, key) if key in header else None
    if card is None:
        raise ImageError(f"{path}: no {key} keyword in the header")
    text = cfitsio_value_text(card)
    try:
        return cfitsio_c2d(text)
    except ValueError:
        raise ImageError(f"{path}: {key} = {text} is not a number") from None


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _blank(header) -> int | None:
    """BLANK of an integer image (None for float images or an unusable BLANK)."""
    if _int_value(header, "BITPIX") <= 0:
        return None  # CFITSIO ignores BLANK for floating-point images
    blank = header.get("BLANK")
    if isinstance(blank, bool) or not isinstance(blank, int):
        return None
    return blank


def header_scaling(header, path: str = "", *, template: bool = False) -> tuple[float, float]:
    """BSCALE and BZERO as CFITSIO reads them when it opens an image for Montage: from
    the last card of each (it reads every card), converted as ``ffc2dd`` converts them,
    and a value it cannot convert (a string, a logical, out of range) as the default
    1 or 0, with only a warning. With ``template``, the cards are a text template's,
    as CFITSIO's template writer puts them in a file (a ``d`` exponent becomes ``D``)."""
    values = []
    for key, default in (("BSCALE", 1.0), ("BZERO", 0.0)):
        card = _last_card(header, key) if key in header else None
        value = default
        if card is not None:
            text = cfitsio_value_text(card)
            if template and text[:1] != "'" and "D" not in text:
                text = text.replace("d", "D", 1)
            try:
                value = cfitsio_c2dd(text)
            except ValueError:
                log.debug("%s: %s = %s is not a number; %s is used, as CFITSIO does",
                          path, key, text, default)
        values.append(float(value))
    return values[0], values[1]


def open_image(path: str) -> OpenImage:
    """Open a FITS image and read its geometry.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    OpenImage

    Raises
    ------
    ImageError
        The file is missing, not FITS, truncated or corrupt, holds no 2-D image, or
        lacks (or has unusable) NAXISn/CRPIXn/BSCALE/BZERO keywords.
    """
    try:
        kind, size, head = _fitsread.read_head(path, HEAD_BYTES)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as error:  # a loop of symbolic links, a file in place of a folder, ...
        raise ImageError(f"{path}: cannot be opened ({error.strerror or _describe(error)})") from None
    except (TypeError, ValueError):
        raise ImageError(f"{path!r}: not a usable file name") from None
    if kind == "directory":
        raise ImageError(f"{path}: is a directory, not a FITS file")
    if kind != "file":  # a FIFO would block the worker for ever
        raise ImageError(f"{path}: not a regular file (a pipe, device or socket)")
    # Most images: the header is in the bytes just read, parsed without astropy.
    image = _plain_or_none(path, io.BytesIO(head), size)
    if image is not None:
        return image
    # Our own file object: astropy leaves a file it opened itself open when it then
    # fails to parse it; this one is closed on every failure.
    stream = _open_regular(path)
    if len(head) == HEAD_BYTES:  # a header longer than that, or a changed file: read it all
        try:
            image = _plain_or_none(path, stream, os.fstat(stream.fileno()).st_size)
        except ImageError:
            stream.close()
            raise
        if image is not None:
            stream.close()
            return image
    hdul = None
    try:
        stream.seek(0)
        stream, compressed = _decompressed(path, stream)
        fits = _astropy_fits()
        with quiet_astropy():
            hdul = fits.open(stream, memmap=not compressed, do_not_scale_image_data=True,
                             lazy_load_hdus=True)
            image = _inspect(path, hdul, stream)
        if compressed:
            # Read whole anyway: convert the first plane once (outside the lock: this is
            # the slow part, and it does not warn), then drop the decompressed bytes.
            image.whole = _plane(image, image.hdu.data)
            with quiet_astropy():
                hdul.close()
            image.hdu = image.stream = image.hdul = None
        image.close_when_unused()
        return image
    except Exception as error:  # astropy raises OSError, ValueError, TypeError, EOFError, ...
        with quiet_astropy():
            for closable in (hdul, stream):
                try:
                    if closable is not None:
                        closable.close()
                except Exception:  # pragma: no cover - closing a broken file
                    pass
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{path}: not a readable FITS file ({_describe(error)})") from None


def _open_regular(path: str) -> io.BufferedReader:
    """A binary file object of a regular file (non-blocking open: a FIFO put in the
    file's place since it was looked at must not hang the worker)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise ImageError(f"{path}: cannot be opened ({error.strerror or _describe(error)})") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        raise ImageError(f"{path}: not a regular file (a pipe, device or socket)")
    return open(fd, "rb", closefd=True)  # noqa: SIM115 - kept open with the image


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


#: How much of a file's start :func:`open_image` reads at first: enough for the header
#: of nearly every image (8 blocks, 288 cards); longer ones are read again in full.
HEAD_BYTES = 8 * 2880


def _plain_or_none(path: str, stream, size: int) -> OpenImage | None:
    """:func:`_open_plain`, with None for every problem except an unusable keyword
    (an ImageError, raised)."""
    try:
        return _open_plain(path, stream, size)
    except (NotSimple, OSError, ValueError, OverflowError):
        return None  # astropy decides (and words any error)


def _open_plain(path: str, stream, size: int) -> OpenImage | None:
    """Open a plain FITS file with a standard primary image header, without astropy.

    ``stream`` is positioned at the file's start and ``size`` is the file's size.
    Returns None (and so does every problem, as an exception the caller catches) for
    anything else: the file then goes through astropy.
    """
    header, offset = read_header(stream)
    bitpix = header.get("BITPIX")
    naxis = header.get("NAXIS")
    if (not isinstance(bitpix, int) or isinstance(bitpix, bool) or bitpix not in _BITPIX_DTYPES
            or not _positive_int(naxis) or naxis < 2):  # type: ignore[operator]
        return None
    axes = [header.get(f"NAXIS{axis}") for axis in range(1, naxis + 1)]  # type: ignore[operator]
    if not all(_positive_int(length) for length in axes):
        return None
    if header.get("GCOUNT", 1) != 1 or header.get("PCOUNT", 0) != 0 or header.get("GROUPS", False):
        return None
    dtype = np.dtype(_BITPIX_DTYPES[bitpix])
    if size < offset + dtype.itemsize * math.prod(axes):  # type: ignore[arg-type]
        return None  # truncated: astropy's path words it
    geometry = _geometry(header, path, axes[0], axes[1])  # type: ignore[arg-type]
    scale, zero = header_scaling(header, path)
    return OpenImage(path=path, geometry=geometry, header=header, hdul=None, hdu=None,
                     ndim=naxis, scale=scale, zero=zero, blank=_blank(header),  # type: ignore[arg-type]
                     layout=(dtype, tuple(reversed(axes)), offset))


def _geometry(header, path: str, naxis1: int, naxis2: int) -> GridGeometry:
    """The image's size and its CRPIX1/2 (ImageError naming a missing or bad CRPIX)."""
    return GridGeometry(naxis1=naxis1, naxis2=naxis2,
                        crpix1=_crpix(header, "CRPIX1", path),
                        crpix2=_crpix(header, "CRPIX2", path))


#: Magic numbers of the stream compressions read whole (``.fits.gz``, ``.fits.bz2``).
_STREAM_MAGIC = ((b"\x1f\x8b", gzip), (b"BZh", bz2))


def _decompressed(path: str, stream) -> tuple[object, bool]:
    """The file itself, or its decompressed bytes in memory for a gzip/bzip2 stream.

    Decompressing here (rather than letting astropy do it) gives the true size of the
    FITS content, so that a damaged header cannot make the reader allocate whatever its
    NAXISn claim, and turns a truncated or corrupt stream into a clear reason.
    """
    magic = stream.read(3)
    stream.seek(0)
    for prefix, module in _STREAM_MAGIC:
        if magic.startswith(prefix):
            try:
                raw = module.decompress(stream.read())
            except Exception as error:  # OSError, EOFError, zlib.error, ...
                raise ImageError(f"{path}: corrupt or truncated {module.__name__} stream"
                                 f" ({_describe(error)})") from None
            finally:
                stream.close()
            return io.BytesIO(raw), True
    return stream, False


def _stream_size(stream) -> int:
    if isinstance(stream, io.BytesIO):
        return stream.getbuffer().nbytes
    return os.fstat(stream.fileno()).st_size


def _inspect(path: str, hdul: "fits.HDUList", stream) -> OpenImage:
    """Geometry and scaling of the image in an open file (inside :func:`quiet_astropy`)."""
    fits = _astropy_fits()
    hdu = _image_hdu(hdul)
    if hdu is None:
        raise ImageError(f"{path}: no 2-D image in the file")
    header = hdu.header
    naxis = _keyword(header, "NAXIS", path, int)
    if naxis < 2:
        raise ImageError(f"{path}: NAXIS = {naxis}, not a 2-D image")
    naxis1 = _keyword(header, "NAXIS1", path, int)
    naxis2 = _keyword(header, "NAXIS2", path, int)
    for key in (f"NAXIS{k}" for k in range(3, naxis + 1)):
        if _int_value(header, key) <= 0:
            raise ImageError(f"{path}: {key} must be a positive whole number")
    if naxis1 <= 0 or naxis2 <= 0:
        raise ImageError(f"{path}: the image has no pixels (NAXIS1={naxis1}, NAXIS2={naxis2})")
    geometry = _geometry(header, path, naxis1, naxis2)
    scale, zero = header_scaling(header, path)
    size = _stream_size(stream)
    tiled = isinstance(hdu, fits.CompImageHDU)
    if tiled:
        _check_tiles(path, hdu, size)
    else:
        _check_complete(path, hdu, size)
        if not isinstance(stream, io.BytesIO):
            hdu.data  # noqa: B018 - creates the memory map here, where warnings are off
    return OpenImage(path=path, geometry=geometry, header=header, hdul=hdul, hdu=hdu,
                     ndim=naxis, scale=scale, zero=zero, blank=_blank(header), stream=stream,
                     tiled=tiled)


def _check_complete(path: str, hdu, size: int) -> None:
    """Reject a file that ends before its image data do, as CFITSIO does on open.

    Without this, a truncated file would fail only for pairs whose window reaches the
    missing part of the memory map (and with a less helpful message), and a damaged
    NAXISn could make the reader allocate far more memory than the file holds.
    """
    offset = getattr(hdu, "_data_offset", None)
    needed = getattr(hdu, "size", None)
    if not isinstance(offset, int) or not isinstance(needed, int):  # pragma: no cover - astropy internals
        return
    if size < offset + needed:
        raise ImageError(f"{path}: the file is truncated ({size} bytes; its image needs {offset + needed})")


def _check_tiles(path: str, hdu, size: int) -> None:
    """Check a tile-compressed image's table against its image size and the file size.

    The number of tiles must be what ZNAXISn and ZTILEn imply, and the compressed data
    must fit in the file; otherwise damaged keywords could make decompression allocate
    huge tiles or read past the end.
    """
    table = getattr(hdu, "_bintable", None)
    if table is None:  # pragma: no cover - astropy internals
        return
    header = table.header
    naxis = _int_value(header, "ZNAXIS")
    tiles = 1
    for axis in range(1, naxis + 1):
        length = _int_value(header, f"ZNAXIS{axis}")
        tile = header.get(f"ZTILE{axis}", length if axis == 1 else 1)
        if length <= 0 or isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
            raise ImageError(f"{path}: corrupt tile-compressed image (ZNAXIS{axis}/ZTILE{axis})")
        tiles *= -(-length // tile)
    rows = _int_value(header, "NAXIS2")
    if naxis < 2 or tiles != rows:
        raise ImageError(f"{path}: corrupt tile-compressed image ({rows} tiles stored,"
                         f" {tiles} expected from ZNAXISn/ZTILEn)")
    _check_complete(path, table, size)


def _plane(image: OpenImage, data) -> np.ndarray:
    """Convert raw (possibly 3-D) data to the first 2-D plane in float64 physical values."""
    if data is None:
        raise ImageError(f"{image.path}: the image has no data")
    while data.ndim > 2:
        data = data[0]
    expected = (image.geometry.naxis2, image.geometry.naxis1)
    if data.shape != expected:
        raise ImageError(f"{image.path}: the data are {data.shape[1]}x{data.shape[0]} pixels,"
                         f" the header says {expected[1]}x{expected[0]}")
    return _to_physical(image, data)


def _to_physical(image: OpenImage, raw: np.ndarray) -> np.ndarray:
    """``raw*BSCALE + BZERO`` in double precision, integer BLANK pixels as NaN.

    Unscaled floating-point pixels are returned in their own precision, in native byte
    order (a fresh array): single-precision values widen to double exactly wherever
    they are used, so there is no need to spend twice the memory traffic on them here.
    Floating-point pixels are screened as CFITSIO screens them when Montage reads an
    image: NaN and infinities become NaN, zeros of either sign and subnormal values
    become +0.0 (BZERO when the image is scaled).
    """
    scaled = image.scale != 1.0 or image.zero != 0.0
    if raw.dtype.kind == "f":
        native = raw.astype(raw.dtype.newbyteorder("="))
        with np.errstate(invalid="ignore"):
            underflow = np.abs(native) < np.finfo(native.dtype).tiny  # NaN: False
        blank = ~np.isfinite(native)
        if not scaled:
            native[underflow] = 0.0
            native[blank] = np.nan
            return native
        with np.errstate(all="ignore"):  # an absurd BSCALE overflows to inf, quietly
            values = native.astype(np.float64) * image.scale + image.zero
        values[underflow] = image.zero
        values[blank] = np.nan
        return values
    values = np.asarray(raw, dtype=np.float64)
    if scaled:
        with np.errstate(all="ignore"):
            values = values * image.scale + image.zero
    elif values is raw:
        values = values.copy()
    if image.blank is not None and raw.dtype.kind in "iu":
        values[raw == image.blank] = np.nan
    return values


_BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _read_plain(image: OpenImage, index: tuple) -> np.ndarray:
    """A window of an uncompressed image, read without keeping anything mapped.

    The rows the window spans (or, for a narrow window of very wide rows, each row's
    part of it) are read and converted in one compiled call that holds no GIL (see
    :mod:`diffit._fitsread`): cheaper than mapping the file and faulting its pages in,
    a single point where worker threads meet, and safe against a file that shrinks while
    it is read (a map would then kill the process with SIGBUS). Nothing of the file stays
    in the process's memory, however many images are open and however large they are.
    """
    if image.layout is None:  # parsed once per open file: header lookups are slow
        header = image.hdu.header
        image.layout = (np.dtype(_BITPIX_DTYPES[int(header["BITPIX"])]),
                        tuple(int(header[f"NAXIS{axis}"]) for axis in range(image.ndim, 0, -1)),
                        image.hdu.fileinfo()["datLoc"])
    dtype, shape, offset = image.layout
    row0, row1, step = index[-2].indices(shape[-2])
    col0, col1, col_step = index[-1].indices(shape[-1])
    if step != 1 or col_step != 1:  # not what diffit asks for: read the span, then pick
        picked_rows = np.arange(row0, row1, step)
        picked_cols = np.arange(col0, col1, col_step)
        if picked_rows.size == 0 or picked_cols.size == 0:
            empty = _read_plain(image, index[:-2] + (slice(0, 0), slice(0, 0)))  # its dtype
            return np.empty((picked_rows.size, picked_cols.size), dtype=empty.dtype)
        top, left = picked_rows.min(), picked_cols.min()
        span = _read_plain(image, index[:-2] + (slice(top, picked_rows.max() + 1),
                                                slice(left, picked_cols.max() + 1)))
        return span[np.ix_(picked_rows - top, picked_cols - left)]
    # The window lies in the first plane, which starts where the data do.
    bitpix = 8 * dtype.itemsize * (-1 if dtype.kind == "f" else 1)
    try:
        return _fitsread.read_window(image.path, offset, bitpix, shape[-1],
                                     dtype.itemsize * math.prod(shape),
                                     row0, max(row0, row1), col0, max(col0, col1),
                                     image.scale, image.zero, image.blank)
    except _fitsread.TruncatedFile:
        raise ImageError(f"{image.path}: the file is truncated") from None


def read_window(image: OpenImage, rows: slice, cols: slice) -> np.ndarray:
    """Physical pixel values of ``image`` over a window (first plane for cubes).

    Parameters
    ----------
    image : OpenImage
        The open image.
    rows, cols : slice
        The window, 0-based and inside the image.

    Returns
    -------
    numpy.ndarray
        Physical values, NaN where the image is blank: float64, or float32 for an
        unscaled single-precision image (exactly the same values).

    Raises
    ------
    ImageError
        The file is truncated or its data cannot be decoded.
    """
    expected = (len(range(*rows.indices(image.geometry.naxis2))),
                len(range(*cols.indices(image.geometry.naxis1))))
    try:
        if image.whole is not None:
            window = image.whole[rows, cols]
        else:
            lead = (0,) * (image.ndim - 2)
            if image.tiled:
                # Tile-compressed: .section decompresses only the tiles the window touches.
                raw = image.hdu.section[lead + (rows, cols)]
            else:
                raw = None
                window = _read_plain(image, lead + (rows, cols))
            if raw is not None:
                window = _to_physical(image, np.asarray(raw))
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"{image.path}: cannot read pixels ({_describe(error)})") from None
    if window.shape != expected:
        raise ImageError(f"{image.path}: cannot read pixels (got a {window.shape[-1]}x"
                         f"{window.shape[0]} window, expected {expected[1]}x{expected[0]})")
    return window


def _signature(path: str) -> tuple[int, ...] | None:
    """What identifies a file's current content cheaply (None when it cannot be stat-ed)."""
    return _fitsread.signature(path)


def file_exists(path: str) -> bool:
    """Whether ``path`` can be stat-ed (:func:`os.path.exists`, without releasing the GIL)."""
    return _fitsread.signature(path) is not None


_LIVE_READERS: "weakref.WeakSet[ImageReader]" = weakref.WeakSet()



class ImageReader:
    """Opens images on demand and keeps the most recently used ones open.

    A cached file is reused only while it is unchanged on disk (same inode, size and
    modification time), so a long-lived worker never serves an image that has since
    been rewritten. Failures are cached the same way and re-raised.

    Parameters
    ----------
    max_open : int, optional
        How many files to keep open at once.
    """

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[object, OpenImage | ImageError]] = OrderedDict()
        # One reader serves all the worker threads of a process, without a lock: each
        # operation on the cache (get, setdefault, move_to_end, popitem) is a single
        # atomic step, and files are opened outside them. With a lock, a thread waiting
        # for it while its holder waited for the GIL formed a convoy that made two
        # threads slower than one on small images. Images dropped from the cache are
        # not closed (another thread may be reading one): each closes its file when no
        # longer used (OpenImage.close_when_unused).
        self._opening: dict[str, threading.Event] = {}
        _LIVE_READERS.add(self)

    def get(self, path: str) -> OpenImage:
        """The open image at ``path`` (cached); re-raises the cached error for bad files.

        Raises
        ------
        ImageError
        """
        signature = _signature(path)
        entry = self._open.get(path)
        if entry is None or entry[0] != signature:
            entry = self._insert(path, signature)
        else:
            try:
                self._open.move_to_end(path)
            except KeyError:  # dropped by another thread just now: still usable here
                pass
        item = entry[1]
        if isinstance(item, ImageError):
            raise item.with_traceback(None)  # one cached error: its traceback must not grow
        return item

    def _insert(self, path: str, signature: object) -> tuple[object, OpenImage | ImageError]:
        """Open ``path`` and cache it, unless another thread is opening it: then wait for
        that (one decompression of a compressed image, not one per thread)."""
        opening = threading.Event()
        other = self._opening.setdefault(path, opening)
        if other is not opening:
            other.wait()
            entry = self._open.get(path)
            if entry is not None and entry[0] == signature:
                return entry
            return self._open_and_cache(path, signature)  # it changed meanwhile: rare
        try:
            return self._open_and_cache(path, signature)
        finally:
            self._opening.pop(path, None)
            opening.set()

    def _open_and_cache(self, path: str, signature: object) -> tuple[object, OpenImage | ImageError]:
        try:
            opened: OpenImage | ImageError = open_image(path)
        except ImageError as error:
            opened = error
        entry = (signature, opened)
        self._open[path] = entry  # replaces a stale entry, if any
        while len(self._open) > self.max_open:
            try:
                self._open.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
        return entry

    def close(self) -> None:
        """Close every open file (at the end of a run: no thread reads them any more)."""
        for path in list(self._open):
            entry = self._open.pop(path, None)
            if entry is not None and isinstance(entry[1], OpenImage):
                entry[1].close()

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all_readers() -> None:  # pragma: no cover - runs at interpreter exit
    """Close files left open by long-lived readers (e.g. a worker's), quietly."""
    for reader in list(_LIVE_READERS):
        reader.close()
