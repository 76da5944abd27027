"""One overlap pair, end to end: read the two windows, difference them, fit a plane.

This is the worker's unit of work. It touches files only to read the overlap windows
of the images (through :class:`diffit.fitsio.ImageReader`) and, with ``keep_all``, to
write the difference and area images exactly as Montage's mDiff would (difference
files are never read back, so stale ones from an earlier run cannot matter).

Bad inputs never raise: :func:`process_pair` turns every failure into a
:class:`PairOutcome` with ``stage`` ``"diff"`` or ``"fit"`` and a one-line reason that
names the file at fault -- missing, truncated or corrupt images and area files, images
without NAXISn/CRPIXn, images that are not on the template's grid (which Montage would
silently difference anyway), area images of another shape -- or gives Montage's own
message ("Images don't overlap", "All pixels are blank.", "Too few pixels to fit", ...).
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from diffit.difference import Difference, KeptPixels, Workspace, difference_pixels, fits_rounded
from diffit.fitplane import FitError, PlaneFit, fit_pixels
from diffit.fitsio import (ImageError, ImageReader, OpenImage, file_exists, header_scaling,
                           quiet_astropy, read_window)
from diffit.geometry import overlap_window
from diffit.headers import Template, grid_mismatch, template_fits_header
from diffit.outputs import write_atomically
from diffit.tables import OverlapPair, format_fit_row

log = logging.getLogger(__name__)

_LOCAL = threading.local()


def _workspace() -> Workspace:
    """This thread's workspace: a pair's arrays are reused by the next pair it does."""
    workspace = getattr(_LOCAL, "workspace", None)
    if workspace is None:
        workspace = _LOCAL.workspace = Workspace()
    return workspace


def release_workspace() -> None:
    """Free this thread's workspace (a thread that will do no more pairs)."""
    _LOCAL.__dict__.pop("workspace", None)


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

    @cached_property
    def row(self) -> str | None:
        """The fits.tbl row of a successful pair (formatted once: the journal and
        fits.tbl both use it)."""
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


#: Endings of image names that diffit reads as given (compressed images, ``.fit``) when
#: Montage's name (with ``.fits`` appended) does not exist.
AS_GIVEN_SUFFIXES = (".fits.gz", ".fits.fz", ".fits.bz2", ".fit.gz", ".fit.fz", ".fit")
_AREA_SUFFIXES = (".fits", ".fits.gz", ".fits.fz")


def _first_existing(candidates: list[str]) -> str:
    """The first candidate that exists, else the first (named in the error message)."""
    for candidate in candidates:
        if file_exists(candidate):
            return candidate
    return candidates[0]


def _area_candidates(stem: str, suffix: str) -> list[str]:
    names = [stem + "_area" + suffix]
    names += [stem + "_area" + s for s in _AREA_SUFFIXES if s != suffix]
    return names


def input_names(path: str) -> tuple[str, str]:
    """Flux and area file names for an image name, following mDiff where Montage works.

    Montage pairs ``x.fits`` with ``x_area.fits`` and appends ``.fits``/``_area.fits``
    to any other name; those names are used whenever the flux file exists. Otherwise
    diffit also accepts compressed images:

    * a name given with a compressed ending (``x.fits.gz``, ``x.fits.fz``, ...) or as
      ``x.fit`` is read as given, with ``x_area`` plus the same ending, else
      ``x_area.fits``, else another compressed area file, whichever exists first;
    * ``x.fits`` that exists only as ``x.fits.gz`` or ``x.fits.fz`` is read from that.

    An area file that does not exist under Montage's name is looked for compressed
    (``x_area.fits.gz``, ``x_area.fits.fz``). When no flux file exists, Montage's names
    are returned, so that the failure names the file Montage would.

    Parameters
    ----------
    path : str
        The image name from the overlap table, joined to the image folder.

    Returns
    -------
    (str, str)
        Flux file and area file.
    """
    fits_name = len(path) > 5 and path.endswith(".fits")
    if fits_name:
        stem = path[:-5]
        flux, area = path, stem + "_area.fits"
    else:
        stem = path
        flux, area = path + ".fits", path + "_area.fits"
    if file_exists(flux):
        return flux, _first_existing(_area_candidates(stem, ".fits"))
    for suffix in AS_GIVEN_SUFFIXES:
        if path.endswith(suffix) and file_exists(path):
            stem = path[: -len(suffix)]
            return path, _first_existing(_area_candidates(stem, suffix))
    if fits_name:
        for extra in (".gz", ".fz"):
            if file_exists(path + extra):
                return path + extra, _first_existing(_area_candidates(stem, ".fits" + extra))
    return flux, area


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
    """Open an image and check that it is on the template's grid (once per open file)."""
    image = reader.get(path)
    key = ("grid", template)
    if key not in image.checks:
        image.checks[key] = grid_mismatch(template.header, image.header)
    problem = image.checks[key]
    if problem:
        raise ImageError(f"{path}: not on the template grid ({problem})")
    return image


@dataclass(frozen=True)
class PairDifference:
    """The difference of a pair: its surviving pixels and the trimmed image's CRPIX.

    ``crpix1``/``crpix2`` are as Montage's file round trip leaves them (14 significant
    digits). The pixels live in the thread's workspace: use them before the thread
    computes another difference.
    """

    pixels: KeptPixels
    crpix1: float
    crpix2: float
    scale: float = 1.0
    zero: float = 0.0

    def images(self) -> Difference:
        """The trimmed difference and area images (for keepAll)."""
        return self.pixels.images()

    def fit(self, level_only: bool) -> PlaneFit:
        """The plane fit of the difference image, as mFitplane makes it.

        Raises
        ------
        FitError
        """
        xs, ys, zs, rows, lo, hi = self.pixels.coordinates(self.crpix1, self.crpix2,
                                                           self.scale, self.zero)
        return fit_pixels(xs, ys, zs, rows, lo, hi, self.crpix1, self.crpix2, level_only,
                          shape=self.pixels.shape)


def compute_difference(
    pair: OverlapPair, template: Template, options: PairOptions, reader: ImageReader
) -> PairDifference:
    """Difference of a pair and its CRPIX as Montage's file round trip leaves it.

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
    pixels = difference_pixels(f1, f2, a1, a2, workspace=_workspace())
    if pixels is None:
        raise PairError("diff", "All pixels are blank.")
    crpix1 = fits_rounded(template.geometry.crpix1 - (window.i0 + pixels.imin))
    crpix2 = fits_rounded(template.geometry.crpix2 - (window.j0 + pixels.jmin))
    scale, zero = difference_scaling(template)
    return PairDifference(pixels=pixels, crpix1=crpix1, crpix2=crpix2, scale=scale, zero=zero)


@lru_cache(maxsize=8)
def difference_scaling(template: Template) -> tuple[float, float]:
    """BSCALE and BZERO of mDiff's difference files: the template's, which mDiff copies
    into them, as CFITSIO reads them back ((1.0, 0.0) for the usual template)."""
    return header_scaling(template.header, template.path, template=True)


def write_difference(paths: tuple[str, str], template: Template, result: Difference,
                     crpix1: float, crpix2: float) -> None:
    """Write the difference and area images as mDiff does (template cards, BITPIX -64;
    with the template's BSCALE/BZERO, the values stored through them, as CFITSIO does).

    Raises
    ------
    PairError
        With stage ``"diff"``, naming the file that could not be written.
    """
    from astropy.io import fits  # only kept difference images need astropy

    scale, zero = difference_scaling(template)
    scaled = scale != 1.0 or zero != 0.0
    for path, data in zip(paths, (result.data, result.area)):
        header = template_fits_header(template).copy()
        for key in ("SIMPLE", "BITPIX", "EXTEND", "BSCALE", "BZERO", "NAXIS",
                    *(key for key in header if re.fullmatch(r"NAXIS\d+", key))):
            header.remove(key, ignore_missing=True, remove_all=True)
        header["CRPIX1"] = crpix1
        header["CRPIX2"] = crpix2
        if scaled:
            with np.errstate(all="ignore"):  # BSCALE 0 stores infinities, as CFITSIO would
                data = (data - zero) / scale
        with quiet_astropy():  # e.g. a BLANK card in the template: not for float data
            hdu = fits.PrimaryHDU(data=data.astype(">f8", copy=False), header=header)
        if scaled:  # set after the data, which astropy would otherwise take as physical
            hdu.header["BSCALE"] = scale
            hdu.header["BZERO"] = zero
        try:
            write_fits_atomically(hdu, path)
        except OSError as error:
            reason = error.strerror or _describe(error)
            raise PairError("diff", f"cannot write difference image {path}: {reason}") from None


def write_fits_atomically(hdu, path: str) -> None:
    """Write a FITS file via a temporary file in the same folder and a rename.

    A stale file of the same name (e.g. from an earlier keepAll run) is replaced only
    once the new one is complete; diffit never reads difference files back.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)

    def write(name: str) -> None:
        with quiet_astropy():  # template cards astropy would "fix" noisily
            hdu.writeto(name, overwrite=True, output_verify="silentfix")

    write_atomically(path, write, binary=True)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def process_pair(
    pair: OverlapPair, template: Template, options: PairOptions, reader: ImageReader
) -> PairOutcome:
    """Difference and fit one pair; never raises for bad inputs.

    Every failure becomes an outcome with ``stage`` ``"diff"`` or ``"fit"`` and a
    one-line reason (naming the file at fault where there is one). Anything unforeseen
    is caught too and reported as ``unexpected error ...`` for that pair alone, so one
    odd input can never end a run.

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
    stage = "diff"
    try:
        result = compute_difference(pair, template, options, reader)
        if options.keep_all:
            write_difference(diff_paths(options.diffdir, pair.diff), template,
                             result.images(), result.crpix1, result.crpix2)
        stage = "fit"
        try:
            fit = result.fit(options.level_only)
        except FitError as error:
            raise PairError("fit", str(error)) from None
    except PairError as error:
        return PairOutcome(stage=error.stage, reason=str(error), **common)
    except Exception as error:  # noqa: BLE001 - a bad pair must not end the run
        log.debug("pair %d failed unexpectedly", pair.index, exc_info=True)
        return PairOutcome(stage=stage, reason=f"unexpected error ({_describe(error)})", **common)
    return PairOutcome(stage="ok", fit=fit, **common)
