"""Parity with MontagePy: diffit's ``mDiffFitExec`` against MontagePy's on the same files.

The inputs come from :mod:`parity_cases` (a few hundred generated pairs in a few dozen
groups, one ``mDiffFitExec`` call per group). For every group both implementations are
run on the same projdir, diffs.tbl and template, each with its own output folder, and
the suite asserts

1. the fits.tbl files are identical character for character (header and every row, in
   the same order) -- on failure the first differing line of each side is shown with its
   pair and the fits.tbl column where they part;
2. the return dicts are identical (keys, order, values and value types);
3. with ``keepAll=True`` (a subset of groups) every difference image and ``_area`` image
   is bit-identical: same file names, BITPIX -64, NAXIS1/2, CRPIX1/2 (float equality)
   and the same pixels (NaN layout, and the bits of every other value, signed zeros
   included).

:func:`test_montage_pipeline_end_to_end` also runs images that Montage itself made:
raw frames on rotated WCSs through mImgtbl, mMakeHdr, mProjectPP and mOverlaps, then
both mDiffFitExecs, then mBgModel on each fits.tbl (the same corrections).

MontagePy is run once per group and mode and cached for the module; it runs with
``debug=1`` and its C stdout is captured, so :func:`test_generator_coverage` can check,
from MontagePy's own messages, that the generator still produces the successes and the
failure kinds it claims.

The implementation under test is the ``candidate`` fixture (``diffit.mDiffFitExec``).
Set ``DIFFIT_PARITY_CANDIDATE=montagepy`` to point it at MontagePy itself, which checks
the harness.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from diffit.datasets import make_survey

montage = pytest.importorskip("MontagePy.main")

from parity_cases import (  # noqa: E402 - after the importorskip on purpose
    EXPECTED_OUTCOMES,
    GroupPlan,
    ParityGroup,
    make_parity_group,
    plan_parity_groups,
)

SEED = 20240611
N_PAIRS = 220
PLANS = plan_parity_groups(SEED, N_PAIRS)
KEEPALL_PLANS = [plan for plan in PLANS if plan.keep_all]

#: Names of the fits.tbl columns, in order (montage-behaviour.md section 5.1).
FITS_COLUMNS = ("plus", "minus", "a", "b", "c", "crpix1", "crpix2", "xmin", "xmax", "ymin", "ymax",
                "xcenter", "ycenter", "npixel", "rms", "boxx", "boxy", "boxwidth", "boxheight", "boxang")


# --------------------------------------------------------------------------------------
# Running an implementation
# --------------------------------------------------------------------------------------

@dataclass
class Run:
    """What one ``mDiffFitExec`` call produced.

    Attributes
    ----------
    result : dict
        The returned dict.
    fits_tbl : str
        Text of the fits.tbl written ('' if none was written).
    diffdir : Path
        The difference-image folder the call was given.
    log : str
        Captured C stdout (MontagePy's debug lines), '' when not captured.
    """

    result: dict
    fits_tbl: str
    diffdir: Path
    log: str = ""


@contextlib.contextmanager
def c_stdout_to(path: Path):
    """Send file descriptor 1 (C ``printf`` output) to ``path`` for the duration.

    Parameters
    ----------
    path : Path
        File that receives the output.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(target, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


def run_exec(function, group: ParityGroup, outdir: Path, keep_all: bool, capture: bool = False) -> Run:
    """Call ``function`` (an ``mDiffFitExec``) on a group with a fresh output folder.

    Parameters
    ----------
    function : callable
        MontagePy's or diffit's ``mDiffFitExec``.
    group : ParityGroup
        Inputs and flags.
    outdir : Path
        Folder for fits.tbl and the difference images; must not exist yet. The fits.tbl
        location is always writable (MontagePy kills the process otherwise).
    keep_all : bool
        ``keepAll`` argument.
    capture : bool, optional
        Run with ``debug=1`` and capture the C stdout in :attr:`Run.log`.

    Returns
    -------
    Run
        The call's result and outputs.
    """
    diffdir = outdir / "diffs"
    diffdir.mkdir(parents=True)
    fitfile = outdir / "fits.tbl"
    args = (str(group.projdir), str(group.diffs_table), str(group.template), str(diffdir), str(fitfile))
    flags = {"keepAll": keep_all, "levelOnly": group.levelOnly, "noAreas": group.noAreas}
    log = ""
    if capture:
        with c_stdout_to(outdir / "stdout.txt"):
            result = function(*args, debug=1, **flags)
        log = (outdir / "stdout.txt").read_text(errors="replace")
    else:
        result = function(*args, **flags)
    text = fitfile.read_text() if fitfile.exists() else ""
    return Run(result, text, diffdir, log)


class Workspace:
    """Generated groups and MontagePy's reference runs, made on first use and cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._groups: dict[str, ParityGroup] = {}
        self._references: dict[tuple[str, bool], Run] = {}
        self._calls = Counter()

    def group(self, plan: GroupPlan) -> ParityGroup:
        """The written group for ``plan``."""
        if plan.name not in self._groups:
            self._groups[plan.name] = make_parity_group(self.root / "inputs", SEED, plan)
        return self._groups[plan.name]

    def reference(self, plan: GroupPlan, keep_all: bool = False) -> Run:
        """MontagePy's run of the group (debug output captured)."""
        key = (plan.name, keep_all)
        if key not in self._references:
            outdir = self.root / "montagepy" / f"{plan.name}{'-keepall' if keep_all else ''}"
            self._references[key] = run_exec(montage.mDiffFitExec, self.group(plan), outdir, keep_all, capture=True)
        return self._references[key]

    def candidate_run(self, function, plan: GroupPlan, keep_all: bool = False) -> Run:
        """The candidate's run of the group, in a folder of its own."""
        self._calls[(plan.name, keep_all)] += 1
        n = self._calls[(plan.name, keep_all)]
        outdir = self.root / "candidate" / f"{plan.name}{'-keepall' if keep_all else ''}-{n}"
        return run_exec(function, self.group(plan), outdir, keep_all)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """Module-wide generated inputs and MontagePy reference runs."""
    return Workspace(tmp_path_factory.mktemp("parity"))


@pytest.fixture
def candidate():
    """The ``mDiffFitExec`` under test: ``diffit.mDiffFitExec``.

    ``DIFFIT_PARITY_CANDIDATE=montagepy`` selects MontagePy itself, to check the harness.
    """
    if os.environ.get("DIFFIT_PARITY_CANDIDATE", "").strip().lower() == "montagepy":
        return montage.mDiffFitExec
    from diffit import mDiffFitExec

    return mDiffFitExec


# --------------------------------------------------------------------------------------
# Comparisons (each returns a human-readable report, '' when equal)
# --------------------------------------------------------------------------------------

def _column_at(header: str, position: int) -> str:
    """The fits.tbl column holding character ``position`` (from the header's bars)."""
    bars = [k for k, char in enumerate(header) if char == "|"]
    for k in range(len(bars) - 1):
        if bars[k] <= position < bars[k + 1]:
            return FITS_COLUMNS[k] if k < len(FITS_COLUMNS) else f"column {k}"
    return "past the last column"


def _pair_of(line: str | None) -> str:
    """``cntr1 cntr2`` of a fits.tbl row, or a placeholder."""
    if line is None:
        return "<no line>"
    fields = line.split()
    return f"pair {fields[0]} {fields[1]}" if len(fields) >= 2 and fields[0].lstrip("-").isdigit() else "header"


def compare_fits_tbl(want: str, got: str) -> str:
    """Report the first line where two fits.tbl texts differ.

    Parameters
    ----------
    want, got : str
        MontagePy's and the candidate's fits.tbl text.

    Returns
    -------
    str
        '' if identical, else the line number, pair, first differing column and both lines.
    """
    if want == got:
        return ""
    want_lines, got_lines = want.splitlines(keepends=True), got.splitlines(keepends=True)
    header = want_lines[0] if want_lines else ""
    report = [f"fits.tbl differs: MontagePy {len(want_lines)} lines, candidate {len(got_lines)} lines"]
    for k in range(max(len(want_lines), len(got_lines))):
        w = want_lines[k] if k < len(want_lines) else None
        g = got_lines[k] if k < len(got_lines) else None
        if w == g:
            continue
        where = _pair_of(w) if w is not None else _pair_of(g)
        if w is not None and g is not None:
            col = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
            where += f", first difference at character {col} ({_column_at(header, col)})"
        report += [f"first differing line {k + 1} ({where}):",
                   f"  MontagePy: {w!r}", f"  candidate: {g!r}"]
        break
    return "\n".join(report)


def compare_results(want: dict, got: dict) -> str:
    """Report differences between two return dicts (values, key order, value types)."""
    if list(want.items()) == list(got.items()) and [type(v) for v in want.values()] == [type(v) for v in got.values()]:
        return ""
    return (f"return dicts differ:\n  MontagePy: {want!r} types {[type(v).__name__ for v in want.values()]}"
            f"\n  candidate: {got!r} types {[type(v).__name__ for v in got.values()]}")


def _pixels(path: Path) -> tuple[fits.Header, np.ndarray]:
    """Header and float64 pixels of a difference image."""
    with fits.open(path, memmap=False) as hdul:
        return hdul[0].header.copy(), np.array(hdul[0].data, dtype=np.float64)


def compare_image(want_path: Path, got_path: Path) -> str:
    """Report how two difference (or area) images differ.

    Checks BITPIX -64, NAXIS, NAXIS1/2, CRPIX1/2 (exact float equality) and the pixels:
    the NaN layout and the bit pattern of every non-NaN value (so +0.0 and -0.0 differ).

    Returns
    -------
    str
        '' if they agree, else a description of the first problems found.
    """
    want_header, want = _pixels(want_path)
    got_header, got = _pixels(got_path)
    problems = []
    for key in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "CRPIX1", "CRPIX2"):
        w, g = want_header.get(key), got_header.get(key)
        same = (w is not None and g is not None and float(w) == float(g)) if key.startswith("CRPIX") else w == g
        if not same:
            problems.append(f"{key}: MontagePy {w!r}, candidate {g!r}")
    if got_header.get("BITPIX") != -64:
        problems.append(f"candidate BITPIX is {got_header.get('BITPIX')!r}, not -64")
    if want.shape != got.shape:
        problems.append(f"shape: MontagePy {want.shape}, candidate {got.shape}")
        return "; ".join(problems)
    want_nan, got_nan = np.isnan(want), np.isnan(got)
    if not np.array_equal(want_nan, got_nan):
        j, i = np.argwhere(want_nan != got_nan)[0]
        problems.append(f"NaN layout differs at {int((want_nan != got_nan).sum())} pixels, first [j={j}, i={i}]: "
                        f"MontagePy {want[j, i]!r}, candidate {got[j, i]!r}")
    both = ~want_nan & ~got_nan
    differ = both & (want.view(np.uint64) != got.view(np.uint64))
    if differ.any():
        j, i = np.argwhere(differ)[0]
        delta = float(np.max(np.abs(want[differ] - got[differ])))
        problems.append(f"{int(differ.sum())} pixel values differ (max |delta| {delta:.3g}), first [j={j}, i={i}]: "
                        f"MontagePy {want[j, i]!r}, candidate {got[j, i]!r}")
    return "; ".join(problems)


def compare_diffdirs(want_dir: Path, got_dir: Path) -> str:
    """Report differences between two keepAll difference-image folders."""
    want_names = sorted(p.name for p in want_dir.iterdir())
    got_names = sorted(p.name for p in got_dir.iterdir())
    problems = []
    if want_names != got_names:
        problems.append(f"files only from MontagePy: {sorted(set(want_names) - set(got_names))}; "
                        f"only from the candidate: {sorted(set(got_names) - set(want_names))}")
    for name in sorted(set(want_names) & set(got_names)):
        report = compare_image(want_dir / name, got_dir / name)
        if report:
            problems.append(f"{name}: {report}")
    return "\n".join(problems)


# --------------------------------------------------------------------------------------
# Parity tests
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", PLANS, ids=[plan.name for plan in PLANS])
def test_parity_fits_tbl(workspace, candidate, plan) -> None:
    """fits.tbl and the return dict match MontagePy's (keepAll off)."""
    want = workspace.reference(plan)
    got = workspace.candidate_run(candidate, plan)
    report = "\n".join(r for r in (compare_results(want.result, got.result),
                                   compare_fits_tbl(want.fits_tbl, got.fits_tbl)) if r)
    if report:
        pytest.fail(f"group {plan.name} ({workspace.group(plan).diffs_table}):\n{report}", pytrace=False)


@pytest.mark.parametrize("plan", KEEPALL_PLANS, ids=[plan.name for plan in KEEPALL_PLANS])
def test_parity_keepall_images(workspace, candidate, plan) -> None:
    """With keepAll every difference and area image is bit-identical to MontagePy's."""
    want = workspace.reference(plan, keep_all=True)
    got = workspace.candidate_run(candidate, plan, keep_all=True)
    report = "\n".join(r for r in (compare_results(want.result, got.result),
                                   compare_fits_tbl(want.fits_tbl, got.fits_tbl),
                                   compare_diffdirs(want.diffdir, got.diffdir)) if r)
    if report:
        pytest.fail(f"group {plan.name} (keepAll):\n{report}", pytrace=False)
    assert any(want.diffdir.iterdir()), "MontagePy kept no difference images: generator regression"


# --------------------------------------------------------------------------------------
# Checks of the generator and of the harness itself
# --------------------------------------------------------------------------------------

_DEBUG_LINE = re.compile(r"^(mDiff|mFitplane)\((.*)\) -> \[(.*)\]$", re.M)


def outcomes_from_log(log: str) -> list[str]:
    """Per-pair outcomes (``ok``, ``diff:<msg>``, ``fit:<msg>``) from MontagePy's debug lines."""
    diffs, fits_ = [], []
    for tool, _, message in _DEBUG_LINE.findall(log):
        (diffs if tool == "mDiff" else fits_).append(message)
    assert len(diffs) == len(fits_), "unpaired mDiff/mFitplane debug lines"
    outcomes = []
    for diff_message, fit_message in zip(diffs, fits_):
        if not diff_message.startswith("time="):
            outcomes.append(f"diff:{diff_message}")
        elif not fit_message.startswith("a="):
            outcomes.append(f"fit:{fit_message}")
        else:
            outcomes.append("ok")
    return outcomes


def _rows(text: str) -> list[list[str]]:
    """Whitespace-split data rows of a fits.tbl."""
    return [line.split() for line in text.splitlines()[1:]]


def test_generator_coverage(workspace) -> None:
    """The generated groups produce, in MontagePy, the coverage parity_cases claims."""
    tally: Counter[str] = Counter()
    rows: list[list[str]] = []
    n_pairs = 0
    mismatched = []
    for plan in PLANS:
        group = workspace.group(plan)
        run = workspace.reference(plan)
        outcomes = outcomes_from_log(run.log)
        assert run.result["status"] == "0", (plan.name, run.result)
        assert run.result["count"] == group.n_pairs == len(outcomes), (plan.name, run.result, len(outcomes))
        group_rows = _rows(run.fits_tbl)
        assert len(group_rows) == outcomes.count("ok")
        assert run.result["diff_failed"] == sum(o.startswith("diff:") for o in outcomes)
        assert run.result["fit_failed"] == sum(o.startswith("fit:") for o in outcomes)
        n_pairs += group.n_pairs
        rows += group_rows
        for kind, outcome in zip(group.kinds, outcomes):
            tally[outcome.split(" /")[0] if outcome != "ok" else "ok"] += 1
            expected = EXPECTED_OUTCOMES.get(kind, {})
            want = expected.get((plan.levelOnly, plan.noAreas), expected.get(None))
            if want is not None and not outcome.startswith(want):
                mismatched.append(f"{plan.name}: {kind} gave {outcome!r}, built for {want!r}")
    assert not mismatched, "\n".join(mismatched)
    summary = f"{n_pairs} pairs in {len(PLANS)} groups; outcomes {dict(tally)}"
    assert n_pairs >= 200, summary
    assert len(rows) >= 150, summary
    for needed in ("diff:Images don't overlap", "diff:All pixels are blank.", "fit:Too few pixels to fit",
                   "fit:Singular Matrix", "diff:Area file", "diff:Image file"):
        assert sum(n for outcome, n in tally.items() if outcome.startswith(needed)) >= 1, (needed, summary)
    assert tally["diff:Images don't overlap"] >= 10 and tally["diff:All pixels are blank."] >= 10, summary
    assert sum(n for o, n in tally.items() if o.startswith("fit:")) >= 8, summary
    # rich geometry: tilted boxes, both signs of the offsets, level-only and sloped fits
    angles = Counter(row[-1] for row in rows)
    tilted = sum(n for a, n in angles.items() if a not in ("90.0", "-90.0", "0.0", "-0.0", "180.0", "-180.0"))
    assert len(angles) >= 20 and tilted >= 20, angles
    assert {"90.0", "-0.0", "-180.0"} <= set(angles), angles
    xmins = [int(row[7]) for row in rows]
    assert min(xmins) < 0 < max(xmins)
    level_rows = [row for row in rows if float(row[2]) == 0.0 and float(row[3]) == 0.0]
    assert 30 <= len(level_rows) < len(rows) - 100
    assert len({row[13] for row in rows}) >= 100  # npixel values


def test_montagepy_is_deterministic(workspace, tmp_path) -> None:
    """MontagePy run twice on a group agrees with itself (the harness's own baseline)."""
    plan = KEEPALL_PLANS[-1]
    first = workspace.reference(plan, keep_all=True)
    again = run_exec(montage.mDiffFitExec, workspace.group(plan), tmp_path / "again", keep_all=True)
    assert compare_results(first.result, again.result) == ""
    assert compare_fits_tbl(first.fits_tbl, again.fits_tbl) == ""
    assert compare_diffdirs(first.diffdir, again.diffdir) == ""


def test_harness_reports_differences(workspace, tmp_path) -> None:
    """The comparators catch a changed character, a missing row and a signed zero."""
    plan = KEEPALL_PLANS[0]
    run = workspace.reference(plan, keep_all=True)
    lines = run.fits_tbl.splitlines(keepends=True)
    assert len(lines) > 2
    row = lines[2]
    changed = row[:-3] + ("1" if row[-3] != "1" else "2") + row[-2:]  # last digit of boxang
    report = compare_fits_tbl(run.fits_tbl, "".join(lines[:2] + [changed] + lines[3:]))
    assert "line 3" in report and _pair_of(row) in report and "(boxang)" in report
    assert "candidate 2 lines" in compare_fits_tbl(run.fits_tbl, "".join(lines[:2]))
    assert compare_results(run.result, {**run.result, "count": float(run.result["count"])})
    assert compare_results({"status": "1", "msg": b"x"}, {"status": "1", "msg": "x"})

    copy = tmp_path / "copy"
    shutil.copytree(run.diffdir, copy)
    name = next(p.name for p in sorted(copy.iterdir()) if not p.name.endswith("_area.fits"))
    with fits.open(copy / name, mode="update") as hdul:
        data = hdul[0].data
        j, i = np.argwhere(np.isfinite(data))[0]
        data[j, i] = -0.0 if data[j, i] == 0.0 and not np.signbit(data[j, i]) else 0.0
    assert "pixel values differ" in compare_diffdirs(run.diffdir, copy)
    with fits.open(copy / name, mode="update") as hdul:
        hdul[0].header["CRPIX1"] = hdul[0].header["CRPIX1"] + 1e-12
    assert "CRPIX1" in compare_image(run.diffdir / name, copy / name)
    (copy / name).unlink()
    assert "only from MontagePy" in compare_diffdirs(run.diffdir, copy)


# --------------------------------------------------------------------------------------
# Images that Montage itself projected, end to end
# --------------------------------------------------------------------------------------

def _raw_frames(folder: Path, seed: int) -> None:
    """Six overlapping raw frames on their own tangent-plane WCS: rotated by up to 25
    degrees, at a pixel scale of about 1 arcsec (not quite the others'), with a sloped
    background of their own, a few stars, NaN pixels, and float32/float64/scaled int16."""
    rng = np.random.default_rng(seed)
    ny, nx = 90, 110
    scale = 1.0 / 3600
    yy, xx = np.mgrid[0:ny, 0:nx]
    for k in range(6):
        row, col = divmod(k, 3)
        angle = np.deg2rad(rng.uniform(-25, 25))
        pixel = scale * rng.uniform(0.95, 1.05)
        header = fits.Header()
        header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
        header["CRVAL1"] = 150.0 + (col * (nx - 25) + rng.uniform(-5, 5)) * scale / np.cos(np.deg2rad(2.0))
        header["CRVAL2"] = 2.0 + (row * (ny - 20) + rng.uniform(-5, 5)) * scale
        header["CRPIX1"], header["CRPIX2"] = nx / 2 + 0.5, ny / 2 + 0.5
        header["CD1_1"], header["CD1_2"] = -pixel * np.cos(angle), pixel * np.sin(angle)
        header["CD2_1"], header["CD2_2"] = pixel * np.sin(angle), pixel * np.cos(angle)
        header["EQUINOX"] = 2000.0
        data = (rng.uniform(-5, 5) + rng.uniform(-0.02, 0.02) * xx + rng.uniform(-0.02, 0.02) * yy
                + rng.normal(0, 1.0, (ny, nx)))
        for _ in range(5):
            sy, sx = rng.uniform(0, ny), rng.uniform(0, nx)
            data += 50 * np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / 4)
        data[rng.random((ny, nx)) < 0.01] = np.nan
        if k % 3 == 2:  # scaled 16-bit integers with BLANK
            hdu = fits.PrimaryHDU(header=header)
            raw = np.where(np.isnan(data), -32768, np.round(data / 0.01)).astype(">i2")
            hdu.data = raw
            hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.01, 0.0, -32768
        else:
            hdu = fits.PrimaryHDU(data.astype(">f4" if k % 3 else ">f8"), header=header)
        hdu.writeto(folder / f"frame{k}.fits")


def _ok(result: dict, step: str) -> dict:
    assert result["status"] == "0", (step, result)
    return result


@pytest.mark.parametrize("seed", [1, 2])
def test_montage_pipeline_end_to_end(tmp_path: Path, candidate, seed: int) -> None:
    """Raw frames through Montage's own mImgtbl, mMakeHdr (a rotated template),
    mProjectPP and mOverlaps; then the candidate's fits.tbl is MontagePy's, plain and
    level-only, and Montage's mBgModel reads it into the same corrections."""
    raw, projdir = tmp_path / "raw", tmp_path / "projected"
    raw.mkdir()
    projdir.mkdir()
    _raw_frames(raw, seed)
    _ok(montage.mImgtbl(str(raw), str(tmp_path / "raw.tbl")), "mImgtbl")
    _ok(montage.mMakeHdr(str(tmp_path / "raw.tbl"), str(tmp_path / "template.hdr")), "mMakeHdr")
    for frame in sorted(raw.iterdir()):
        _ok(montage.mProjectPP(str(frame), str(projdir / frame.name), str(tmp_path / "template.hdr")),
            f"mProjectPP {frame.name}")
    _ok(montage.mImgtbl(str(projdir), str(tmp_path / "images.tbl")), "mImgtbl")
    overlaps = _ok(montage.mOverlaps(str(tmp_path / "images.tbl"), str(tmp_path / "diffs.tbl")), "mOverlaps")
    assert overlaps["count"] >= 7
    for level_only in (False, True):
        runs = {}
        for name, function in (("montage", montage.mDiffFitExec), ("candidate", candidate)):
            out = tmp_path / f"{name}-{level_only}"
            out.mkdir()
            result = function(str(projdir), str(tmp_path / "diffs.tbl"), str(tmp_path / "template.hdr"),
                              str(out), str(out / "fits.tbl"), levelOnly=level_only)
            _ok(montage.mBgModel(str(tmp_path / "images.tbl"), str(out / "fits.tbl"),
                                 str(out / "corrections.tbl")), "mBgModel")
            runs[name] = (result, (out / "fits.tbl").read_text(), (out / "corrections.tbl").read_text())
        want, got = runs["montage"], runs["candidate"]
        assert want[0]["diff_failed"] + want[0]["fit_failed"] < want[0]["count"]
        assert compare_results(want[0], got[0]) == ""
        assert compare_fits_tbl(want[1], got[1]) == ""
        assert len(got[2].splitlines()) == 1 + 6  # header, a correction for every image
        assert got[2] == want[2]


def _replace_card(path: Path, keyword: str, card: str) -> None:
    """Replace the first ``keyword`` card of a FITS file's header with ``card`` (bytes in place)."""
    data = bytearray(path.read_bytes())
    end = data.index(b"END" + b" " * 77)
    for start in range(0, end, 80):
        if data[start:start + 8] == keyword.ljust(8).encode():
            data[start:start + 80] = card.ljust(80).encode()
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no {keyword} card in {path}")


@pytest.mark.parametrize("mutation", ["duplicate-crpix", "quoted-crpix", "logical-crpix", "quoted-bzero",
                                      "duplicate-bzero", "simple-false", "crpix-lower-case-d",
                                      "crpix-blank-after-number", "bscale-underflow"])
def test_parity_unusual_image_headers(tmp_path: Path, candidate, mutation: str) -> None:
    """Headers that CFITSIO reads for Montage although they are odd: CRPIXn read by
    scanning the whole header (the last card wins), numbers written as strings, and
    SIMPLE = F. The candidate must give Montage's fits.tbl, not fail the pairs."""
    survey = make_survey(tmp_path / "s", n_tiles=6, tile_shape=(48, 40), seed=5)
    image = sorted(survey.projdir.glob("tile_*[0-9].fits"))[2]
    header = fits.getheader(image)
    with fits.open(image, mode="update") as hdul:  # room for the extra card
        hdul[0].header["SPARE"] = 0
    if mutation == "duplicate-crpix":
        _replace_card(image, "SPARE", f"CRPIX1  = {header['CRPIX1'] + 3.0!r}")
    elif mutation == "quoted-crpix":
        _replace_card(image, "CRPIX2", f"CRPIX2  = '{header['CRPIX2']!r}'")
    elif mutation == "crpix-lower-case-d":  # not a number for CFITSIO: its pairs fail
        _replace_card(image, "CRPIX2", f"CRPIX2  = '{header['CRPIX2']!r}d0'")
    elif mutation == "crpix-blank-after-number":
        _replace_card(image, "CRPIX2", f"CRPIX2  = '{header['CRPIX2']!r} px'")
    elif mutation == "bscale-underflow":
        _replace_card(image, "SPARE", "BSCALE  = 1.0E-400")
    elif mutation == "logical-crpix":
        _replace_card(image, "CRPIX2", "CRPIX2  = " + "T".rjust(20))
    elif mutation == "quoted-bzero":
        _replace_card(image, "SPARE", "BZERO   = '5.0'")
    elif mutation == "duplicate-bzero":
        with fits.open(image, mode="update") as hdul:
            hdul[0].header["BZERO"] = 0.0
            hdul[0].header["SPARE2"] = 0
        _replace_card(image, "SPARE2", "BZERO   = 5.0")
    else:
        _replace_card(image, "SIMPLE", "SIMPLE  = " + "F".rjust(20))
    runs = {}
    for name, function in (("montage", montage.mDiffFitExec), ("candidate", candidate)):
        out = tmp_path / name
        out.mkdir()
        result = function(str(survey.projdir), str(survey.diffs_table), str(survey.template), str(out),
                          str(out / "fits.tbl"))
        runs[name] = (result, (out / "fits.tbl").read_text())
    (want, want_tbl), (got, got_tbl) = runs["montage"], runs["candidate"]
    assert want["status"] == "0", want
    assert compare_results(want, got) == ""
    assert compare_fits_tbl(want_tbl, got_tbl) == ""


@pytest.mark.parametrize("cards", [("BZERO   = 32768",), ("BSCALE  = 0.0375", "BZERO   = 812.5"),
                                   ("BZERO   = 'text'",), ("BSCALE  = 2.0d0",), ("BSCALE  = 1.0E-400",)])
def test_parity_template_with_bscale_bzero(tmp_path: Path, candidate, cards) -> None:
    """A template made with mGetHdr from an integer image carries BSCALE/BZERO. mDiff
    copies them into its difference files, so mFitplane fits the values as read back
    through them; the kept images hold them too."""
    survey = make_survey(tmp_path / "s", n_tiles=6, tile_shape=(48, 40), seed=7)
    lines = survey.template.read_text().splitlines()
    end = next(k for k, line in enumerate(lines) if line.startswith("END"))
    survey.template.write_text("\n".join(lines[:end] + list(cards) + lines[end:]) + "\n")
    runs = {}
    for name, function in (("montage", montage.mDiffFitExec), ("candidate", candidate)):
        out = tmp_path / name
        (out / "diffs").mkdir(parents=True)  # Montage does not create it
        result = function(str(survey.projdir), str(survey.diffs_table), str(survey.template),
                          str(out / "diffs"), str(out / "fits.tbl"), keepAll=True)
        runs[name] = (result, (out / "fits.tbl").read_text(), out / "diffs")
    (want, want_tbl, want_dir), (got, got_tbl, got_dir) = runs["montage"], runs["candidate"]
    assert want["status"] == "0" and want["count"] - want["diff_failed"] >= 5, want
    assert compare_results(want, got) == ""
    assert compare_fits_tbl(want_tbl, got_tbl) == ""
    if "text" not in cards[-1] and "E-400" not in cards[-1]:
        # (astropy reads Montage's BZERO = 'text' and BSCALE = 1.0E-400 otherwise than CFITSIO)
        assert compare_diffdirs(want_dir, got_dir) == ""
