"""One overlap pair, end to end: read the two windows, difference them, fit a plane.

This is the worker's unit of work. It touches files only to read the overlap windows
of the images (through :class:`diffit.fitsio.ImageReader`) and, with ``keep_all``, to
write the difference and area images exactly as Montage's mDiff would.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass


from astropy.io import fits

from diffit.difference import Difference, difference, fits_rounded
from diffit.fitplane import FitError, PlaneFit, fit_plane
from diffit.fitsio import ImageError, ImageReader, OpenImage, read_window
from diffit.geometry import overlap_window
from diffit.headers import Template, grid_mismatch
from diffit.tables import OverlapPair, format_fit_row


@dataclass(frozen=True)
class PairOptions:
    """Run-wide settings a worker needs for every pair."""

    projdir: str = "."
    diffdir: str = "."
    keep_all: bool = False
    level_only: bool = False
    no_areas: bool = False


@dataclass(frozen=True)
class PairOutcome:
    """What happened to one pair.

    Attributes
    ----------
    index : int
        Record number in the overlap table (0-based).
    stage : str
        ``"ok"``, ``"diff"`` (the difference failed) or ``"fit"`` (the fit failed).
    reason : str or None
        Why it failed, naming the file where one is at fault.
    fit : PlaneFit or None
        The fit, for successful pairs.
    """

    index: int
    cntr1: int
    cntr2: int
    plus: str
    minus: str
    diff: str
    stage: str
    reason: str | None = None
    fit: PlaneFit | None = None

    @property
    def row(self) -> str | None:
        """The fits.tbl row of a successful pair."""
        return None if self.fit is None else format_fit_row(self.cntr1, self.cntr2, self.fit)


def file_path(directory: str, name: str) -> str:
    """Join a directory and a file name as Montage's ``montage_filePath`` does."""
    if name.startswith("/"):
        return name
    if name.startswith("./"):
        name = name[2:]
    if not directory:
        return name
    return directory + name if directory.endswith("/") else directory + "/" + name


def input_names(path: str) -> tuple[str, str]:
    """Flux and area file names for an image name, following mDiff.

    ``x.fits`` pairs with ``x_area.fits``. Montage appends ``.fits`` to any other name;
    diffit first accepts the name as given when that file exists (e.g. ``x.fits.gz``,
    ``x.fits.fz``), pairing it with ``x_area.fits.gz`` when present.
    """
    if len(path) > 5 and path.endswith(".fits"):
        return path, path[:-5] + "_area.fits"
    for suffix in (".fits.gz", ".fits.fz", ".fits.bz2", ".fit.gz", ".fit"):
        if path.endswith(suffix) and os.path.exists(path):
            stem = path[: -len(suffix)]
            area = stem + "_area" + suffix
            return path, area if os.path.exists(area) else stem + "_area.fits"
    return path + ".fits", path + "_area.fits"


def diff_paths(diffdir: str, diff: str) -> tuple[str, str]:
    """Difference and area output paths for a ``diff`` table value, as Montage names them."""
    name = diff if diff.endswith("s") else diff + "s"
    joined = file_path(diffdir, name)
    base = joined[:-5] if joined.endswith(".fits") else joined
    return base + ".fits", base + "_area.fits"


class PairError(Exception):
    """A pair that fails; ``stage`` is ``"diff"`` or ``"fit"``."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage


def _open_input(reader: ImageReader, template: Template, path: str) -> OpenImage:
    image = reader.get(path)
    problem = grid_mismatch(template.header, image.header)
    if problem:
        raise ImageError(f"{path}: not on the template grid ({problem})")
    return image


def compute_difference(
    pair: OverlapPair, template: Template, options: PairOptions, reader: ImageReader
) -> tuple[Difference, float, float]:
    """Difference image of a pair and its CRPIX as Montage's file round trip leaves it.

    Raises
    ------
    PairError
        With stage ``"diff"``.
    """
    flux1, area1 = input_names(file_path(options.projdir, pair.plus))
    flux2, area2 = input_names(file_path(options.projdir, pair.minus))
    try:
        image1 = _open_input(reader, template, flux1)
        image2 = _open_input(reader, template, flux2)
        areas = None
        if not options.no_areas:
            areas = (reader.get(area1), reader.get(area2))
            for flux, area in ((image1, areas[0]), (image2, areas[1])):
                if (area.geometry.naxis1, area.geometry.naxis2) != (flux.geometry.naxis1, flux.geometry.naxis2):
                    raise ImageError(
                        f"{area.path}: area image is {area.geometry.naxis1}x{area.geometry.naxis2},"
                        f" its image is {flux.geometry.naxis1}x{flux.geometry.naxis2}"
                    )
        window = overlap_window(template.geometry, image1.geometry, image2.geometry)
        if window is None:
            raise PairError("diff", "Images don't overlap")
        slices1 = window.image_slices(1)
        slices2 = window.image_slices(2)
        f1 = read_window(image1, *slices1)
        f2 = read_window(image2, *slices2)
        a1 = a2 = None
        if areas is not None:
            a1 = read_window(areas[0], *slices1)
            a2 = read_window(areas[1], *slices2)
    except ImageError as error:
        raise PairError("diff", str(error)) from None
    result = difference(f1, f2, a1, a2)
    if result is None:
        raise PairError("diff", "All pixels are blank.")
    crpix1 = fits_rounded(template.geometry.crpix1 - (window.i0 + result.imin))
    crpix2 = fits_rounded(template.geometry.crpix2 - (window.j0 + result.jmin))
    return result, crpix1, crpix2


def write_difference(paths: tuple[str, str], template: Template, result: Difference,
                     crpix1: float, crpix2: float) -> None:
    """Write the difference and area images as mDiff does (template cards, BITPIX -64)."""
    for path, data in zip(paths, (result.data, result.area)):
        header = template.header.copy()
        for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"):
            header.remove(key, ignore_missing=True, remove_all=True)
        header["CRPIX1"] = crpix1
        header["CRPIX2"] = crpix2
        hdu = fits.PrimaryHDU(data=data.astype(">f8", copy=False), header=header)
        write_fits_atomically(hdu, path)


def write_fits_atomically(hdu: fits.PrimaryHDU, path: str) -> None:
    """Write a FITS file via a temporary file in the same folder and a rename."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".diffit-", suffix=".fits", dir=directory)
    os.close(handle)
    try:
        hdu.writeto(temporary, overwrite=True, output_verify="silentfix")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def process_pair(
    pair: OverlapPair, template: Template, options: PairOptions, reader: ImageReader
) -> PairOutcome:
    """Difference and fit one pair; never raises for bad inputs.

    Parameters
    ----------
    pair : OverlapPair
        The overlap table record.
    template : Template
        The validated template.
    options : PairOptions
        Run-wide settings.
    reader : ImageReader
        The worker's open-file cache.

    Returns
    -------
    PairOutcome
    """
    common = dict(index=pair.index, cntr1=pair.cntr1, cntr2=pair.cntr2,
                  plus=pair.plus, minus=pair.minus, diff=pair.diff)
    try:
        result, crpix1, crpix2 = compute_difference(pair, template, options, reader)
        if options.keep_all:
            try:
                write_difference(diff_paths(options.diffdir, pair.diff), template,
                                 result, crpix1, crpix2)
            except OSError as error:
                raise PairError("diff", f"cannot write difference image: {error}") from None
        try:
            fit = fit_plane(result.data, crpix1, crpix2, options.level_only)
        except FitError as error:
            raise PairError("fit", str(error)) from None
    except PairError as error:
        return PairOutcome(stage=error.stage, reason=str(error), **common)
    return PairOutcome(stage="ok", fit=fit, **common)


