"""A quality-assurance picture of a fits.tbl: the overlap network and the fit statistics.

:func:`plot_fits` draws, on the common pixel grid, every image's footprint and every
overlap of the overlap table, each fitted overlap marked at its centre and coloured by
the fitted difference there; pairs whose fit looks suspicious are flagged, and pairs of
the overlap table without a fits.tbl row (failed pairs) are drawn dashed. Beside it,
histograms of the fits' rms and pixel counts, with the flagged ones marked.

Coordinates follow Montage: ``x = i - CRPIX1``, ``y = j - CRPIX2`` for the 0-based
column ``i`` and row ``j`` of an image, which for images on one template grid is the
same frame for all of them (and the frame of fits.tbl's xcenter, ycenter).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffit.pair import file_path
from diffit.runner import RunError
from diffit.tables import TableError, iter_overlap_table, read_fits_table

log = logging.getLogger(__name__)

INSTALL_HINT = "the plot command needs: pip install 'diffit[plot]'"

#: Robust z-score (median / MAD) beyond which an rms or a pixel count is flagged.
Z_LIMIT = 5.0
#: Overlaps with fewer pixels than this fraction of the median are flagged as tiny.
TINY_FRACTION = 0.01

_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Footprint:
    """An image's extent in Montage's pixel frame.

    Attributes
    ----------
    x0, y0 : float
        ``-CRPIX1``, ``-CRPIX2``: the frame coordinates of the image's pixel ``(0, 0)``.
    nx, ny : int
        ``NAXIS1``, ``NAXIS2``.
    """

    x0: float
    y0: float
    nx: int
    ny: int

    @property
    def center(self) -> tuple[float, float]:
        """Frame coordinates of the image centre."""
        return self.x0 + (self.nx - 1) / 2.0, self.y0 + (self.ny - 1) / 2.0


@dataclass(frozen=True)
class FitColumns:
    """The fits.tbl columns the picture needs, as arrays (one element per row)."""

    plus: np.ndarray
    minus: np.ndarray
    xcenter: np.ndarray
    ycenter: np.ndarray
    offset: np.ndarray
    npixel: np.ndarray
    rms: np.ndarray

    def __len__(self) -> int:
        return int(self.plus.size)


def robust_z(values: np.ndarray) -> np.ndarray:
    """Distance from the median in units of the MAD-estimated standard deviation.

    Parameters
    ----------
    values : numpy.ndarray
        Sample; non-finite values get ``inf``.

    Returns
    -------
    numpy.ndarray
        ``|v - median| / (1.4826 * MAD)``. When the MAD is 0 (half the sample or more
        is identical), any value different from the median gets ``inf``.
    """
    values = np.asarray(values, dtype=float)
    z = np.full(values.shape, np.inf)
    finite = np.isfinite(values)
    if not finite.any():
        return z
    good = values[finite]
    median = np.median(good)
    scale = _MAD_TO_SIGMA * np.median(np.abs(good - median))
    deviation = np.abs(good - median)
    if scale > 0:
        z[finite] = deviation / scale
    else:
        z[finite] = np.where(deviation > 0, np.inf, 0.0)
    return z


def flag_outliers(rms: np.ndarray, npixel: np.ndarray) -> dict[str, np.ndarray]:
    """Flag fits whose rms or pixel count stands out from the rest.

    Parameters
    ----------
    rms, npixel : numpy.ndarray
        fits.tbl's ``rms`` and ``npixel`` columns.

    Returns
    -------
    dict of str to boolean numpy.ndarray
        ``"rms"``: robust z of the rms above :data:`Z_LIMIT` (or not finite);
        ``"npixel"``: robust z of ``log10(npixel)`` above :data:`Z_LIMIT` (overlap areas
        spread over decades, so they are compared by ratio);
        ``"tiny"``: fewer pixels than :data:`TINY_FRACTION` of the median;
        ``"any"``: any of these.
    """
    rms = np.asarray(rms, dtype=float)
    npixel = np.asarray(npixel, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lognpix = np.where(npixel > 0, np.log10(np.where(npixel > 0, npixel, 1.0)), -np.inf)
    flags = {"rms": robust_z(rms) > Z_LIMIT, "npixel": robust_z(lognpix) > Z_LIMIT}
    median = np.median(npixel) if npixel.size else 0.0
    flags["tiny"] = npixel < TINY_FRACTION * median
    flags["any"] = flags["rms"] | flags["npixel"] | flags["tiny"]
    return flags


def _read_fits(path: str) -> FitColumns:
    try:
        rows = read_fits_table(path)
    except TableError as error:
        raise RunError(f"cannot plot: {error}") from None
    n = len(rows)

    def column(name: str, dtype: type) -> np.ndarray:
        return np.fromiter((row[name] for row in rows), dtype=dtype, count=n)

    a, b, c = column("a", float), column("b", float), column("c", float)
    xcenter, ycenter = column("xcenter", float), column("ycenter", float)
    return FitColumns(plus=column("plus", np.int64), minus=column("minus", np.int64),
                      xcenter=xcenter, ycenter=ycenter, offset=a * xcenter + b * ycenter + c,
                      npixel=column("npixel", np.int64), rms=column("rms", float))


def _read_pairs(path: str) -> tuple[list[tuple[int, int]], dict[int, str]]:
    """Overlap-table pairs (cntr1, cntr2) and the image name of every cntr."""
    names: dict[int, str] = {}
    pairs: list[tuple[int, int]] = []
    try:
        for pair in iter_overlap_table(path):
            if not pair.plus or not pair.minus:
                continue  # a blank record
            names.setdefault(pair.cntr1, pair.plus)
            names.setdefault(pair.cntr2, pair.minus)
            pairs.append((pair.cntr1, pair.cntr2))
    except TableError as error:
        raise RunError(f"cannot plot: {error}") from None
    return pairs, names


def _read_footprints(projdir: str, names: dict[int, str]) -> dict[int, Footprint]:
    from astropy.io import fits

    footprints = {}
    for cntr, name in names.items():
        path = file_path(projdir, name)
        try:
            header = fits.getheader(path)
            footprints[cntr] = Footprint(x0=-float(header["CRPIX1"]), y0=-float(header["CRPIX2"]),
                                         nx=int(header["NAXIS1"]), ny=int(header["NAXIS2"]))
        except FileNotFoundError:
            raise RunError(f"cannot plot: image {path} not found (check --projdir)") from None
        except KeyError as error:
            raise RunError(f"cannot plot: image {path} has no {error.args[0]} keyword") from None
        except (OSError, ValueError, TypeError) as error:
            message = " ".join(str(error).split())
            raise RunError(f"cannot plot: cannot read the header of {path}: {message}") from None
    return footprints


def _symmetric_limit(values: np.ndarray) -> tuple[float, str]:
    """Colour-scale limit for the offsets (98th percentile of |offset| when there are
    enough, so that one wild fit does not wash out the rest) and how it was chosen."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0, "no finite offsets"
    if finite.size >= 50:
        limit, how = float(np.percentile(finite, 98)), "98th percentile of |offset|"
    else:
        limit, how = float(finite.max()), "max |offset|"
    return (limit, how) if limit > 0 else (1.0, how)


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def plot_fits(
    fits: str | os.PathLike,
    *,
    projdir: str | os.PathLike,
    diffs: str | os.PathLike,
    output: str | os.PathLike = "qa.png",
) -> Path:
    """Draw a QA picture of a fits.tbl and save it as a PNG.

    Parameters
    ----------
    fits : path
        The fits.tbl written by diffit (or Montage's mDiffFitExec).
    projdir : path
        Folder of the projected images (only their headers are read).
    diffs : path
        The overlap table the fits.tbl was made from.
    output : path, optional
        PNG file to write.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    RunError
        If matplotlib is missing, a table cannot be read, an image is missing or its
        header lacks NAXISn/CRPIXn, fits.tbl refers to images the overlap table does
        not list, or the PNG cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection, PolyCollection
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise RunError(INSTALL_HINT) from None
    fits_path, projdir, diffs, output = (os.fspath(p) for p in (fits, projdir, diffs, output))
    fit = _read_fits(fits_path)
    pairs, names = _read_pairs(diffs)
    unknown = sorted((set(fit.plus.tolist()) | set(fit.minus.tolist())) - set(names))
    if unknown:
        raise RunError(f"cannot plot: {fits_path} refers to image cntr {unknown[0]}, which"
                       f" {diffs} does not list (is it the overlap table of this fits.tbl?)")
    footprints = _read_footprints(projdir, names)
    flags = flag_outliers(fit.rms, fit.npixel)
    fitted = set(zip(fit.plus.tolist(), fit.minus.tolist()))
    failed = [p for p in pairs if p not in fitted]
    log.info("plotting %d fits of %d pairs over %d images", len(fit), len(pairs), len(footprints))

    fig = Figure(figsize=(15, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=(2.3, 1.0))
    ax = fig.add_subplot(grid[:, 0])
    ax_rms = fig.add_subplot(grid[0, 1])
    ax_npix = fig.add_subplot(grid[1, 1])

    # --- (a) the network ----------------------------------------------------------
    boxes = [[(f.x0 - 0.5, f.y0 - 0.5), (f.x0 + f.nx - 0.5, f.y0 - 0.5),
              (f.x0 + f.nx - 0.5, f.y0 + f.ny - 0.5), (f.x0 - 0.5, f.y0 + f.ny - 0.5)]
             for f in footprints.values()]
    # marks shrink as the network grows, so that big surveys stay legible
    scale = float(np.clip(np.sqrt(150.0 / max(len(fit), 1)), 0.05, 1.0))
    ax.add_collection(PolyCollection(boxes, facecolors=(0.55, 0.6, 0.7, 0.07),
                                     edgecolors=(0.35, 0.4, 0.5, 0.6),
                                     linewidths=0.7 if len(boxes) <= 500 else 0.25, zorder=1))
    centers = {cntr: f.center for cntr, f in footprints.items()}
    edges = [(centers[p], centers[m]) for p, m in zip(fit.plus.tolist(), fit.minus.tolist())]
    ax.add_collection(LineCollection(edges, colors="0.55", linewidths=0.6 * max(scale, 0.3),
                                     alpha=0.7, zorder=2))
    if failed:
        ax.add_collection(LineCollection([(centers[p], centers[m]) for p, m in failed],
                                         colors="black", linewidths=1.2, linestyles="--", zorder=3))
    limit, limit_how = _symmetric_limit(fit.offset)
    area = np.clip(fit.npixel.astype(float), 1.0, None)
    sizes = (12.0 + 60.0 * np.sqrt(area / area.max())) * scale if len(fit) else np.zeros(0)
    points = ax.scatter(fit.xcenter, fit.ycenter, c=fit.offset, s=sizes, cmap="RdBu_r",
                        vmin=-limit, vmax=limit, edgecolors="0.25",
                        linewidths=0.4 if len(fit) <= 2000 else 0.0, zorder=4)
    bad = flags["any"]
    if bad.any():
        ax.scatter(fit.xcenter[bad], fit.ycenter[bad], s=sizes[bad] * 3.0 + 60.0 * scale,
                   marker="o", facecolors="none", edgecolors="#e6007e",
                   linewidths=1.8 if scale > 0.3 else 0.8, zorder=5)
    clipped = bool(np.any(np.abs(fit.offset[np.isfinite(fit.offset)]) > limit))
    bar = fig.colorbar(points, ax=ax, shrink=0.85, pad=0.01, extend="both" if clipped else "neither")
    bar.set_label("fitted difference at the overlap centre, a·x + b·y + c (plus − minus)")
    handles = [
        Line2D([], [], marker="o", linestyle="none", markerfacecolor="0.8", markeredgecolor="0.25",
               markersize=7, label=f"fitted overlap ({len(fit)}), size ∝ √npixel"),
        Line2D([], [], marker="o", linestyle="none", markerfacecolor="none",
               markeredgecolor="#e6007e", markeredgewidth=1.8, markersize=11,
               label=f"flagged ({int(bad.sum())})"),
    ]
    if failed:
        handles.append(Line2D([], [], color="black", linestyle="--",
                              label=f"failed pair, no fit ({len(failed)})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.06), ncol=3,
              fontsize=9, frameon=False)
    ax.set_aspect("equal")
    ax.autoscale_view()
    ax.margins(0.02)
    ax.set_xlabel("x = i − CRPIX1 (pixels)")
    ax.set_ylabel("y = j − CRPIX2 (pixels)")
    ax.set_title(f"overlap network: {len(footprints)} images, {len(pairs)} pairs", fontsize=11)

    # --- (b) the statistics ---------------------------------------------------------
    _histogram(ax_rms, fit.rms, flags["rms"], log_scale=False,
               xlabel="rms of the fit (DN)", title="rms of the plane fits")
    tiny = (TINY_FRACTION * float(np.median(fit.npixel)), f"tiny: < {TINY_FRACTION:.0%} of median") \
        if len(fit) else None
    _histogram(ax_npix, fit.npixel.astype(float), flags["npixel"] | flags["tiny"], log_scale=True,
               xlabel="npixel (pixels in the fit)", title="overlap sizes", threshold=tiny)

    median_rms = float(np.median(fit.rms[np.isfinite(fit.rms)])) if np.isfinite(fit.rms).any() \
        else math.nan
    median_npix = float(np.median(fit.npixel)) if len(fit) else math.nan
    fig.suptitle(
        f"diffit QA — {Path(fits_path).name}: {len(fit)} of {len(pairs)} pairs fitted"
        f" ({len(failed)} failed), {len(footprints)} images\n"
        f"median rms {_fmt(median_rms)} DN, median npixel {_fmt(median_npix)},"
        f" colour scale ±{_fmt(limit)} DN ({limit_how}), {int(bad.sum())} flagged"
        f" ({int(flags['rms'].sum())} rms, {int(flags['npixel'].sum())} npixel,"
        f" {int(flags['tiny'].sum())} tiny; robust z > {Z_LIMIT:g})",
        fontsize=12,
    )
    try:
        fig.savefig(output, dpi=100)
    except OSError as error:
        raise RunError(f"cannot write {output}: {error.strerror or error}") from None
    return Path(output)


def _histogram(ax, values: np.ndarray, flagged: np.ndarray, *, log_scale: bool, xlabel: str,
               title: str, threshold: tuple[float, str] | None = None) -> None:
    finite = np.isfinite(values) & (values > 0 if log_scale else True)
    good, bad = values[finite & ~flagged], values[finite & flagged]
    every = values[finite]
    if every.size:
        low, high = float(every.min()), float(every.max())
        if high <= low:
            low, high = (low * 0.9, low * 1.1) if low > 0 else (low - 1.0, low + 1.0)
        n_bins = int(np.clip(np.sqrt(every.size) * 2, 10, 60))
        bins = np.geomspace(low, high, n_bins + 1) if log_scale else np.linspace(low, high, n_bins + 1)
        ax.hist([good, bad], bins=bins, stacked=True, color=["#4477aa", "#e6007e"],
                label=[f"ok ({good.size})", f"flagged ({bad.size})"])
        ax.axvline(float(np.median(every)), color="black", linewidth=1.0, label="median")
        if threshold is not None and threshold[0] > 0:
            ax.axvline(threshold[0], color="#e6007e", linestyle=":", linewidth=1.2,
                       label=threshold[1])
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no fitted pairs", transform=ax.transAxes, ha="center", va="center")
    if log_scale:
        ax.set_xscale("log")
    ax.set_yscale("log" if every.size > 200 else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.set_title(title, fontsize=11)


__all__ = ["plot_fits", "flag_outliers", "robust_z", "Footprint", "Z_LIMIT", "TINY_FRACTION"]
