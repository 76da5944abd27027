"""Reading image windows from FITS files (the only module that opens input images).

An :class:`ImageReader` opens each file once, keeps a small LRU cache of open files
(a worker's pairs share images), and reads only the requested window: memory-mapped
for plain files, tile by tile for tile-compressed (``.fits.fz``) images, whole and once
for gzip-compressed files (astropy cannot window those efficiently). Pixel values are
converted as CFITSIO converts them for Montage: ``raw*BSCALE + BZERO`` in double
precision, with integer ``BLANK`` values becoming NaN, and only the first plane of a
cube.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from diffit.geometry import GridGeometry


class ImageError(Exception):
    """An input image that cannot be used; the message names the file and the problem."""


@dataclass
class OpenImage:
    """An open image HDU with what is needed to read windows of it."""

    path: str
    geometry: GridGeometry
    header: fits.Header
    hdul: fits.HDUList = field(repr=False)
    hdu: object = field(repr=False)
    ndim: int
    scale: float
    zero: float
    blank: int | None
    whole: np.ndarray | None = field(default=None, repr=False)


def _image_hdu(hdul: fits.HDUList):
    """The first HDU holding an image: the primary array, else the first image extension."""
    for hdu in hdul:
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            if hdu.header.get("NAXIS", 0) >= 2 or isinstance(hdu, fits.CompImageHDU):
                return hdu
    return None


def open_image(path: str) -> OpenImage:
    """Open a FITS image and read its geometry.

    Raises
    ------
    ImageError
        The file is missing or not FITS, holds no 2-D image, lacks NAXISn/CRPIXn.
    """
    if not os.path.exists(path):
        raise ImageError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(path, memmap=True, do_not_scale_image_data=True,
                             lazy_load_hdus=True)
            hdu = _image_hdu(hdul)
    except Exception as error:  # astropy raises OSError, ValueError, TypeError, ...
        raise ImageError(f"{path}: not a readable FITS file ({_describe(error)})") from None
    if hdu is None:
        hdul.close()
        raise ImageError(f"{path}: no 2-D image in the file")
    header = hdu.header
    try:
        naxis = int(header["NAXIS"]) if not isinstance(hdu, fits.CompImageHDU) else int(header["ZNAXIS"] if "ZNAXIS" in header else header["NAXIS"])
        geometry = GridGeometry(
            naxis1=int(header["NAXIS1"]), naxis2=int(header["NAXIS2"]),
            crpix1=float(header["CRPIX1"]), crpix2=float(header["CRPIX2"]),
        )
    except KeyError as error:
        hdul.close()
        raise ImageError(f"{path}: no {error.args[0]} keyword in the header") from None
    except (TypeError, ValueError):
        hdul.close()
        raise ImageError(f"{path}: NAXISn/CRPIXn keywords are not numbers") from None
    if not (np.isfinite(geometry.crpix1) and np.isfinite(geometry.crpix2)):
        hdul.close()
        raise ImageError(f"{path}: CRPIX1/CRPIX2 are not finite")
    if isinstance(hdu, fits.CompImageHDU):
        scale, zero, blank = 1.0, 0.0, None  # astropy decompresses and scales these itself
    else:
        scale = float(header.get("BSCALE", 1.0))
        zero = float(header.get("BZERO", 0.0))
        blank = header.get("BLANK") if int(header.get("BITPIX", -64)) > 0 else None
    image = OpenImage(path=path, geometry=geometry, header=header, hdul=hdul, hdu=hdu,
                      ndim=naxis, scale=scale, zero=zero,
                      blank=None if blank is None else int(blank))
    if path.endswith((".gz", ".bz2", ".Z", ".zip")):
        image.whole = _plane(image, hdu.data)
    return image


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _plane(image: OpenImage, data) -> np.ndarray:
    """Convert raw (possibly 3-D) data to the first 2-D plane in float64 physical values."""
    if data is None:
        raise ImageError(f"{image.path}: the image has no data")
    while data.ndim > 2:
        data = data[0]
    return _to_physical(image, data)


def _to_physical(image: OpenImage, raw: np.ndarray) -> np.ndarray:
    values = np.asarray(raw, dtype=np.float64)
    if image.scale != 1.0 or image.zero != 0.0:
        values = values * image.scale + image.zero
    if image.blank is not None and raw.dtype.kind in "iu":
        values[raw == image.blank] = np.nan
    return values


def read_window(image: OpenImage, rows: slice, cols: slice) -> np.ndarray:
    """Physical pixel values of ``image`` over a window (first plane for cubes).

    Raises
    ------
    ImageError
        The file is truncated or its data cannot be decoded.
    """
    try:
        if image.whole is not None:
            return image.whole[rows, cols]
        lead = (0,) * (image.ndim - 2)
        if isinstance(image.hdu, fits.CompImageHDU):
            # Tile-compressed: .section decompresses only the tiles the window touches.
            raw = image.hdu.section[lead + (rows, cols)]
        else:
            # Plain image: slice the memory map (``.section`` would read row by row).
            raw = image.hdu.data[lead + (rows, cols)]
        return _to_physical(image, np.asarray(raw))
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"{image.path}: cannot read pixels ({_describe(error)})") from None


class ImageReader:
    """Opens images on demand and keeps the most recently used ones open.

    Parameters
    ----------
    max_open : int, optional
        How many files to keep open at once.
    """

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, OpenImage | ImageError] = OrderedDict()

    def get(self, path: str) -> OpenImage:
        """The open image at ``path`` (cached); re-raises the cached error for bad files."""
        cached = self._open.get(path)
        if cached is None:
            try:
                cached = open_image(path)
            except ImageError as error:
                cached = error
            self._open[path] = cached
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                if isinstance(old, OpenImage):
                    old.hdul.close()
        else:
            self._open.move_to_end(path)
        if isinstance(cached, ImageError):
            raise cached
        return cached

    def close(self) -> None:
        """Close every open file."""
        for item in self._open.values():
            if isinstance(item, OpenImage):
                item.hdul.close()
        self._open.clear()

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
