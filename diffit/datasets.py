"""Synthetic "projected" surveys on a common TAN pixel grid.

Like :mod:`photutils.datasets`, this module *generates* realistic data rather than
downloading it. :func:`make_survey` writes what Montage's mDiffFitExec expects to find
after mProjExec / mImgtbl / mOverlaps have run:

* ``projected/tile_NNNN.fits`` (and ``tile_NNNN_area.fits``): images already on the
  template's pixel grid, i.e. the template WCS with ``CRPIX = template CRPIX - offset``;
* ``template.hdr``: the Montage text header of the common grid;
* ``images.tbl``: an mImgtbl-like IPAC table (enough columns for mOverlaps to read it);
* ``diffs.tbl``: the overlap table, in mOverlaps' exact layout.

The tiles are laid out like a 2MASS survey: columns ("scans") of tall tiles that overlap
their neighbours in the scan by ``overlap`` and the adjacent scans by ``overlap``, each
scan shifted along its length by a random amount (so each tile also overlaps two tiles
in each neighbouring scan), plus a few pixels of random jitter per tile. A 400-tile
survey of 512x1024 tiles has about 1,100 overlapping pairs (1,117 for seed 0), like a
2MASS mosaic (~1,200).

All tiles see one sky -- a shared catalogue of stars (power-law fluxes, Moffat PSF with
a per-tile seeing) on smooth log-normal nebulosity -- rendered tile by tile on the
tile's template coordinates, so the whole sky is never held in memory. Each tile adds
its own background plane, Gaussian noise, a few cosmic rays and, optionally, blank
(NaN) regions such as the clipped corners of a reprojected image or a bad column. The
injected background planes are recorded so that tests can check fitted differences
(:func:`injected_planes`).

Coordinates: "template pixel" ``(i, j)`` are 0-based column/row indices of the template
grid. A tile with offset ``(x0, y0)`` has its pixel ``(0, 0)`` at template pixel
``(x0, y0)``. Background planes use Montage's convention ``x = i - CRPIX1``,
``y = j - CRPIX2`` (template CRPIX), which is what mFitplane reports for a difference.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = [
    "Tile",
    "Survey",
    "make_template_header",
    "write_template",
    "find_overlaps",
    "write_overlap_table",
    "write_images_table",
    "make_survey",
    "injected_planes",
]

# --- sky model constants (DN, template pixels) -------------------------------------
_STAR_DENSITY = 3.0e-3  # stars per pixel brighter than _FLUX_MIN
_FLUX_MIN = 20.0  # total flux (DN) of the faintest star
_FLUX_MAX = 2.0e6  # total flux of the brightest star (peak ~2e5 DN)
_FLUX_SLOPE = 0.75  # N(>F) ~ F**-0.75 (Galactic star counts: d log N / dm ~ 0.3)
_MOFFAT_BETA = 3.0
_FWHM = 2.5  # median seeing, pixels
_FWHM_SCATTER = 0.05  # log-normal scatter of the per-tile seeing
_FWHM_MAX = _FWHM * 1.25  # seeing is clipped here (sets the stamp sizes)
_STAMP_THRESHOLD = 0.05  # stamps extend until the profile drops below this (DN)
_STAMP_RADII = (3, 4, 6, 9, 13, 19, 28, 40)
_NEBULA_LEVEL = 8.0  # median nebular surface brightness (DN)
_NEBULA_GAIN = 0.7  # log-normal contrast
_NEBULA_SCALES = ((512.0, 1.0), (128.0, 0.5), (32.0, 0.25))  # (node spacing, weight)
_BSPLINE_STD = 0.48  # std of a unit-variance random grid after 2-D cubic B-spline smoothing
# --- per-tile instrument constants --------------------------------------------------
_BG_LEVEL_STD = 5.0  # DN
_BG_SLOPE = 0.5  # DN across a tile (std)
_AREA_FIELD = 0.01  # area falls by 1 % from template centre to corner
_AREA_TILT = 0.0005  # per-tile area tilt (std, relative, across half a tile)
_CR_RATE = 1.0e-5  # cosmic rays per pixel

_SKY_COMPONENTS = frozenset({"stars", "nebula"})


@dataclass(frozen=True)
class Tile:
    """One projected image: where it sits on the template grid.

    Attributes
    ----------
    name : str
        File name relative to the projected-image directory, e.g. ``"tile_0003.fits"``.
    x0, y0 : int
        0-based template column and row of the tile's pixel ``(0, 0)``.
    nx, ny : int
        ``NAXIS1`` and ``NAXIS2`` of the tile.
    """

    name: str
    x0: int
    y0: int
    nx: int
    ny: int


@dataclass(frozen=True)
class Survey:
    """The files written by :func:`make_survey`.

    Attributes
    ----------
    directory : Path
        Top directory of the survey.
    projdir : Path
        Directory of the projected tiles (``directory / "projected"``).
    template : Path
        Montage text header of the common grid (``template.hdr``).
    images_table : Path
        mImgtbl-like image table (``images.tbl``).
    diffs_table : Path
        mOverlaps-style overlap table (``diffs.tbl``).
    tiles : tuple of Tile
        The tiles, in image-table (``cntr``) order.
    n_pairs : int
        Number of rows of ``diffs.tbl``.
    """

    directory: Path
    projdir: Path
    template: Path
    images_table: Path
    diffs_table: Path
    tiles: tuple[Tile, ...]
    n_pairs: int


# ====================================================================================
# Template header
# ====================================================================================
def make_template_header(
    naxis1: int,
    naxis2: int,
    crpix1: float,
    crpix2: float,
    *,
    crval1: float = 270.0,
    crval2: float = -16.2,
    cdelt: float = 1 / 3600,
    ctype: tuple[str, str] = ("RA---TAN", "DEC--TAN"),
) -> fits.Header:
    """Build a Montage-style template header (what mMakeHdr writes).

    Parameters
    ----------
    naxis1, naxis2 : int
        Size of the template grid in pixels.
    crpix1, crpix2 : float
        Reference pixel (FITS 1-based). Prefer half-integers (e.g. centre + 0.5): then
        ``CRPIX_template - CRPIX_tile`` is exact in binary floating point, so Montage's
        truncating offset ``(int)(TC - crpix)`` cannot land one pixel off.
    crval1, crval2 : float, optional
        Sky coordinates of the reference pixel, degrees.
    cdelt : float, optional
        Pixel scale in degrees. ``CDELT1`` is written as ``-cdelt`` (east to the left),
        ``CDELT2`` as ``+cdelt``.
    ctype : tuple of str, optional
        ``CTYPE1`` and ``CTYPE2``. ``EQUINOX = 2000`` is added for RA/Dec axes.

    Returns
    -------
    astropy.io.fits.Header
        Cards ``SIMPLE BITPIX NAXIS NAXIS1 NAXIS2 CTYPE1 CTYPE2 [EQUINOX] CRVAL1 CRVAL2
        CDELT1 CDELT2 CRPIX1 CRPIX2 CROTA2``.
    """
    if int(naxis1) < 1 or int(naxis2) < 1:
        raise ValueError(f"template size must be positive, got {naxis1}x{naxis2}")
    if not cdelt > 0:
        raise ValueError(f"cdelt must be positive, got {cdelt}")
    ctype1, ctype2 = ctype
    if len(ctype1) < 8 or len(ctype2) < 8 or ctype1[4:] != ctype2[4:]:
        raise ValueError(f"CTYPEs must be 8 characters with matching projections: {ctype}")
    cards: list[tuple[str, object]] = [
        ("SIMPLE", True),
        ("BITPIX", -64),
        ("NAXIS", 2),
        ("NAXIS1", int(naxis1)),
        ("NAXIS2", int(naxis2)),
        ("CTYPE1", ctype1),
        ("CTYPE2", ctype2),
    ]
    if ctype1.upper().startswith("RA"):
        cards.append(("EQUINOX", 2000))
    cards += [
        ("CRVAL1", float(crval1)),
        ("CRVAL2", float(crval2)),
        ("CDELT1", -float(cdelt)),
        ("CDELT2", float(cdelt)),
        ("CRPIX1", float(crpix1)),
        ("CRPIX2", float(crpix2)),
        ("CROTA2", 0.0),
    ]
    return fits.Header(cards)


def write_template(header: fits.Header, path: str | os.PathLike[str]) -> Path:
    """Write a header as a Montage text template (``.hdr``).

    One card per line, trailing blanks removed (so no line exceeds 80 characters, as
    Montage's ``checkHdr`` demands), ending with ``END``. Commentary cards are kept.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Usually from :func:`make_template_header`.
    path : path-like
        Output file.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    lines = [card.image.rstrip() for card in header.cards if card.keyword != "END"]
    for line in lines:
        if len(line) > 80:  # pragma: no cover - astropy never makes these for one card
            raise ValueError(f"header line longer than 80 characters: {line!r}")
    path.write_text("\n".join(lines + ["END"]) + "\n")
    return path


# ====================================================================================
# Overlaps and tables
# ====================================================================================
def _tile_arrays(tiles: Sequence[Tile]) -> tuple[np.ndarray, ...]:
    x0 = np.fromiter((t.x0 for t in tiles), dtype=np.int64, count=len(tiles))
    y0 = np.fromiter((t.y0 for t in tiles), dtype=np.int64, count=len(tiles))
    nx = np.fromiter((t.nx for t in tiles), dtype=np.int64, count=len(tiles))
    ny = np.fromiter((t.ny for t in tiles), dtype=np.int64, count=len(tiles))
    return x0, y0, nx, ny


def _segment_ranks(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])``, vectorised."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def find_overlaps(tiles: Sequence[Tile]) -> list[tuple[int, int]]:
    """Pairs of tiles whose pixel footprints share at least one template pixel.

    The pairs come in mOverlaps' order: ``(k, l)`` with ``k < l``, sorted by ``k`` then
    ``l`` (indices into ``tiles``). Touching tiles (no shared pixel) are not pairs --
    note that mOverlaps, which walks the pixel *edges* with half a pixel of slack, does
    report edge-touching tiles (mDiff then fails them with "Images don't overlap").

    The search buckets tiles into a grid of cells the size of a typical tile, so it
    costs about O(n log n): 10^4 tiles take ~0.1 s, 33,000 tiles (98,000 pairs) ~0.25 s.

    Parameters
    ----------
    tiles : sequence of Tile

    Returns
    -------
    list of (int, int)
    """
    n = len(tiles)
    if n < 2:
        return []
    x0, y0, nx, ny = _tile_arrays(tiles)
    x1, y1 = x0 + nx, y0 + ny
    ids = np.flatnonzero((nx > 0) & (ny > 0))
    if ids.size < 2:
        return []
    cw = max(1, int(np.median(nx[ids])))
    ch = max(1, int(np.median(ny[ids])))
    cx0, cx1 = x0[ids] // cw, (x1[ids] - 1) // cw
    cy0, cy1 = y0[ids] // ch, (y1[ids] - 1) // ch
    ncx = cx1 - cx0 + 1
    ncells = ncx * (cy1 - cy0 + 1)
    # one entry per (tile, cell it touches)
    owner = np.repeat(ids, ncells)
    rank = _segment_ranks(ncells)
    rncx = np.repeat(ncx, ncells)
    cx = np.repeat(cx0, ncells) + rank % rncx
    cy = np.repeat(cy0, ncells) + rank // rncx
    span = int(cx.max() - cx.min()) + 1
    key = (cy - cy.min()) * span + (cx - cx.min())
    order = np.lexsort((owner, key))
    key, owner = key[order], owner[order]
    # every entry pairs with the later entries of its cell
    m = key.size
    boundary = np.flatnonzero(np.diff(key)) + 1
    group_end = np.repeat(np.append(boundary, m), np.diff(np.concatenate(([0], boundary, [m]))))
    npartners = group_end - np.arange(m) - 1
    first = np.repeat(np.arange(m), npartners)
    second = first + 1 + _segment_ranks(npartners)
    k, l = owner[first], owner[second]  # k < l: owners are sorted within a cell
    hit = (x0[k] < x1[l]) & (x0[l] < x1[k]) & (y0[k] < y1[l]) & (y0[l] < y1[k])
    codes = np.unique(k[hit] * np.int64(n) + l[hit])
    return list(zip((codes // n).tolist(), (codes % n).tolist()))


def write_overlap_table(
    path: str | os.PathLike[str], tiles: Sequence[Tile], pairs: Sequence[tuple[int, int]]
) -> Path:
    """Write a ``diffs.tbl`` exactly as Montage's mOverlaps lays it out.

    ``cntr`` values are the indices into ``tiles``; ``plus`` is ``tiles[k].name`` and
    ``minus`` is ``tiles[l].name``, right-justified to the longest name among *all*
    tiles (as mOverlaps does); ``diff`` is ``diff.KKKKKK.LLLLLL.fits``.

    Parameters
    ----------
    path : path-like
        Output file.
    tiles : sequence of Tile
        All images of the image table, in ``cntr`` order.
    pairs : sequence of (int, int)
        Overlapping pairs, e.g. from :func:`find_overlaps`.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    names = [t.name for t in tiles]
    width = max((len(s) for s in names), default=0)
    out = [
        "| cntr1 | cntr2 |%*s |%*s |         diff             |\n" % (width, "plus", width, "minus"),
        "| int   | int   |%*s |%*s |         char             |\n" % (width, "char", width, "char"),
    ]
    fmt = "%8d%8d %*s  %*s  diff.%06d.%06d.fits\n"
    for k, l in pairs:
        out.append(fmt % (k, l, width, names[k], width, names[l], k, l))
    with open(path, "w") as fh:
        fh.writelines(out)
    return path


def _fmt_value(value: object) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else "nan"
    return str(value)


def _ipac_type(values: Sequence[object]) -> str:
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        return "int"
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return "double"
    return "char"


def _write_ipac(path: Path, columns: Mapping[str, Sequence[object]]) -> None:
    """Minimal fixed-width IPAC table writer (data never sits under a ``|``)."""
    names = list(columns)
    nrow = len(columns[names[0]]) if names else 0
    text = {name: [_fmt_value(v) for v in columns[name]] for name in names}
    types = {name: _ipac_type(list(columns[name])) if nrow else "char" for name in names}
    widths = {
        name: max([len(name), len(types[name])] + [len(s) for s in text[name]]) for name in names
    }
    lines = [
        "|" + "|".join(name.rjust(widths[name]) for name in names) + "|",
        "|" + "|".join(types[name].rjust(widths[name]) for name in names) + "|",
    ]
    for r in range(nrow):
        lines.append(" " + " ".join(text[name][r].rjust(widths[name]) for name in names) + " ")
    path.write_text("\n".join(lines) + "\n")


def write_images_table(
    path: str | os.PathLike[str],
    tiles: Sequence[Tile],
    *,
    header: fits.Header | None = None,
    extra: Mapping[str, Sequence[object]] | None = None,
) -> Path:
    """Write an mImgtbl-like IPAC image table.

    Columns: ``cntr`` (index into ``tiles``), then, when ``header`` is given, ``ra dec``
    (tile centre), ``naxis1 naxis2 ctype1 ctype2 [equinox] crval1 crval2 crpix1 crpix2
    cdelt1 cdelt2 crota2`` -- enough for Montage's mOverlaps to read the table -- then
    ``x0 y0``, any ``extra`` columns and ``fname``.

    Parameters
    ----------
    path : path-like
        Output file.
    tiles : sequence of Tile
    header : astropy.io.fits.Header, optional
        The template header. Without it only ``cntr naxis1 naxis2 crpix1 crpix2 x0 y0
        fname`` are written, with CRPIX relative to a template whose reference pixel is
        its first pixel (``crpix = 1 - x0``).
    extra : mapping of str to sequence, optional
        Additional columns (one value per tile), written before ``fname``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    x0, y0, nx, ny = _tile_arrays(tiles)
    cols: dict[str, Sequence[object]] = {"cntr": list(range(len(tiles)))}
    if header is None:
        tc1 = tc2 = 1.0
    else:
        tc1, tc2 = float(header["CRPIX1"]), float(header["CRPIX2"])
        ra, dec = _pixel_to_sky(header, x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0)
        cols["ra"] = [round(float(v), 7) for v in ra]
        cols["dec"] = [round(float(v), 7) for v in dec]
    cols["naxis1"] = nx.tolist()
    cols["naxis2"] = ny.tolist()
    if header is not None:
        n = len(tiles)
        cols["ctype1"] = [str(header["CTYPE1"])] * n
        cols["ctype2"] = [str(header["CTYPE2"])] * n
        if "EQUINOX" in header:
            cols["equinox"] = [int(header["EQUINOX"])] * n
        cols["crval1"] = [float(header["CRVAL1"])] * n
        cols["crval2"] = [float(header["CRVAL2"])] * n
    cols["crpix1"] = [tc1 - float(v) for v in x0]
    cols["crpix2"] = [tc2 - float(v) for v in y0]
    if header is not None:
        cols["cdelt1"] = [float(header["CDELT1"])] * len(tiles)
        cols["cdelt2"] = [float(header["CDELT2"])] * len(tiles)
        cols["crota2"] = [float(header.get("CROTA2", 0.0))] * len(tiles)
    cols["x0"] = x0.tolist()
    cols["y0"] = y0.tolist()
    for name, values in (extra or {}).items():
        if len(values) != len(tiles):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(tiles)} tiles")
        cols[name] = list(values)
    cols["fname"] = [t.name for t in tiles]
    _write_ipac(path, cols)
    return path


def _pixel_to_sky(header: fits.Header, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky coordinates of 0-based template pixels (gnomonic, CDELT, no rotation).

    Only used for the informational ``ra``/``dec`` columns of the image table; written
    out here so that no WCS library (and none of its warnings) is involved.
    """
    cd1, cd2 = float(header["CDELT1"]), float(header["CDELT2"])
    xi = np.radians((np.asarray(i, float) + 1.0 - float(header["CRPIX1"])) * cd1)
    eta = np.radians((np.asarray(j, float) + 1.0 - float(header["CRPIX2"])) * cd2)
    a0, d0 = math.radians(float(header["CRVAL1"])), math.radians(float(header["CRVAL2"]))
    denom = math.cos(d0) - eta * math.sin(d0)
    ra = a0 + np.arctan2(xi, denom)
    dec = np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


# ====================================================================================
# Sky model
# ====================================================================================
def _bspline_matrix(start: int, n: int, spacing: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline weights of ``n`` consecutive pixels on a grid of node spacing.

    Node ``m`` sits at pixel ``(m - 2) * spacing``. Returns ``(W, m0)``: pixel ``p``
    is ``W[p - start] @ nodes[m0 : m0 + W.shape[1]]``.
    """
    u = np.arange(start, start + n, dtype=np.float64) / spacing
    cell = np.floor(u)
    t = u - cell
    m = cell.astype(np.int64) + 2
    m0 = int(m.min()) - 1
    w = np.zeros((n, int(m.max()) + 2 - m0 + 1))
    rows = np.arange(n)
    t2, t3 = t * t, t * t * t
    w[rows, m - 1 - m0] = (1.0 - t) ** 3 / 6.0
    w[rows, m - m0] = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w[rows, m + 1 - m0] = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w[rows, m + 2 - m0] = t3 / 6.0
    return w, m0


def _moffat_alpha(fwhm: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / _MOFFAT_BETA) - 1.0))


class _Sky:
    """The shared sky: a star catalogue plus a smooth nebula on the template grid."""

    def __init__(self, naxis1: int, naxis2: int, seed: int, components: frozenset[str]) -> None:
        self.groups: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self.grids: list[tuple[float, float, np.ndarray]] = []
        rmax = _STAMP_RADII[-1]
        if "stars" in components:
            rng = np.random.default_rng([seed, 1])
            area = (naxis1 + 2 * rmax) * (naxis2 + 2 * rmax)
            nstar = int(rng.poisson(_STAR_DENSITY * area))
            xs = rng.uniform(-rmax, naxis1 + rmax, nstar)
            ys = rng.uniform(-rmax, naxis2 + rmax, nstar)
            q = (_FLUX_MIN / _FLUX_MAX) ** _FLUX_SLOPE
            flux = _FLUX_MIN * (1.0 - rng.uniform(0.0, 1.0, nstar) * (1.0 - q)) ** (-1.0 / _FLUX_SLOPE)
            # stamp radius: where the widest allowed profile drops below the threshold
            alpha = _moffat_alpha(_FWHM_MAX)
            peak = flux * (_MOFFAT_BETA - 1.0) / (math.pi * alpha**2)
            need = alpha * np.sqrt(np.maximum((peak / _STAMP_THRESHOLD) ** (1.0 / _MOFFAT_BETA) - 1.0, 0.0))
            radii = np.asarray(_STAMP_RADII)
            which = np.minimum(np.searchsorted(radii, need), radii.size - 1)
            for g, r in enumerate(_STAMP_RADII):
                sel = np.flatnonzero(which == g)
                if sel.size:
                    sel = sel[np.argsort(xs[sel], kind="stable")]
                    self.groups.append((r, xs[sel], ys[sel], flux[sel]))
        if "nebula" in components:
            rng = np.random.default_rng([seed, 2])
            for spacing, weight in _NEBULA_SCALES:
                shape = (int(math.ceil(naxis2 / spacing)) + 5, int(math.ceil(naxis1 / spacing)) + 5)
                self.grids.append((spacing, weight, rng.standard_normal(shape)))

    def render(self, x0: int, y0: int, fwhm: float, out: np.ndarray) -> np.ndarray:
        """Sky on template pixels ``[x0, x0+nx) x [y0, y0+ny)`` into ``out`` (shape (ny, nx)).

        ``out`` may be float32 (faster) or float64; stars are summed in float64.
        """
        ny, nx = out.shape
        if self.grids:
            # sum over scales of Wy_s @ G_s @ Wx_s.T as a single product (one full-size array)
            wys, blocks = [], []
            for spacing, weight, nodes in self.grids:
                wx, mx = _bspline_matrix(x0, nx, spacing)
                wy, my = _bspline_matrix(y0, ny, spacing)
                sub = nodes[my : my + wy.shape[1], mx : mx + wx.shape[1]]
                wys.append(wy)
                blocks.append((weight / _BSPLINE_STD) * (sub @ wx.T))
            norm = math.sqrt(sum(w * w for _, w, _ in self.grids))
            left = np.hstack(wys).astype(out.dtype)
            right = np.vstack(blocks).astype(out.dtype)
            # Small row blocks keep OpenBLAS single-threaded (m*n*k <= 2**18): its
            # worker threads would otherwise spin and compete with ours.
            step = max(1, (1 << 18) // (right.shape[0] * nx))
            for r0 in range(0, ny, step):
                np.matmul(left[r0 : r0 + step], right, out=out[r0 : r0 + step])
            out *= _NEBULA_GAIN / norm
            np.exp(out, out=out)
            out *= _NEBULA_LEVEL
        else:
            out.fill(0.0)
        if self.groups:
            alpha2 = _moffat_alpha(fwhm) ** 2
            acc = out.reshape(-1)
            for r, xs, ys, flux in self.groups:
                lo, hi = np.searchsorted(xs, [x0 - r - 0.5, x0 + nx + r - 0.5])
                sel = lo + np.flatnonzero((ys[lo:hi] >= y0 - r - 0.5) & (ys[lo:hi] < y0 + ny + r - 0.5))
                if sel.size == 0:
                    continue
                sx, sy, sf = xs[sel], ys[sel], flux[sel]
                off = np.arange(-r, r + 1)
                ci = np.rint(sx).astype(np.int64)[:, None] + off  # template columns (n, S)
                cj = np.rint(sy).astype(np.int64)[:, None] + off  # template rows (n, S)
                dx2 = (ci - sx[:, None]) ** 2 / alpha2
                dy2 = (cj - sy[:, None]) ** 2 / alpha2
                base = 1.0 + dy2[:, :, None] + dx2[:, None, :]  # (n, S, S)
                prof = 1.0 / (base * base * base)  # Moffat, beta = 3
                prof *= (sf / prof.sum(axis=(1, 2)))[:, None, None]
                li, lj = ci - x0, cj - y0
                inside = ((lj >= 0) & (lj < ny))[:, :, None] & ((li >= 0) & (li < nx))[:, None, :]
                flat = lj[:, :, None] * nx + li[:, None, :]
                acc += np.bincount(flat[inside], weights=prof[inside], minlength=nx * ny)
        return out


# ====================================================================================
# Survey
# ====================================================================================
def _layout(
    n_tiles: int, nx: int, ny: int, overlap: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Tile offsets for a 2MASS-like survey: staggered columns of tiles.

    Returns ``(x0, y0, ovx, ovy, jitter)`` with ``x0``/``y0`` shifted so that their
    minimum is 0, tiles ordered scan by scan (column-major, bottom to top).
    """
    ovx = max(1, int(round(overlap * nx)))
    ovy = max(1, int(round(overlap * ny)))
    px, py = nx - ovx, ny - ovy
    if px < 1 or py < 1:
        raise ValueError(f"overlap {overlap} leaves no step between tiles of {nx}x{ny}")
    jitter = max(0, min(max(1, int(round(0.01 * min(nx, ny)))), (min(ovx, ovy) - 1) // 2))
    ncols = max(1, int(round(math.sqrt(n_tiles * py / px))))
    nrows = int(math.ceil(n_tiles / ncols))
    ncols = int(math.ceil(n_tiles / nrows))
    # Shift of each scan relative to the previous one, chosen so that every tile
    # overlaps exactly two tiles of the next scan, each by at least ~ovy rows, and
    # clears the others by >= 2 pixels (no slivers, no edge-touching pairs).
    dlo, dhi = ovy + 2 * jitter + 2, py - ovy - 2 * jitter - 2
    x0 = np.empty(n_tiles, dtype=np.int64)
    y0 = np.empty(n_tiles, dtype=np.int64)
    stagger = 0
    for c in range(ncols):
        if c:
            d = int(rng.integers(dlo, dhi + 1)) if dlo <= dhi else int(rng.integers(0, py))
            stagger = (stagger + d) % py
        for r in range(nrows):
            k = c * nrows + r
            if k >= n_tiles:
                break
            x0[k] = c * px
            y0[k] = stagger + r * py
    if jitter:
        x0 += rng.integers(-jitter, jitter + 1, n_tiles)
        y0 += rng.integers(-jitter, jitter + 1, n_tiles)
    x0 -= x0.min()
    y0 -= y0.min()
    return x0, y0, ovx, ovy, jitter


def _coverage(
    rng: np.random.Generator, blank: np.ndarray, ovx: int, ovy: int, jitter: int
) -> np.ndarray | None:
    """Draw the blank regions of one tile: set them in ``blank``, return the coverage.

    The coverage (fraction of each pixel covered by the input image) is returned only
    when it is not 1 everywhere, else None. The depths of the blank regions are kept
    to a third of the overlap strips, so that no overlap can be blanked completely.
    """
    ny, nx = blank.shape
    mx = max(1, (ovx - 2 * jitter) // 3)
    my = max(1, (ovy - 2 * jitter) // 3)
    cover: np.ndarray | None = None
    # clipped corners of a slightly rotated input image
    if rng.random() < 0.5:
        cover = np.ones((ny, nx))
        dx = float(rng.integers(1, mx + 1))
        dy = float(rng.integers(1, my + 1))
        u = (np.arange(nx) + 0.5) / nx
        v = (np.arange(ny) + 0.5) / ny
        if rng.random() < 0.5:
            u, v = u[::-1], v[::-1]
        w = min(nx, int(dx) + 1)
        h = min(ny, int(dy) + 1)
        i, j = np.arange(w, dtype=float), np.arange(h, dtype=float)
        # left, right: boundary depth varies along the column; bottom, top along the row
        cover[:, :w] *= np.clip(i[None, :] + 1.0 - dx * (1.0 - v)[:, None], 0.0, 1.0)
        cover[:, nx - w :] *= np.clip(i[None, ::-1] + 1.0 - dx * v[:, None], 0.0, 1.0)
        cover[:h, :] *= np.clip(j[:, None] + 1.0 - dy * u[None, :], 0.0, 1.0)
        cover[ny - h :, :] *= np.clip(j[::-1, None] + 1.0 - dy * (1.0 - u)[None, :], 0.0, 1.0)
        blank |= cover < 1e-3
    # a bad column, whole or from some row to an edge (away from the side overlaps)
    if rng.random() < 0.3:
        lo, hi = ovx + 2 * jitter + 2, nx - ovx - 2 * jitter - 2
        if lo < hi:
            col = int(rng.integers(lo, hi))
            start = 0 if rng.random() < 0.5 else int(rng.integers(0, ny))
            if rng.random() < 0.5:
                blank[start:, col] = True
            else:
                blank[: ny - start, col] = True
    # a few blank rows along the top or bottom edge
    if rng.random() < 0.2:
        depth = int(rng.integers(1, my + 1))
        if rng.random() < 0.5:
            blank[:depth, :] = True
        else:
            blank[ny - depth :, :] = True
    return cover


def _write_fits(path: Path, cards: Sequence[str], data: np.ndarray) -> None:
    """Write a single-HDU FITS file from ready 80-character card images.

    ``data`` must already be big-endian (FITS byte order): it is written as is, with
    no copy. This is several times faster than building an astropy HDU per file.
    """
    text = "".join(card.ljust(80) for card in cards) + "END".ljust(80)
    text += " " * (-len(text) % 2880)
    with open(path, "wb") as fh:
        fh.write(text.encode("ascii"))
        data.tofile(fh)
        fh.write(b"\0" * (-data.nbytes % 2880))


def _n_workers(n_jobs: int | None, n_tiles: int) -> int:
    if n_jobs is None:
        n_jobs = min(4, os.cpu_count() or 1)
    elif n_jobs < 0:
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, min(int(n_jobs), n_tiles))


class _TileMaker:
    """Renders and writes one tile (and its area image); callable from worker threads.

    Each thread keeps its own work buffers, so a tile costs no large allocations.
    """

    def __init__(
        self,
        *,
        sky: _Sky,
        template: fits.Header,
        projdir: Path,
        seed: int,
        noise: float,
        areas: bool,
        nan_masks: bool,
        dtype: np.dtype,
        overlaps: tuple[int, int],
        jitter: int,
    ) -> None:
        self.sky = sky
        self.template = template
        self.projdir = projdir
        self.seed = seed
        self.noise = noise
        self.areas = areas
        self.nan_masks = nan_masks
        self.dtype = dtype
        self.overlaps = overlaps
        self.jitter = jitter
        self.tn1, self.tn2 = int(template["NAXIS1"]), int(template["NAXIS2"])
        self.tc1, self.tc2 = float(template["CRPIX1"]), float(template["CRPIX2"])
        self._local = threading.local()
        keys = ("CTYPE1", "CTYPE2", "EQUINOX", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2")
        self._wcs = [fits.Card(key, template[key]).image for key in keys if key in template]
        self._bitpix = -8 * dtype.itemsize

    def _cards(self, tile: Tile, extra: Sequence[tuple[str, object, str]]) -> list[str]:
        """Card images of a tile header: the template WCS with the tile's CRPIX."""
        card = fits.Card
        return [
            card("SIMPLE", True, "conforms to FITS standard").image,
            card("BITPIX", self._bitpix, "array data type").image,
            card("NAXIS", 2, "number of array dimensions").image,
            card("NAXIS1", tile.nx).image,
            card("NAXIS2", tile.ny).image,
            *self._wcs,
            card("CRPIX1", self.tc1 - tile.x0).image,
            card("CRPIX2", self.tc2 - tile.y0).image,
            card("CROTA2", float(self.template.get("CROTA2", 0.0))).image,
            card("ORIGIN", "diffit.datasets").image,
            *(card(*item).image for item in extra),
        ]

    def _buffers(self, ny: int, nx: int) -> dict[str, np.ndarray]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None or bufs["img"].shape != (ny, nx):
            big_endian = self.dtype.newbyteorder(">")  # FITS byte order: written without a copy
            bufs = {
                "img": np.empty((ny, nx), dtype=self.dtype),
                "out": np.empty((ny, nx), dtype=big_endian),
                "blank": np.empty((ny, nx), dtype=bool),
            }
            self._local.bufs = bufs
        return bufs

    def __call__(self, k: int, tile: Tile) -> tuple[float, float, float, float]:
        nx, ny = tile.nx, tile.ny
        rng = np.random.default_rng([self.seed, 3, k])
        fwhm = min(_FWHM * math.exp(_FWHM_SCATTER * rng.standard_normal()), _FWHM_MAX)
        a, b = rng.normal(0.0, _BG_SLOPE / max(nx, ny), 2)
        c = float(rng.normal(0.0, _BG_LEVEL_STD))
        tilt = rng.normal(0.0, _AREA_TILT, 2)
        bufs = self._buffers(ny, nx)
        img, out, blank = bufs["img"], bufs["out"], bufs["blank"]

        it = np.arange(tile.x0, tile.x0 + nx, dtype=np.float64)  # template columns
        jt = np.arange(tile.y0, tile.y0 + ny, dtype=np.float64)  # template rows
        self.sky.render(tile.x0, tile.y0, fwhm, out=img)
        img += (a * (it - self.tc1))[None, :]
        img += (b * (jt - self.tc2) + c)[:, None]
        if self.noise > 0:
            gauss = rng.standard_normal((ny, nx), dtype=np.float32)
            gauss *= self.noise
            img += gauss
            del gauss
            ncr = int(rng.poisson(_CR_RATE * nx * ny))
            flat = rng.integers(0, nx * ny, ncr)
            img.reshape(-1)[flat] += self.noise * 10.0 ** rng.uniform(1.0, 2.7, ncr)

        blank.fill(False)
        cover = None
        if self.nan_masks:
            cover = _coverage(rng, blank, *self.overlaps, self.jitter)
        if cover is not None and not self.areas:
            blank |= cover < 0.5

        out[...] = img
        out[blank] = np.nan
        extra = [
            ("BUNIT", "DN", ""),
            ("FWHM", round(fwhm, 4), "PSF FWHM [pixels]"),
            ("BGA", float(a), "injected bg slope in x = i - template CRPIX1"),
            ("BGB", float(b), "injected bg slope in y = j - template CRPIX2"),
            ("BGC", c, "injected bg level at x = y = 0"),
        ]
        _write_fits(self.projdir / tile.name, self._cards(tile, extra), out)

        if self.areas:
            # ~1: a 1 % fall-off from the template centre plus a small per-tile tilt
            half_diag2 = (self.tn1 / 2.0) ** 2 + (self.tn2 / 2.0) ** 2
            row = tilt[0] * np.linspace(-1.0, 1.0, nx) - _AREA_FIELD * (it - (self.tn1 - 1) / 2.0) ** 2 / half_diag2
            col = tilt[1] * np.linspace(-1.0, 1.0, ny) - _AREA_FIELD * (jt - (self.tn2 - 1) / 2.0) ** 2 / half_diag2
            np.add(1.0 + col[:, None], row[None, :], out=img)
            if cover is not None:
                img *= cover
            out[...] = img
            out[blank] = 0.0
            area_name = tile.name[: -len(".fits")] + "_area.fits"
            _write_fits(self.projdir / area_name, self._cards(tile, ()), out)
        return float(a), float(b), c, round(fwhm, 4)


def make_survey(
    directory: str | os.PathLike[str],
    *,
    n_tiles: int = 16,
    tile_shape: tuple[int, int] = (256, 128),
    overlap: float = 0.1,
    seed: int = 0,
    noise: float = 1.0,
    areas: bool = True,
    nan_masks: bool = True,
    dtype: str | np.dtype = "float32",
    sky: str = "stars+nebula",
    n_jobs: int | None = 1,
) -> Survey:
    """Generate a synthetic survey of projected tiles, ready for mDiffFitExec.

    Writes ``directory/projected/tile_NNNN.fits`` (+ ``tile_NNNN_area.fits``),
    ``directory/template.hdr``, ``directory/images.tbl`` and ``directory/diffs.tbl``.
    Existing files of the same names are overwritten; nothing else is removed.

    Parameters
    ----------
    directory : path-like
        Output directory (created if needed).
    n_tiles : int, optional
        Number of tiles.
    tile_shape : (int, int), optional
        ``(ny, nx)`` of every tile, numpy order (2MASS: ``(1024, 512)``).
    overlap : float, optional
        Fractional overlap of neighbouring tiles, along each axis (0 < overlap < 0.5).
    seed : int, optional
        Seed; the output is a deterministic function of all arguments.
    noise : float, optional
        Standard deviation of the Gaussian pixel noise (DN). Cosmic-ray amplitudes
        scale with it (none when 0).
    areas : bool, optional
        Write area images ``<base>_area.fits``: about 1 (a 1 % field-dependent fall-off
        times a +-0.05 % per-tile tilt), fractional where a clipped corner partially
        covers a pixel, 0 where the tile is blank.
    nan_masks : bool, optional
        Blank (NaN) some regions: clipped corners of a rotated input image (half the
        tiles), a bad column (30 %), a few blank edge rows (20 %). The blanks are kept
        shallower than the overlaps, so no overlap is blanked completely.
    dtype : str or numpy dtype, optional
        Floating type of the tiles and area images.
    sky : str, optional
        ``"+"``-separated sky components: ``"stars"``, ``"nebula"``; ``"none"`` (or
        ``""``) for a blank sky (background planes and noise only).
    n_jobs : int or None, optional
        Worker threads rendering and writing tiles (``None``: up to 4, one per CPU;
        negative: CPUs + 1 + n_jobs). The output does not depend on it. One thread
        already writes a 400-tile 512x1024 survey in ~11 s (~25 ms per tile, bound
        by the GIL and disk writes), so more threads help little.

    Returns
    -------
    Survey
    """
    ny, nx = (int(v) for v in tile_shape)
    if n_tiles < 1:
        raise ValueError(f"n_tiles must be >= 1, got {n_tiles}")
    if nx < 4 or ny < 4:
        raise ValueError(f"tiles must be at least 4x4 pixels, got tile_shape={tile_shape}")
    if not 0.0 < overlap < 0.5:
        raise ValueError(f"overlap must be in (0, 0.5), got {overlap}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    dtype = dtype.newbyteorder("=")
    parts = {p.strip() for p in sky.split("+")} - {"", "none"}
    if not parts <= _SKY_COMPONENTS:
        raise ValueError(f"unknown sky component(s) {sorted(parts - _SKY_COMPONENTS)} in {sky!r}")
    components = frozenset(parts)

    directory = Path(directory)
    projdir = directory / "projected"
    projdir.mkdir(parents=True, exist_ok=True)

    x0, y0, ovx, ovy, jitter = _layout(n_tiles, nx, ny, overlap, np.random.default_rng([seed, 0]))
    width = max(4, len(str(n_tiles - 1)))
    tiles = tuple(
        Tile(f"tile_{k:0{width}d}.fits", int(x0[k]), int(y0[k]), nx, ny) for k in range(n_tiles)
    )
    tn1, tn2 = int((x0 + nx).max()), int((y0 + ny).max())
    template = make_template_header(tn1, tn2, tn1 // 2 + 0.5, tn2 // 2 + 0.5)

    maker = _TileMaker(
        sky=_Sky(tn1, tn2, seed, components),
        template=template,
        projdir=projdir,
        seed=seed,
        noise=float(noise),
        areas=areas,
        nan_masks=nan_masks,
        dtype=dtype,
        overlaps=(ovx, ovy),
        jitter=jitter,
    )
    workers = _n_workers(n_jobs, n_tiles)
    if workers == 1:
        truth = [maker(k, tile) for k, tile in enumerate(tiles)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            truth = list(pool.map(maker, range(n_tiles), tiles))
    planes = np.array([t[:3] for t in truth])
    fwhms = [t[3] for t in truth]

    template_path = write_template(template, directory / "template.hdr")
    images_path = write_images_table(
        directory / "images.tbl",
        tiles,
        header=template,
        extra={
            "bga": planes[:, 0].tolist(),
            "bgb": planes[:, 1].tolist(),
            "bgc": planes[:, 2].tolist(),
            "fwhm": fwhms,
        },
    )
    pairs = find_overlaps(tiles)
    diffs_path = write_overlap_table(directory / "diffs.tbl", tiles, pairs)
    return Survey(
        directory=directory,
        projdir=projdir,
        template=template_path,
        images_table=images_path,
        diffs_table=diffs_path,
        tiles=tiles,
        n_pairs=len(pairs),
    )


def injected_planes(survey: Survey) -> np.ndarray:
    """The background plane injected into each tile of a survey.

    Parameters
    ----------
    survey : Survey
        From :func:`make_survey`.

    Returns
    -------
    numpy.ndarray, shape (n_tiles, 3)
        ``(a, b, c)`` per tile, in ``cntr`` order, such that tile ``k`` carries
        ``a*x + b*y + c`` with Montage's ``x = i - CRPIX1``, ``y = j - CRPIX2``
        (0-based template pixel ``(i, j)``, template CRPIX). The plane mFitplane should
        find for the pair ``(k, l)`` of ``diffs.tbl`` (plus - minus) is
        ``planes[k] - planes[l]``, up to noise and the small area-weighting terms.
    """
    lines = survey.images_table.read_text().splitlines()
    header = lines[0]
    bars = [i for i, ch in enumerate(header) if ch == "|"]
    names = [header[a + 1 : b].strip() for a, b in zip(bars[:-1], bars[1:])]
    want = [names.index(c) for c in ("bga", "bgb", "bgc")]
    rows = [ln for ln in lines[1:] if ln.strip() and not ln.startswith(("|", "\\"))]
    out = np.empty((len(rows), 3))
    for r, line in enumerate(rows):
        for q, col in enumerate(want):
            out[r, q] = float(line[bars[col] + 1 : bars[col + 1]])
    return out
