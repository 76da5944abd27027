"""Reproducible random inputs for the MontagePy parity suite (``tests/test_parity.py``).

:func:`make_parity_groups` writes, from one seed, a few dozen *groups* of inputs for
``mDiffFitExec``. A group is what one call of ``mDiffFitExec`` consumes: a Montage text
template (``template.hdr``), a folder of projected images cut from that template grid
(with ``<base>_area.fits`` area images unless the group is run with ``noAreas``) and an
overlap table ``diffs.tbl`` in mOverlaps' exact layout. Together the groups hold a few
hundred listed pairs, so MontagePy is called a few dozen times, not once per pair.

Two kinds of group are generated:

* **random** groups -- a random template size (20-300 px per axis) with a fractional
  CRPIX, and 5-12 noisy images (Gaussian noise of 0.05-2 plus a background plane, a
  shared "sky" of Gaussian sources) with rotated-rectangle or polygon masks, NaN holes,
  +/-inf pixels, outliers and cosmic-ray blobs, float32/float64/scaled-int16/uint16 data,
  3-D cubes, non-integer CRPIX offsets (Montage truncates toward zero) and images that
  stick out of the template on any side. Area images have varied levels (0.3-1.5),
  columns and rows of low area, and zero and negative pixels. Most pairs are fitted;
  these exercise every fits.tbl column (boxang values other than 90 come from the masks).
* **edge** groups -- hand-placed pairs for the failure paths and corner cases: one-row,
  one-column, 2x2 and 3x1 overlaps, diagonal-only and single-pixel valid sets, pairs that
  do not overlap (also only outside the template, and only in the template's last
  column, which Montage's ``iend <= N-1`` clamp drops), all-blank overlaps, an image
  listed as both plus and minus, images touching the template's last column/row or
  covering it with margin on all four sides, non-integer CRPIX offsets on both sides of
  zero, ``.fit`` difference names, image names with ``./``, a sub-folder or no ``.fits``
  extension, missing image and area files, BLANK/BSCALE/BZERO integer data, cubes,
  zeros of either sign and subnormal values in flux and area images (CFITSIO reads them
  as 0), area images with a NaN pixel, and area-weighting groups (unequal area levels, low
  columns, zero and negative areas) for the 0.333 coverage rule. The edge and formats
  groups are each run plain, with ``levelOnly`` and with ``noAreas``.

Every pair carries a *kind* label saying what it was built to exercise; for the edge
kinds :data:`EXPECTED_OUTCOMES` gives the mDiff/mFitplane message MontagePy must report,
so a regression in the generator itself is caught by the suite's self-check.

Nothing here uses diffit: the files are written with numpy and astropy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = [
    "ParityGroup",
    "GroupPlan",
    "EXPECTED_OUTCOMES",
    "PAIRS_PER_RANDOM_GROUP",
    "plan_parity_groups",
    "make_parity_groups",
    "make_parity_group",
    "format_diffs_table",
    "template_text",
]

#: Listed pairs in every random group.
PAIRS_PER_RANDOM_GROUP = 10

#: Pixel scale of every template (degrees); the value does not matter to mDiffFitExec.
CDELT = 0.0005

#: Expected MontagePy outcome of the edge kinds, as ``(level_only, no_areas) -> outcome``
#: for the mode they are run in; an outcome is ``"ok"``, ``"diff:<message start>"`` or
#: ``"fit:<message start>"``. ``None`` as mode key means "any mode". Kinds not listed (the
#: random ones) may end either way.
EXPECTED_OUTCOMES: dict[str, dict[tuple[bool, bool] | None, str]] = {
    "single-row": {(False, False): "fit:Too few pixels to fit", (False, True): "fit:Too few pixels to fit",
                   (True, False): "ok", (True, True): "ok"},
    "single-column": {(False, False): "fit:Too few pixels to fit", (False, True): "fit:Too few pixels to fit",
                      (True, False): "ok", (True, True): "ok"},
    "overlap-3x1": {(False, False): "fit:Too few pixels to fit", (False, True): "fit:Too few pixels to fit",
                    (True, False): "ok", (True, True): "ok"},
    "overlap-2x2": {None: "ok"},
    "single-valid-pixel": {(False, False): "fit:Too few pixels to fit", (False, True): "fit:Too few pixels to fit",
                           (True, False): "ok", (True, True): "ok"},
    "diagonal-only": {(False, False): "fit:Singular Matrix", (False, True): "fit:Singular Matrix",
                      (True, False): "ok", (True, True): "ok"},
    # Mathematically singular too, but the elimination leaves a tiny non-zero pivot, so
    # MontagePy reports an (arbitrary) fit without levelOnly: a stress test of the solver.
    "anti-diagonal-only": {(True, False): "ok", (True, True): "ok"},
    "two-valid-pixels": {(False, False): "fit:Singular Matrix", (False, True): "fit:Singular Matrix",
                         (True, False): "ok", (True, True): "ok"},
    "no-overlap": {None: "diff:Images don't overlap"},
    "overlap-outside-template": {None: "diff:Images don't overlap"},
    "overlap-last-column-only": {None: "diff:Images don't overlap"},
    "overlap-last-row-only": {None: "diff:Images don't overlap"},
    "all-blank": {None: "diff:All pixels are blank."},
    "zero-area-overlap": {(False, False): "diff:All pixels are blank.", (True, False): "diff:All pixels are blank.",
                          (False, True): "ok", (True, True): "ok"},
    "same-image-twice": {None: "ok"},
    "touching-last-column-row": {None: "ok"},
    "covers-template": {None: "ok"},
    "fractional-offset": {None: "ok"},
    "fit-extension": {None: "ok"},
    "missing-image": {(False, False): "diff:Area file", (True, False): "diff:Area file",  # area opened first
                      (False, True): "diff:Image file", (True, True): "diff:Image file"},
    "missing-area": {(False, False): "diff:Area file", (True, False): "diff:Area file",
                     (False, True): "ok", (True, True): "ok"},
    "format": {None: "ok"},
}


@dataclass(frozen=True)
class ParityGroup:
    """One call's worth of ``mDiffFitExec`` inputs.

    Attributes
    ----------
    name : str
        Unique, stable name (used as the pytest id).
    projdir : Path
        Folder of projected images (``path`` argument).
    diffs_table : Path
        Overlap table (``tblfile`` argument).
    template : Path
        Montage text header (``template`` argument).
    noAreas, levelOnly : bool
        Flags to call ``mDiffFitExec`` with for this group.
    n_pairs : int
        Number of data rows in ``diffs_table``.
    kinds : tuple of str
        What each listed pair was built to exercise, in table order.
    keep_all : bool
        Whether the suite should also compare this group's difference images (keepAll).
    """

    name: str
    projdir: Path
    diffs_table: Path
    template: Path
    noAreas: bool  # noqa: N815 - MontagePy's argument name
    levelOnly: bool  # noqa: N815 - MontagePy's argument name
    n_pairs: int
    kinds: tuple[str, ...] = ()
    keep_all: bool = False


@dataclass(frozen=True)
class GroupPlan:
    """What a group will be, known without generating any data (for test ids).

    Attributes
    ----------
    index : int
        Position in the plan; with the seed it seeds the group's random generator.
    name : str
        Group name.
    kind : str
        ``"random"``, ``"edge"``, ``"formats"`` or ``"areas"``.
    noAreas, levelOnly : bool
        Flags of the group.
    keep_all : bool
        Whether the suite compares difference images for it.
    """

    index: int
    name: str
    kind: str
    noAreas: bool  # noqa: N815
    levelOnly: bool  # noqa: N815
    keep_all: bool


# --------------------------------------------------------------------------------------
# Text files in Montage's layouts
# --------------------------------------------------------------------------------------

def template_text(naxis1: int, naxis2: int, crpix1: float, crpix2: float,
                  crval1: float = 270.0, crval2: float = -16.0, pad: bool = True) -> str:
    """A Montage text header (one 80-column card per line, ending in ``END``).

    Parameters
    ----------
    naxis1, naxis2 : int
        Template size.
    crpix1, crpix2 : float
        Template reference pixel; written with ``repr`` so it reads back exactly.
    crval1, crval2 : float, optional
        Reference sky position.
    pad : bool, optional
        Pad every line with spaces to 80 characters (Montage accepts both).

    Returns
    -------
    str
        The header text.
    """
    numbers = [("BITPIX", "-64"), ("NAXIS", "2"), ("NAXIS1", str(naxis1)), ("NAXIS2", str(naxis2))]
    lines = [f"{'SIMPLE':<8}= {'T':>20}"]
    lines += [f"{key:<8}= {value:>20}" for key, value in numbers]
    lines += [f"{'CTYPE1':<8}= 'RA---TAN'", f"{'CTYPE2':<8}= 'DEC--TAN'"]
    reals = [("EQUINOX", 2000.0), ("CRVAL1", crval1), ("CRVAL2", crval2), ("CRPIX1", crpix1),
             ("CRPIX2", crpix2), ("CDELT1", -CDELT), ("CDELT2", CDELT), ("CROTA2", 0.0)]
    for key, value in reals:
        text = repr(float(value))
        assert len(text) <= 20, text
        lines.append(f"{key:<8}= {text:>20}")
    lines.append("END")
    if pad:
        lines = [line.ljust(80) for line in lines]
    return "\n".join(lines) + "\n"


def format_diffs_table(rows: list[tuple[int, int, str, str, str]]) -> str:
    """An overlap table in mOverlaps' exact layout (montage-behaviour.md section 1.2).

    Parameters
    ----------
    rows : list of (cntr1, cntr2, plus, minus, diff)
        One tuple per pair, in table order.

    Returns
    -------
    str
        Header line, type line and one ``%8d%8d %*s  %*s  <diff>`` line per pair.
    """
    width = max([len(name) for row in rows for name in row[2:4]] + [5])
    lines = [f"| cntr1 | cntr2 |{'plus':>{width}} |{'minus':>{width}} |         diff             |",
             f"| int   | int   |{'char':>{width}} |{'char':>{width}} |         char             |"]
    for cntr1, cntr2, plus, minus, diff in rows:
        lines.append(f"{cntr1:8d}{cntr2:8d} {plus:>{width}}  {minus:>{width}}  {diff}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Masks (boolean "valid" arrays of shape (ny, nx))
# --------------------------------------------------------------------------------------

def _rotated_rectangle(rng: np.random.Generator, nx: int, ny: int) -> np.ndarray:
    """Valid inside a rectangle rotated by a random angle about a point near the centre."""
    jj, ii = np.mgrid[0:ny, 0:nx].astype(float)
    cx = nx * rng.uniform(0.35, 0.65)
    cy = ny * rng.uniform(0.35, 0.65)
    half_u = max(1.5, nx * rng.uniform(0.3, 0.6))
    half_v = max(1.5, ny * rng.uniform(0.3, 0.6))
    angle = rng.uniform(0.0, math.pi)
    u = (ii - cx) * math.cos(angle) + (jj - cy) * math.sin(angle)
    v = -(ii - cx) * math.sin(angle) + (jj - cy) * math.cos(angle)
    return (np.abs(u) <= half_u) & (np.abs(v) <= half_v)


def _polygon(rng: np.random.Generator, nx: int, ny: int) -> np.ndarray:
    """Valid inside a random convex polygon (3-7 vertices on a rotated ellipse)."""
    jj, ii = np.mgrid[0:ny, 0:nx].astype(float)
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0.0, 2 * math.pi, n))
    rx, ry = nx * rng.uniform(0.35, 0.7), ny * rng.uniform(0.35, 0.7)
    cx, cy = nx * rng.uniform(0.4, 0.6), ny * rng.uniform(0.4, 0.6)
    xs, ys = cx + rx * np.cos(angles), cy + ry * np.sin(angles)
    valid = np.ones((ny, nx), dtype=bool)
    for k in range(n):
        x0, y0, x1, y1 = xs[k], ys[k], xs[(k + 1) % n], ys[(k + 1) % n]
        valid &= (x1 - x0) * (jj - y0) - (y1 - y0) * (ii - x0) >= 0.0  # left of a CCW edge
    return valid


def _holes(rng: np.random.Generator, valid: np.ndarray, count: int) -> None:
    """Punch ``count`` round NaN holes (radius 1-4 px) into ``valid`` in place."""
    ny, nx = valid.shape
    jj, ii = np.mgrid[0:ny, 0:nx]
    for _ in range(count):
        ci, cj, r = rng.uniform(0, nx), rng.uniform(0, ny), rng.uniform(1.0, 4.0)
        valid &= (ii - ci) ** 2 + (jj - cj) ** 2 > r * r


# --------------------------------------------------------------------------------------
# Group builder
# --------------------------------------------------------------------------------------

@dataclass
class _Image:
    """An image written into a group's projdir."""

    cntr: int
    listed: str  # name as written in diffs.tbl
    ox: int  # offset in the template grid, as Montage computes it: (int)(TC - CRPIX)
    oy: int
    nx: int
    ny: int


@dataclass
class _GroupBuilder:
    """Write one group's images, template and overlap table."""

    root: Path
    name: str
    rng: np.random.Generator
    tn1: int
    tn2: int
    tc1: float
    tc2: float
    no_areas: bool
    level_only: bool
    keep_all: bool = False
    cntr_base: int = 0
    images: list[_Image] = field(default_factory=list)
    rows: list[tuple[int, int, str, str, str]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.root / self.name
        self.projdir = self.dir / "projected"
        self.projdir.mkdir(parents=True)
        rng = self.rng
        n_src = int(rng.integers(4, 16))
        span1, span2 = self.tn1 + 40, self.tn2 + 40
        self.sources = np.column_stack([
            rng.uniform(-20, span1 - 20, n_src), rng.uniform(-20, span2 - 20, n_src),
            rng.uniform(1.0, 30.0, n_src), rng.uniform(0.8, 4.0, n_src)])
        self.crval = (float(np.round(rng.uniform(0.0, 360.0), 4)), float(np.round(rng.uniform(-70.0, 70.0), 4)))

    # ---- pixel values ----------------------------------------------------------------

    def _sky(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The common sky at template 0-based pixel coordinates."""
        sky = 0.002 * x + 0.001 * y
        for sx, sy, amp, width in self.sources:
            sky = sky + amp * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2.0 * width * width))
        return sky

    def image(self, ox: int, oy: int, nx: int, ny: int, *, shift: float = 0.0,
              valid: np.ndarray | None = None, sigma: float | None = None,
              dtype: str = "f4", planes: int = 0, outliers: int = 0, blobs: int = 0,
              infs: int = 0, nan_fraction: float = 0.0, holes: int = 0,
              tiny: int = 0, underflow: bool = False,
              area: np.ndarray | str | None = None, area_planes: bool = False,
              listed: str | None = None, missing: bool = False) -> _Image:
        """Write one image cut from the template grid and return its record.

        Parameters
        ----------
        ox, oy : int
            Intended offset of the image's first pixel in the template (0-based).
        nx, ny : int
            Image size.
        shift : float, optional
            Non-integer part added to the offset in CRPIX: ``CRPIX = TC - (ox + shift)``.
            Montage uses ``(int)(TC - CRPIX)``, truncating toward zero; the recorded
            offset (and the sky in the image) follows Montage.
        valid : ndarray of bool, optional
            Valid-pixel mask; NaN elsewhere.
        sigma : float, optional
            Noise level (default: log-uniform in 0.05-2).
        dtype : {"f4", "f8", "i2", "u2"}, optional
            float32, float64, int16 with BSCALE/BZERO/BLANK, or int16 with the unsigned
            convention (BZERO = 32768).
        planes : int, optional
            0 for a 2-D image, else NAXIS3; planes after the first hold garbage.
        outliers, blobs, infs, holes : int, optional
            Numbers of +/-50 sigma pixels, cosmic-ray blobs, +/-inf pixels, round holes.
        nan_fraction : float, optional
            Fraction of isolated NaN pixels.
        tiny : int, optional
            Number of float pixels set to zeros of either sign and subnormal values of
            the pixel type (CFITSIO reads them all as 0).
        underflow : bool, optional
            Scale a float image's values down into the subnormal range.
        area : ndarray or "missing", optional
            Area image (default: random, see :meth:`random_area`). Ignored in noAreas groups.
        area_planes : bool, optional
            Write the area image with the same NAXIS3 as a cube flux image.
        listed : str, optional
            Name to write in diffs.tbl (default ``p<cntr>.fits``); ``./`` prefixes,
            sub-folders and names without ``.fits`` are resolved as Montage does.
        missing : bool, optional
            List the image but do not write it.
        """
        rng = self.rng
        cntr = self.cntr_base + len(self.images)
        crpix1 = float(np.round(self.tc1 - (ox + shift), 10))
        crpix2 = float(np.round(self.tc2 - (oy + shift), 10))
        eox, eoy = int(self.tc1 - crpix1), int(self.tc2 - crpix2)  # C truncation, as Montage
        listed = listed or f"p{cntr:03d}.fits"
        record = _Image(cntr, listed, eox, eoy, nx, ny)
        self.images.append(record)
        if missing:
            return record
        if sigma is None:
            sigma = float(np.exp(rng.uniform(math.log(0.05), math.log(2.0))))
        jj, ii = np.mgrid[0:ny, 0:nx].astype(float)
        x, y = ii + eox, jj + eoy
        plane = rng.uniform(-5, 5) + rng.uniform(-0.01, 0.01) * x + rng.uniform(-0.01, 0.01) * y
        data = self._sky(x, y) + plane + rng.normal(0.0, sigma, (ny, nx))
        for _ in range(outliers):
            data[rng.integers(ny), rng.integers(nx)] += rng.choice([-50.0, 50.0]) * sigma
        for _ in range(blobs):
            j0, i0 = int(rng.integers(ny)), int(rng.integers(nx))
            data[j0:j0 + int(rng.integers(1, 4)), i0:i0 + int(rng.integers(1, 4))] += 80.0 * sigma + 20.0
        mask = np.ones((ny, nx), dtype=bool) if valid is None else valid.copy()
        if holes:
            _holes(rng, mask, holes)
        if nan_fraction:
            mask &= rng.random((ny, nx)) >= nan_fraction
        data[~mask] = np.nan
        for _ in range(infs):
            data[rng.integers(ny), rng.integers(nx)] = rng.choice([np.inf, -np.inf])
        if dtype in ("f4", "f8"):
            smallest = float(np.finfo(np.float32 if dtype == "f4" else np.float64).smallest_subnormal)
            if underflow:
                data = data * (smallest * 2.0 ** 16)
            for _ in range(tiny):
                data[rng.integers(ny), rng.integers(nx)] = rng.choice(
                    [0.0, -0.0, smallest, -smallest, smallest * 1000.0, -smallest * 2.0 ** 20])
        header = fits.Header()
        header["CTYPE1"] = "RA---TAN"
        header["CTYPE2"] = "DEC--TAN"
        header["CRVAL1"] = self.crval[0]
        header["CRVAL2"] = self.crval[1]
        header["CRPIX1"] = crpix1
        header["CRPIX2"] = crpix2
        header["CDELT1"] = -CDELT
        header["CDELT2"] = CDELT
        header["EQUINOX"] = 2000.0
        hdu = self._flux_hdu(data, dtype, planes, header)
        path = self.projdir / (listed[2:] if listed.startswith("./") else listed)
        if not path.name.endswith(".fits"):
            path = path.with_name(path.name + ".fits")  # Montage appends .fits
        path.parent.mkdir(parents=True, exist_ok=True)
        hdu.writeto(path)
        if self.no_areas or (isinstance(area, str) and area == "missing"):
            return record
        if area is None:
            area = self.random_area(nx, ny)
        area = np.asarray(area)
        if planes and area_planes:
            area = np.stack([area] + [np.full_like(area, 7.0)] * (planes - 1))
        area_path = path.with_name(path.name[:-len(".fits")] + "_area.fits")
        fits.PrimaryHDU(area, header=header).writeto(area_path)
        return record

    def _flux_hdu(self, data: np.ndarray, dtype: str, planes: int, header: fits.Header) -> fits.PrimaryHDU:
        """The flux HDU in the requested pixel type, with scaling keywords for integers."""
        rng = self.rng
        if dtype in ("f4", "f8"):
            array = data.astype(np.float32 if dtype == "f4" else np.float64)
            scale = None
        else:
            finite = np.isfinite(data)
            lo, hi = (float(data[finite].min()), float(data[finite].max())) if finite.any() else (0.0, 1.0)
            if dtype == "i2":
                bscale = float(f"{max(hi - lo, 1e-3) / 60000.0:.6g}")
                bzero = float(np.round((hi + lo) / 2.0, 4))
                blank = -32768
            else:  # unsigned-int16 convention: BSCALE 1, BZERO 32768, integer values
                bscale, bzero, blank = 1.0, 32768.0, None
                data = np.round(data - lo + 1000.0 + rng.uniform(0, 100))
            raw = np.where(finite, np.round((data - bzero) / bscale), -32768.0)
            if blank is None:
                raw = np.where(finite, raw, 0.0)
            array = np.clip(raw, -32768, 32767).astype(np.int16)
            scale = (bscale, bzero, blank)
        if planes:
            garbage = np.full_like(array, 99 if array.dtype.kind == "i" else 1.0e4)
            array = np.stack([array] + [garbage] * (planes - 1))
        hdu = fits.PrimaryHDU(array, header=header)
        if scale is not None:  # write raw integers with the scaling keywords as given
            hdu.header["BSCALE"] = scale[0]
            hdu.header["BZERO"] = scale[1]
            if scale[2] is not None:
                hdu.header["BLANK"] = scale[2]
        return hdu

    def random_area(self, nx: int, ny: int) -> np.ndarray:
        """A varied area image: level 0.3-1.5, low columns/rows, zero/negative pixels."""
        rng = self.rng
        base = rng.uniform(0.3, 1.5)
        mode = rng.random()
        if mode < 0.12:
            area = rng.uniform(0.3, 1.5, (ny, nx))  # per-pixel: the 0.333 rule bites often
        elif mode < 0.3:
            jj, ii = np.mgrid[0:ny, 0:nx]
            area = base * (1.0 + 0.3 * ii / max(nx - 1, 1) - 0.2 * jj / max(ny - 1, 1))
        else:
            area = base * (1.0 + rng.uniform(-0.03, 0.03, (ny, nx)))
        if rng.random() < 0.5:
            for col in rng.choice(nx, size=min(nx, int(rng.integers(1, 4))), replace=False):
                area[:, col] = rng.choice([0.4, 0.4, 0.3, 0.2])
        if rng.random() < 0.25:
            area[int(rng.integers(ny)), :] = 0.4
        if rng.random() < 0.3:
            area[rng.random((ny, nx)) < 0.01] = 0.0
        if rng.random() < 0.2:
            area[rng.random((ny, nx)) < 0.005] = -rng.uniform(0.1, 1.0)
        return area.astype(np.float32 if rng.random() < 0.5 else np.float64)

    def random_image(self) -> _Image:
        """An image of random size, placement and features (for random groups)."""
        rng = self.rng
        nx = int(rng.integers(max(4, self.tn1 * 3 // 10), max(6, min(150, self.tn1 * 8 // 10)) + 1))
        ny = int(rng.integers(max(4, self.tn2 * 3 // 10), max(6, min(150, self.tn2 * 8 // 10)) + 1))
        ox = int(rng.integers(-(nx // 3), self.tn1 - (2 * nx) // 3 + 1))
        oy = int(rng.integers(-(ny // 3), self.tn2 - (2 * ny) // 3 + 1))
        roll = rng.random()
        valid = (_rotated_rectangle(rng, nx, ny) if roll < 0.4
                 else _polygon(rng, nx, ny) if roll < 0.6 else None)
        dtype = str(rng.choice(["f4", "f4", "f4", "f8", "f8", "i2", "u2"], p=[0.2, 0.2, 0.2, 0.13, 0.12, 0.1, 0.05]))
        planes = int(rng.choice([0, 1, 2], p=[0.85, 0.1, 0.05]))
        shift = float(rng.choice([0.3, -0.7, 0.5, -0.3, 0.999, -0.999, 1e-7])) if rng.random() < 0.2 else 0.0
        return self.image(
            ox, oy, nx, ny, shift=shift, valid=valid, dtype=dtype, planes=planes,
            outliers=int(rng.integers(0, 6)) if rng.random() < 0.7 else 0,
            blobs=int(rng.integers(1, 4)) if rng.random() < 0.4 else 0,
            infs=int(rng.integers(1, 4)) if rng.random() < 0.15 else 0,
            holes=int(rng.integers(1, 5)) if rng.random() < 0.4 else 0,
            nan_fraction=0.004 if rng.random() < 0.3 else 0.0,
            area_planes=bool(rng.random() < 0.5))

    # ---- geometry and table --------------------------------------------------------

    def overlap(self, a: _Image, b: _Image) -> tuple[int, int]:
        """Montage's overlap window size (ilen, jlen) for two images, clamp included."""
        istart = max(a.ox, b.ox, 0)
        iend = min(a.ox + a.nx, b.ox + b.nx, self.tn1 - 1)
        jstart = max(a.oy, b.oy, 0)
        jend = min(a.oy + a.ny, b.oy + b.ny, self.tn2 - 1)
        return iend - istart, jend - jstart

    def pair(self, plus: _Image, minus: _Image, kind: str, fit_name: bool = False) -> None:
        """List a pair in diffs.tbl (``fit_name``: a ``.fit`` difference name)."""
        diff = f"diff.{plus.cntr:06d}.{minus.cntr:06d}.{'fit' if fit_name else 'fits'}"
        self.rows.append((plus.cntr, minus.cntr, plus.listed, minus.listed, diff))
        self.kinds.append(kind)

    def finish(self, pad_template: bool = True) -> ParityGroup:
        """Write template.hdr and diffs.tbl and return the group."""
        template = self.dir / "template.hdr"
        template.write_text(template_text(self.tn1, self.tn2, self.tc1, self.tc2,
                                          self.crval[0], self.crval[1], pad=pad_template))
        table = self.dir / "diffs.tbl"
        table.write_text(format_diffs_table(self.rows))
        return ParityGroup(self.name, self.projdir, table, template, self.no_areas, self.level_only,
                           len(self.rows), tuple(self.kinds), self.keep_all)


# --------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------

def _fractional(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A random non-integer value in [lo, hi] with 1-10 decimals."""
    while True:
        value = float(np.round(rng.uniform(lo, hi), int(rng.choice([1, 2, 3, 10]))))
        if value != int(value):
            return value


def _random_group(plan: GroupPlan, root: Path, rng: np.random.Generator) -> ParityGroup:
    """Random template and images; exactly PAIRS_PER_RANDOM_GROUP pairs, mostly overlapping."""
    tn1, tn2 = (int(v) for v in rng.integers(20, 301, 2))
    if rng.random() < 0.1:  # reference pixel outside the grid
        tc1, tc2 = _fractional(rng, -0.3 * tn1, 1.3 * tn1), _fractional(rng, -0.3 * tn2, 1.3 * tn2)
    else:
        tc1, tc2 = _fractional(rng, 0.2 * tn1, 0.8 * tn1), _fractional(rng, 0.2 * tn2, 0.8 * tn2)
    builder = _GroupBuilder(root, plan.name, rng, tn1, tn2, tc1, tc2, plan.noAreas, plan.levelOnly,
                            plan.keep_all, cntr_base=int(rng.choice([0, 0, 7, 1234])))
    candidates: list[tuple[int, int]] = []
    while len(builder.images) < 5 or (len(candidates) < PAIRS_PER_RANDOM_GROUP and len(builder.images) < 12):
        new = builder.random_image()
        for k, old in enumerate(builder.images[:-1]):
            ilen, jlen = builder.overlap(old, new)
            if ilen >= 4 and jlen >= 4:
                candidates.append((k, len(builder.images) - 1))
    chosen = [candidates[k] for k in sorted(rng.choice(len(candidates), min(len(candidates), PAIRS_PER_RANDOM_GROUP),
                                                       replace=False))]
    others = [(a, b) for a in range(len(builder.images)) for b in range(a + 1, len(builder.images))
              if (a, b) not in candidates]
    while len(chosen) < PAIRS_PER_RANDOM_GROUP:  # tiny templates: fill with thin/apart pairs
        chosen.append(others.pop(int(rng.integers(len(others)))))
    for a, b in chosen:
        plus, minus = builder.images[a], builder.images[b]
        if rng.random() < 0.1:
            plus, minus = minus, plus
        kind = "random" if (a, b) in candidates else "random-thin-or-apart"
        builder.pair(plus, minus, kind, fit_name=bool(rng.random() < 0.15))
    return builder.finish(pad_template=bool(rng.random() < 0.7))


def _edge_group(plan: GroupPlan, root: Path, rng: np.random.Generator) -> ParityGroup:
    """Hand-placed pairs for the failure paths and geometric corner cases."""
    # Dyadic CRPIX: pixel coordinates are exact in binary, so a diagonal-only valid set
    # gives an exactly zero pivot ("Singular Matrix") as in montage-behaviour.md 9.4.
    tn1, tn2, tc1, tc2 = 64, 48, 31.5, 22.25
    b = _GroupBuilder(root, plan.name, rng, tn1, tn2, tc1, tc2, plan.noAreas, plan.levelOnly, plan.keep_all)
    flat = 1.0

    def area(nx: int, ny: int, level: float = flat) -> np.ndarray:
        return np.full((ny, nx), level) * (1.0 + rng.uniform(-0.02, 0.02, (ny, nx)))

    def img(ox, oy, nx, ny, **kw):
        kw.setdefault("area", area(nx, ny))
        kw.setdefault("sigma", float(rng.uniform(0.1, 1.0)))
        return b.image(ox, oy, nx, ny, **kw)

    # one-row and one-column overlaps (diff is 14x1 / 1x14)
    a1, a2 = img(2, 2, 20, 10), img(8, 11, 20, 10)
    b.pair(a1, a2, "single-row")
    c1, c2 = img(30, 2, 10, 20), img(39, 8, 10, 20)
    b.pair(c1, c2, "single-column")
    # 2x2 and 3x1 overlaps
    d1, d2 = img(2, 25, 10, 10), img(10, 33, 10, 10)
    b.pair(d1, d2, "overlap-2x2")
    e1, e2 = img(50, 2, 10, 10), img(57, 11, 10, 10)
    b.pair(e1, e2, "overlap-3x1")
    # diagonal-only valid pixels (one exact diagonal / anti-diagonal of the diff)
    f1 = img(20, 20, 12, 12)
    f2 = img(20, 20, 12, 12, valid=np.eye(12, dtype=bool))
    f3 = img(20, 20, 12, 12, valid=np.eye(12, dtype=bool)[::-1])
    b.pair(f1, f2, "diagonal-only")
    b.pair(f3, f1, "anti-diagonal-only")  # nearly singular: MontagePy fits arbitrary a, b, c
    # a single valid pixel, and two valid pixels in different rows and columns
    one = np.zeros((12, 12), dtype=bool)
    one[5, 7] = True
    two = np.zeros((12, 12), dtype=bool)
    two[3, 2] = two[8, 9] = True
    b.pair(f1, img(20, 20, 12, 12, valid=one), "single-valid-pixel")
    b.pair(img(20, 20, 12, 12, valid=two), f1, "two-valid-pixels")
    # no overlap: apart, only outside the template, only in the clamped last column/row
    b.pair(img(0, 0, 8, 8), img(40, 30, 8, 8), "no-overlap")
    b.pair(img(-20, -15, 12, 10), img(-16, -12, 12, 10), "overlap-outside-template")
    b.pair(img(50, 10, 14, 10), img(63, 10, 10, 10), "overlap-last-column-only")
    b.pair(img(10, 38, 10, 10), img(12, 47, 10, 10), "overlap-last-row-only")
    # all-blank overlap (minus is NaN everywhere) and zero areas over the whole overlap
    g1 = img(10, 30, 15, 12)
    b.pair(g1, img(18, 34, 15, 12, valid=np.zeros((12, 15), dtype=bool)), "all-blank")
    b.pair(img(14, 33, 12, 8, area=np.zeros((8, 12))), g1, "zero-area-overlap")
    # the same image as plus and minus
    b.pair(a1, a1, "same-image-twice")
    # touching the last column and row; an image covering the template with margin
    h1 = img(44, 30, 20, 18, valid=_rotated_rectangle(rng, 20, 18))
    h2 = img(40, 26, 30, 30)
    b.pair(h1, h2, "touching-last-column-row")
    big = img(-5, -4, 74, 56, outliers=5, holes=3)
    b.pair(big, img(5, 5, 20, 20, valid=_polygon(rng, 20, 20)), "covers-template")
    b.pair(h2, big, "covers-template", fit_name=True)
    # non-integer CRPIX offsets: truncation toward zero on both sides of zero
    k1 = img(3, 3, 15, 15, shift=0.3)
    k2 = img(-4, 6, 15, 15, shift=0.7)  # (int)(-3.3) = -3
    k3 = img(7, -3, 15, 15, shift=-0.7)  # (int)(6.3) = 6, (int)(-3.7) = -3
    k4 = img(-2, -2, 12, 12, shift=1e-7)  # (int)(-1.9999999) = -1
    b.pair(k1, k2, "fractional-offset")
    b.pair(k2, k3, "fractional-offset", fit_name=True)
    b.pair(k1, k3, "fractional-offset")
    b.pair(k4, k1, "fractional-offset")
    return b.finish()


def _formats_group(plan: GroupPlan, root: Path, rng: np.random.Generator) -> ParityGroup:
    """Pixel types, cubes, BLANK, inf, zeros and subnormals, NaN areas, odd names, missing files."""
    tn1, tn2 = 110, 96
    b = _GroupBuilder(root, plan.name, rng, tn1, tn2, 55.25, 47.9, plan.noAreas, plan.levelOnly, plan.keep_all)

    def spot() -> tuple[int, int, int, int]:
        nx, ny = int(rng.integers(40, 60)), int(rng.integers(40, 60))
        return int(rng.integers(20, 40)), int(rng.integers(15, 35)), nx, ny

    def img(rotated: bool = False, **kw) -> _Image:
        ox, oy, nx, ny = spot()
        if rotated:
            kw["valid"] = _rotated_rectangle(rng, nx, ny)
        kw.setdefault("outliers", 3)
        return b.image(ox, oy, nx, ny, **kw)

    base = img(dtype="f4", rotated=True)
    f8 = img(dtype="f8", holes=2)
    i2 = img(dtype="i2", nan_fraction=0.02, rotated=True)  # BLANK pixels
    u2 = img(dtype="u2", sigma=1.5)
    cube1 = img(dtype="f4", planes=1)
    cube2 = img(dtype="f8", planes=2, area_planes=True, rotated=True)
    cube_i2 = img(dtype="i2", planes=2, nan_fraction=0.01)
    infs = img(dtype="f4", infs=6)
    nx, ny = 50, 50
    nan_area = b.image(30, 30, nx, ny, area=np.where(np.arange(nx) == 7, np.nan, 1.0) * np.ones((ny, 1)))
    dotted = img(listed="./q_dot.fits")
    subdir = img(listed="sub/q_sub.fits", dtype="f8")
    noext = img(listed="q_noext")  # Montage opens q_noext.fits and q_noext_area.fits
    missing_area = img(area="missing")
    missing = img(missing=True)
    # Zeros and subnormal values, which CFITSIO reads as +0 (flux and area images).
    tiny4 = img(dtype="f4", tiny=60)
    tiny8 = img(dtype="f8", tiny=60, rotated=True)
    under4 = img(dtype="f4", underflow=True)
    under8 = img(dtype="f8", underflow=True)
    tiny_area = np.full((ny, nx), 1.0)
    tiny_area[rng.random((ny, nx)) < 0.3] = float(np.finfo(np.float64).smallest_subnormal) * 7
    tiny_area[rng.random((ny, nx)) < 0.05] = -0.0
    subnormal_area = b.image(35, 25, nx, ny, area=tiny_area)
    for other in (f8, i2, u2, cube1, cube2, cube_i2, infs, dotted, subdir, noext, tiny4, tiny8,
                  under4, under8, subnormal_area):
        b.pair(base, other, "format")
    b.pair(tiny8, under8, "format")
    b.pair(under4, under8, "format")
    b.pair(i2, u2, "format")
    b.pair(cube2, cube_i2, "format")
    b.pair(i2, cube_i2, "format", fit_name=True)
    b.pair(nan_area, base, "nan-area")
    b.pair(f8, nan_area, "nan-area")
    b.pair(base, missing_area, "missing-area")
    b.pair(missing, base, "missing-image")
    return b.finish(pad_template=False)


def _areas_group(plan: GroupPlan, root: Path, rng: np.random.Generator) -> ParityGroup:
    """Area weighting and the 0.333 coverage rule: unequal levels, low columns, zeros."""
    tn1, tn2 = 120, 100
    b = _GroupBuilder(root, plan.name, rng, tn1, tn2, 60.6, 50.1, plan.noAreas, plan.levelOnly, plan.keep_all)
    nx, ny = 60, 50
    jj, ii = np.mgrid[0:ny, 0:nx]

    def level(value: float, low_cols=(), low_value=0.4, zeros=0.0, negatives=0.0) -> np.ndarray:
        area = value * (1.0 + rng.uniform(-0.02, 0.02, (ny, nx)))
        for col in low_cols:
            area[:, col] = low_value
        area[rng.random((ny, nx)) < zeros] = 0.0
        area[rng.random((ny, nx)) < negatives] = -0.5
        return area

    images = [
        b.image(10, 10, nx, ny, area=level(1.0, low_cols=(3, 4, 40))),
        b.image(25, 20, nx, ny, area=level(1.0, low_cols=(20, 40), low_value=0.3), valid=_rotated_rectangle(rng, nx, ny)),
        b.image(40, 30, nx, ny, area=level(1.5, zeros=0.02)),
        b.image(30, 40, nx, ny, area=level(0.3, negatives=0.01, low_cols=(10,), low_value=0.2)),
        b.image(15, 35, nx, ny, area=rng.uniform(0.3, 1.5, (ny, nx))),
        b.image(50, 5, nx, ny, area=(0.6 + 0.8 * ii / nx).astype(np.float32), valid=_polygon(rng, nx, ny)),
        b.image(5, 45, nx, ny, area=level(0.9, low_cols=range(0, 60, 7), low_value=0.4)),
    ]
    for a in range(len(images)):
        for c in range(a + 1, len(images)):
            ilen, jlen = b.overlap(images[a], images[c])
            if ilen >= 4 and jlen >= 4:
                b.pair(images[a], images[c], "areas")
    return b.finish()


_BUILDERS = {"random": _random_group, "edge": _edge_group, "formats": _formats_group, "areas": _areas_group}


def plan_parity_groups(seed: int, n_pairs: int = 220) -> list[GroupPlan]:
    """The groups :func:`make_parity_groups` will write, without writing anything.

    Parameters
    ----------
    seed : int
        Master seed.
    n_pairs : int, optional
        Minimum number of listed pairs over all groups.

    Returns
    -------
    list of GroupPlan
        Three edge groups (plain, levelOnly, noAreas; 22 pairs each), three formats
        groups (plain, levelOnly, noAreas; 34 pairs each), two areas groups (plain,
        levelOnly; about 20 pairs each), then ``ceil(0.75 * n_pairs / 10)`` random groups
        of :data:`PAIRS_PER_RANDOM_GROUP` pairs (plain, levelOnly, noAreas and both, in
        turn). The default gives 25 groups and about 380 pairs.
    """
    fixed = [("edge", False, False, True), ("edge", True, False, False), ("edge", False, True, True),
             ("formats", False, False, True), ("formats", True, False, False), ("formats", False, True, True),
             ("areas", False, False, True), ("areas", True, False, False)]
    n_random = math.ceil(0.75 * n_pairs / PAIRS_PER_RANDOM_GROUP)
    rng = np.random.default_rng([seed, 999])
    plans = [GroupPlan(k, f"{kind}{k:02d}{'-level' if lvl else ''}{'-noareas' if noa else ''}", kind, noa, lvl, keep)
             for k, (kind, lvl, noa, keep) in enumerate(fixed)]
    for r in range(n_random):
        k = len(plans)
        mode = r % 6  # plain, plain, levelOnly, noAreas, both, plain
        lvl, noa = mode in (2, 4), mode in (3, 4)
        keep = bool(rng.random() < 0.3) or r < 2
        plans.append(GroupPlan(k, f"random{k:02d}{'-level' if lvl else ''}{'-noareas' if noa else ''}",
                               "random", noa, lvl, keep))
    return plans


def make_parity_group(root: Path, seed: int, plan: GroupPlan) -> ParityGroup:
    """Write one planned group under ``root / plan.name``.

    Parameters
    ----------
    root : Path
        Folder to write into (created if needed).
    seed : int
        Master seed (the group's generator is seeded with ``[seed, plan.index]``).
    plan : GroupPlan
        One entry of :func:`plan_parity_groups`.

    Returns
    -------
    ParityGroup
        The written group.
    """
    rng = np.random.default_rng([seed, plan.index])
    return _BUILDERS[plan.kind](plan, Path(root), rng)


def make_parity_groups(root: Path, seed: int, n_pairs: int = 220) -> list[ParityGroup]:
    """Write all parity groups for ``seed`` under ``root``.

    Parameters
    ----------
    root : Path
        Folder to write into (created if needed).
    seed : int
        Master seed; the same seed gives byte-identical files.
    n_pairs : int, optional
        Minimum total number of listed pairs.

    Returns
    -------
    list of ParityGroup
        The groups, in :func:`plan_parity_groups` order.
    """
    return [make_parity_group(root, seed, plan) for plan in plan_parity_groups(seed, n_pairs)]
