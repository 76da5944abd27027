"""Per-input faults end to end (issue 5).

Global faults -- a bad overlap table, template or output location, a full disk -- give
one line naming the file and the problem through all three interfaces (MontagePy's
error dict, Montage's status line, ``diffit run``'s message), exit status 1, no
traceback, and leave an existing fits.tbl exactly as it was.

Per-pair faults -- bad, missing, truncated, off-grid or odd images -- fail only their
pairs, with a reason shown by ``-d`` and ``--failures``, and never change any other
pair's row. Where Montage itself works (scaled integers, cubes, big-endian floats) or
fails (missing, truncated, corrupt files, blank or absent overlaps), the results are
identical to MontagePy's; compressed copies give the plain files' rows.

All inputs are generated (70x55 template, 40x30 images: see ``tests/test_pair.py``).
"""
from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffit
import diffit.runner
from diffit.cli import main, montage_main
from diffit.difference import difference
from diffit.fitplane import FitError, fit_plane
from diffit.geometry import GridGeometry, overlap_window
from diffit.runner import run
from diffit.tables import FITS_TBL_HEADER, TableError, format_overlap_table
from test_pair import (
    OFFSETS,
    SHAPE,
    TEMPLATE,
    Survey,
    make_survey,
    wcs_header,
)

PREVIOUS = b"|   plus  | an earlier fits.tbl that must survive\n 1 2 3\n"
#: Image 2 is the one broken; these are the pairs (table indices) that involve it.
BROKEN = 2
BROKEN_PAIRS = {1, 3, 5}  # (0,2), (1,2), (2,3) in the table of all six pairs


def _run(survey: Survey, output: Path, **kwargs):
    kwargs.setdefault("jobs", 1)
    return run(survey.root, survey.diffs, survey.template, output, keep_outcomes=True, **kwargs)


def _rows(path: Path) -> list[str]:
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == FITS_TBL_HEADER
    return lines[1:]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Rows of the intact survey, by table index (every pair is fitted)."""
    survey = make_survey(tmp_path_factory.mktemp("baseline"))
    result = _run(survey, survey.root / "fits.tbl")
    assert result.count == 6 and result.succeeded == 6
    return {o.index: o.row for o in result.outcomes}


# --------------------------------------------------------------------------------------
# per-pair faults: one case each, through run(); other pairs' rows unchanged
# --------------------------------------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])


def _edit_header(path: Path, **cards) -> None:
    with fits.open(path, mode="update") as hdul:
        for key, value in cards.items():
            if value is None:
                del hdul[0].header[key]
            else:
                hdul[0].header[key] = value


def _drop_card(path: Path, keyword: str) -> None:
    content = bytearray(path.read_bytes())
    start = content.index(keyword.ljust(8).encode() + b"=")
    content[start:start + 80] = b"COMMENT".ljust(80)
    path.write_bytes(bytes(content))


def _replace_data(path: Path, data: np.ndarray) -> None:
    header = fits.getheader(path)
    path.unlink()
    fits.PrimaryHDU(data, header=header).writeto(path)


PER_PAIR_FAULTS = {
    # name: (damage(root, flux, area), stage, reason fragments, Montage fails those pairs too)
    "image missing": (lambda r, f, a: (r / f).unlink(), "diff", ["{flux}", "not found"], True),
    "area missing": (lambda r, f, a: (r / a).unlink(), "diff", ["{area}", "not found"], True),
    "image truncated": (lambda r, f, a: _truncate(r / f), "diff", ["{flux}"], True),
    "image cut before its last pixel": (
        lambda r, f, a: (r / f).write_bytes((r / f).read_bytes()[: 2880 + 30 * 40 * 4 - 1]),
        "diff", ["{flux}"], True),
    "area truncated": (lambda r, f, a: _truncate(r / a, 0.3), "diff", ["{area}"], True),
    "image header corrupt": (
        lambda r, f, a: (r / f).write_bytes(b"\x07GARBAGE" * 360 + (r / f).read_bytes()[2880:]),
        "diff", ["{flux}", "not a readable FITS file"], True),
    "image empty": (lambda r, f, a: (r / f).write_bytes(b""), "diff", ["{flux}"], True),
    "area not FITS": (lambda r, f, a: (r / a).write_text("text\n"), "diff", ["{area}"], True),
    "image without CRPIX1": (lambda r, f, a: _edit_header(r / f, CRPIX1=None), "diff",
                             ["{flux}", "CRPIX1"], False),
    "image without NAXIS2": (lambda r, f, a: _drop_card(r / f, "NAXIS2"), "diff",
                             ["{flux}", "NAXIS2"], False),
    "different projection": (
        lambda r, f, a: _edit_header(r / f, CTYPE1="RA---SIN", CTYPE2="DEC--SIN"),
        "diff", ["{flux}", "not on the template grid", "CTYPE1"], False),
    "different CDELT": (lambda r, f, a: _edit_header(r / f, CDELT1=-0.0003, CDELT2=0.0003), "diff",
                        ["{flux}", "not on the template grid", "pixel scale"], False),
    "rotated CD matrix": (
        lambda r, f, a: _edit_header(r / f, CDELT1=None, CDELT2=None, CROTA2=None,
                                     CD1_1=-2.7e-4, CD1_2=6e-5, CD2_1=6e-5, CD2_2=2.7e-4),
        "diff", ["{flux}", "not on the template grid", "rotation"], False),
    "different CRVAL": (lambda r, f, a: _edit_header(r / f, CRVAL2=-15.0), "diff",
                        ["{flux}", "not on the template grid", "CRVAL2"], False),
    "area of another shape": (lambda r, f, a: _replace_data(r / a, np.ones((30, 41))), "diff",
                              ["{area}", "41x30", "40x30"], False),
    "all-NaN image": (lambda r, f, a: _replace_data(r / f, np.full(SHAPE, np.nan, np.float32)),
                      "diff", ["All pixels are blank."], True),
    "zero areas": (lambda r, f, a: _replace_data(r / a, np.zeros(SHAPE)), "diff",
                   ["All pixels are blank."], True),
}


def _damage(case: str, root: Path, k: int) -> list[str]:
    """Apply a fault to image ``k`` of a survey; return the reason fragments to expect."""
    damage, _, fragments, _ = PER_PAIR_FAULTS[case]
    flux, area = f"im{k}.fits", f"im{k}_area.fits"
    damage(root, flux, area)
    return [f.format(flux=str(root / flux), area=str(root / area)) for f in fragments]


@pytest.mark.parametrize("case", list(PER_PAIR_FAULTS))
def test_per_pair_fault(case: str, tmp_path: Path, baseline: dict[int, str]) -> None:
    stage = PER_PAIR_FAULTS[case][1]
    survey = make_survey(tmp_path / "s")
    fragments = _damage(case, survey.root, BROKEN)
    result = _run(survey, tmp_path / "fits.tbl")
    failed = {o.index: o for o in result.outcomes if o.stage != "ok"}
    assert set(failed) == BROKEN_PAIRS
    for outcome in failed.values():
        assert outcome.stage == stage and "\n" not in outcome.reason
        for fragment in fragments:
            assert fragment in outcome.reason, (fragment, outcome.reason)
        assert "unexpected" not in outcome.reason
    assert _rows(tmp_path / "fits.tbl") == [baseline[i] for i in sorted(set(baseline) - BROKEN_PAIRS)]
    assert (result.diff_failed, result.fit_failed) == ((3, 0) if stage == "diff" else (0, 3))


def test_montage_fails_the_same_pairs_identically(tmp_path: Path) -> None:
    """Where Montage also fails a pair (bad files, blank overlaps), counters and rows agree."""
    montage = pytest.importorskip("MontagePy.main")
    for case, (*_, montage_fails) in PER_PAIR_FAULTS.items():
        if not montage_fails:
            continue
        survey = make_survey(tmp_path / case.replace(" ", "_"))
        _damage(case, survey.root, BROKEN)
        (survey.root / "m").mkdir()
        want = montage.mDiffFitExec(str(survey.root), str(survey.diffs), str(survey.template),
                                    str(survey.root / "m"), str(survey.root / "m.tbl"))
        got = diffit.mDiffFitExec(str(survey.root), str(survey.diffs), str(survey.template),
                                  str(survey.root / "d"), str(survey.root / "d.tbl"), jobs=1)
        assert got == want, case
        assert (survey.root / "d.tbl").read_text() == (survey.root / "m.tbl").read_text(), case


def test_many_faults_at_once_on_threads_and_processes(tmp_path: Path, baseline: dict[int, str]) -> None:
    offsets = OFFSETS + ((5, 10), (20, 12))
    survey = make_survey(tmp_path / "s", offsets=offsets)
    for k, case in zip((3, 4, 5), ("image truncated", "different CDELT", "area of another shape")):
        _damage(case, survey.root, k)
    serial = _run(survey, tmp_path / "serial.tbl")
    for backend in ("threads", "processes"):
        parallel = _run(survey, tmp_path / "parallel.tbl", jobs=3, batch_size=1, backend=backend)
        assert (tmp_path / "serial.tbl").read_bytes() == (tmp_path / "parallel.tbl").read_bytes()
        assert [(o.stage, o.reason) for o in serial.outcomes] == [
            (o.stage, o.reason) for o in parallel.outcomes]
    bad = {o.index for o in serial.outcomes if o.stage != "ok"}
    assert {(o.cntr1, o.cntr2) for o in serial.outcomes if o.index in bad} == {
        (a, b) for a in range(6) for b in range(a + 1, 6) if max(a, b) >= 3}
    assert _rows(tmp_path / "serial.tbl") == [baseline[i] for i in (0, 1, 3)]  # pairs of images 0-2


# --------------------------------------------------------------------------------------
# where Montage works, the numbers are MontagePy's; compressed copies equal plain files
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["i2", "u2", "cube", "cube-i2", ">f4"])
def test_formats_match_montagepy(fmt: str, tmp_path: Path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    survey = make_survey(tmp_path / "s", fmt=fmt)
    (tmp_path / "m").mkdir()
    for level_only in (False, True):
        want = montage.mDiffFitExec(str(survey.root), str(survey.diffs), str(survey.template),
                                    str(tmp_path / "m"), str(tmp_path / "m.tbl"), levelOnly=level_only)
        got = diffit.mDiffFitExec(str(survey.root), str(survey.diffs), str(survey.template),
                                  str(tmp_path / "d"), str(tmp_path / "d.tbl"), levelOnly=level_only,
                                  jobs=1)
        assert got == want and want["count"] == 6 and want["diff_failed"] == want["fit_failed"] == 0
        assert (tmp_path / "d.tbl").read_text() == (tmp_path / "m.tbl").read_text()


@pytest.mark.parametrize("level_only", [False, True])
def test_single_row_overlaps_match_montagepy(level_only: bool, tmp_path: Path) -> None:
    montage = pytest.importorskip("MontagePy.main")
    survey = make_survey(tmp_path / "s", offsets=((0, 0), (10, 29), (39, 5), (-5, -29)))
    (tmp_path / "m").mkdir()
    want = montage.mDiffFitExec(str(survey.root), str(survey.diffs), str(survey.template),
                                str(tmp_path / "m"), str(tmp_path / "m.tbl"), levelOnly=level_only)
    result = _run(survey, tmp_path / "d.tbl", level_only=level_only)
    assert (result.count, result.diff_failed, result.fit_failed) == (
        want["count"], want["diff_failed"], want["fit_failed"])
    assert (tmp_path / "d.tbl").read_text() == (tmp_path / "m.tbl").read_text()
    if not level_only:
        assert any(o.reason == "Too few pixels to fit" for o in result.failures)


@pytest.mark.parametrize("fmt", ["i2", "f4", "cube"])
def test_compressed_surveys_give_the_plain_rows(fmt: str, tmp_path: Path) -> None:
    plain = make_survey(tmp_path / "plain", fmt=fmt)
    _run(plain, tmp_path / "plain.tbl")
    want = (tmp_path / "plain.tbl").read_bytes()
    variants = {"gz": dict(suffix=".fits.gz"), "fz": dict(suffix=".fits.fz"),
                "gz+plain areas": dict(suffix=".fits.gz", area_suffix=".fits"),
                "fz+gz areas": dict(suffix=".fits.fz", area_suffix=".fits.gz")}
    for name, kwargs in variants.items():
        survey = make_survey(tmp_path / name.replace("+", "_").replace(" ", "_"), fmt=fmt, **kwargs)
        result = _run(survey, tmp_path / "packed.tbl")
        assert result.succeeded == 6, (name, result.failures)
        assert (tmp_path / "packed.tbl").read_bytes() == want, name


def test_listed_fits_names_read_compressed_copies(tmp_path: Path) -> None:
    plain = make_survey(tmp_path / "plain")
    _run(plain, tmp_path / "plain.tbl")
    packed = make_survey(tmp_path / "packed", suffix=".fits.gz")
    packed.names = [name[:-3] for name in packed.names]  # the table still says im0.fits
    packed.write_table()
    _run(packed, tmp_path / "packed.tbl")
    assert (tmp_path / "packed.tbl").read_bytes() == (tmp_path / "plain.tbl").read_bytes()


# --------------------------------------------------------------------------------------
# difference files: stale ones never matter; diffdir created only when needed
# --------------------------------------------------------------------------------------

def test_stale_diff_files_never_change_results(tmp_path: Path) -> None:
    survey = make_survey(tmp_path / "s")
    diffdir = tmp_path / "diffs"
    _run(survey, tmp_path / "first.tbl", keep_all=True, diffdir=diffdir)
    written = sorted(diffdir.iterdir())
    assert len(written) == 12
    for k, path in enumerate(written):  # garbage, wrong images, empty files
        if k % 3 == 0:
            path.write_bytes(b"garbage" * 999)
        elif k % 3 == 1:
            fits.PrimaryHDU(np.full((3, 3), 1e9)).writeto(path, overwrite=True)
        else:
            path.write_bytes(b"")
    want = (tmp_path / "first.tbl").read_bytes()
    for keep_all in (False, True):
        _run(survey, tmp_path / "again.tbl", keep_all=keep_all, diffdir=diffdir)
        assert (tmp_path / "again.tbl").read_bytes() == want
    assert all(fits.getdata(p).shape != (3, 3) for p in written)  # rewritten by the keepAll run
    assert not list(diffdir.glob(".*diffit-*"))


def test_missing_diffdir_is_created_with_keep_all_only(tmp_path: Path, capsys) -> None:
    survey = make_survey(tmp_path / "s")
    absent = tmp_path / "absent" / "diffs"
    _run(survey, tmp_path / "f.tbl", diffdir=absent)
    assert not absent.parent.exists()
    args = ["mDiffFitExec", "-j", "1", "-p", str(survey.root), str(survey.diffs),
            str(survey.template), str(absent), str(tmp_path / "g.tbl")]
    assert montage_main(args) == 0
    assert not absent.parent.exists()
    assert montage_main(args[:1] + ["-k"] + args[1:]) == 0
    assert len(list(absent.glob("diff.*.fits"))) == 12
    assert "diff_failed=0, fit_failed=0" in capsys.readouterr().out
    assert (tmp_path / "f.tbl").read_bytes() == (tmp_path / "g.tbl").read_bytes()


# --------------------------------------------------------------------------------------
# reasons are shown: -d, --failures, the debug API
# --------------------------------------------------------------------------------------

def _broken_survey(root: Path) -> Survey:
    survey = make_survey(root)
    _truncate(root / "im2.fits")
    return survey


@pytest.mark.parametrize("which", ["im2.fits", "im2_area.fits"])
def test_a_pipe_in_place_of_an_image_fails_its_pairs_without_hanging(tmp_path: Path, which: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes: it must never be opened."""
    import subprocess
    import sys

    survey = make_survey(tmp_path / "s")
    (survey.root / which).unlink()
    os.mkfifo(survey.root / which)
    code = ("import sys, diffit; r = diffit.mDiffFitExec(*sys.argv[1:6], jobs=2);"
            " print(r['diff_failed'], r['count'])")
    done = subprocess.run([sys.executable, "-c", code, str(survey.root), str(survey.diffs),
                           str(survey.template), str(tmp_path / "d"), str(tmp_path / "f.tbl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "6"]  # the three pairs with im2


def test_debug_output_shows_each_reason(tmp_path: Path, capsys) -> None:
    survey = _broken_survey(tmp_path / "s")
    code = montage_main(["mDiffFitExec", "-d", "-j", "1", "-p", str(survey.root), str(survey.diffs),
                         str(survey.template), str(tmp_path / "d"), str(tmp_path / "f.tbl")])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    errors = [line for line in out if line.startswith("mDiff(") and 'stat="ERROR"' in line]
    assert len(errors) == 3 and all(str(survey.root / "im2.fits") in line for line in errors)
    assert out[-1] == ('[struct stat="OK", module="mDiffFitExec", count=6, diff_failed=3, '
                       'fit_failed=0, warning=0]')
    diffit.mDiffFitExec(str(survey.root), str(survey.diffs), str(survey.template),
                        str(tmp_path / "d"), str(tmp_path / "g.tbl"), debug=1, jobs=1)
    assert capsys.readouterr().out.splitlines() == out[:-1]


def test_failures_csv_and_summary_show_each_reason(tmp_path: Path, capsys) -> None:
    survey = make_survey(tmp_path / "s", offsets=OFFSETS + ((10, 29),))
    _truncate(survey.root / "im2.fits")
    failures = tmp_path / "failures.csv"
    code = main(["run", "--projdir", str(survey.root), "--diffs", str(survey.diffs),
                 "--template", str(survey.template), "--output", str(tmp_path / "f.tbl"),
                 "--jobs", "1", "--no-progress", "--failures", str(failures)])
    assert code == 0
    with open(failures, newline="") as stream:
        rows = list(csv.DictReader(stream))
    by_stage = {(r["cntr1"], r["cntr2"]): (r["stage"], r["reason"]) for r in rows}
    for a, b in ((0, 2), (1, 2), (2, 3), (2, 4)):
        stage, reason = by_stage.pop((str(a), str(b)))
        assert stage == "diff" and str(survey.root / "im2.fits") in reason and "truncated" in reason
    assert by_stage == {("0", "4"): ("fit", "Too few pixels to fit")}  # one-row overlap
    out = capsys.readouterr().out
    assert "Too few pixels to fit" in out and str(survey.root / "im2.fits") in out


# --------------------------------------------------------------------------------------
# global faults: one line, status 1, no traceback, fits.tbl untouched
# --------------------------------------------------------------------------------------

def _call(interface: str, survey: Survey, diffs: Path, template: Path, output: Path, capsys):
    """Run one interface; return (status, the one message line)."""
    capsys.readouterr()
    if interface == "api":
        result = diffit.mDiffFitExec(str(survey.root), str(diffs), str(template),
                                     str(survey.root / "d"), str(output), jobs=1)
        captured = capsys.readouterr()
        assert captured.out == captured.err == ""
        assert set(result) == {"status", "msg"} and isinstance(result["msg"], bytes)
        return int(result["status"]), result["msg"].decode()
    if interface == "montage":
        code = montage_main(["mDiffFitExec", "-j", "1", "-p", str(survey.root), str(diffs),
                             str(template), str(survey.root / "d"), str(output)])
        captured = capsys.readouterr()
        assert captured.err == ""
        lines = captured.out.splitlines()
        assert len(lines) == 1 and lines[0].startswith('[struct stat="ERROR", msg="'), captured.out
        assert lines[0].endswith('"]')
        return code, lines[0][len('[struct stat="ERROR", msg="'):-2]
    code = main(["run", "--projdir", str(survey.root), "--diffs", str(diffs), "--template",
                 str(template), "--output", str(output), "--jobs", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffit: error: "), captured.err
    return code, lines[0][len("diffit: error: "):]


def _fits_template(root: Path) -> Path:
    fits.PrimaryHDU(np.zeros((5, 5), np.float32), header=wcs_header(0, 0)).writeto(root / "t.fits")
    return root / "t.fits"


GLOBAL_FAULTS = {
    # name: (the input at fault, make(root) -> its path, message fragments)
    "table missing": ("diffs", lambda r: r / "absent.tbl", ["Invalid diffs metadata file"]),
    "table empty": ("diffs", lambda r: _write(r / "e.tbl", b""), ["Invalid diffs metadata file"]),
    "table binary": ("diffs", lambda r: _write(r / "b.tbl", bytes(range(256)).replace(b"|", b"") * 8),
                     ["Invalid diffs metadata file"]),
    "table is a folder": ("diffs", lambda r: _mkdir(r / "dir.tbl"), ["Invalid diffs metadata file"]),
    "table without the columns": (
        "diffs", lambda r: _write(r / "c.tbl", b"| cntr1 | cntr2 |  plus | minus |\n 0 1 a b\n"),
        ["Need columns: cntr1 cntr2 plus minus diff"]),
    "template missing": ("template", lambda r: r / "absent.hdr", ["not found"]),
    "template is a FITS file": ("template", _fits_template, ["cannot be used as a header template"]),
    "template without CRVAL2": (
        "template", lambda r: _write(r / "k.hdr", TEMPLATE.replace("CRVAL2  = -16.0\n", "").encode()),
        ["no CRVAL2 keyword"]),
    "output folder missing": ("output", lambda r: r / "absent" / "fits.tbl", ["does not exist"]),
    "output folder is a file": ("output", lambda r: _write(r / "plain", b"x") / "fits.tbl", []),
}


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _names_file(case: str, interface: str) -> bool:
    # Montage's own "Need columns" text does not name the table; the drop-ins keep it.
    return not (case == "table without the columns" and interface in ("api", "montage"))


@pytest.mark.parametrize("case", list(GLOBAL_FAULTS))
@pytest.mark.parametrize("interface", ["api", "montage", "run"])
def test_global_fault(case: str, interface: str, tmp_path: Path, capsys) -> None:
    faulty, make, fragments = GLOBAL_FAULTS[case]
    survey = make_survey(tmp_path / "s")
    paths = {"diffs": survey.diffs, "template": survey.template, "output": tmp_path / "out" / "fits.tbl"}
    (tmp_path / "out").mkdir()
    paths["output"].write_bytes(PREVIOUS)
    paths[faulty] = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, message = _call(interface, survey, paths["diffs"], paths["template"], paths["output"], capsys)
    assert code == 1
    assert "Traceback" not in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    if _names_file(case, interface):
        assert str(paths[faulty]) in message, message
    assert (tmp_path / "out" / "fits.tbl").read_bytes() == PREVIOUS
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "files left behind"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores folder permissions (see the parent-is-a-file case)")
def test_output_folder_not_writable(tmp_path: Path, capsys) -> None:
    survey = make_survey(tmp_path / "s")
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "fits.tbl").write_bytes(PREVIOUS)
    folder.chmod(0o555)
    try:
        for interface in ("api", "montage", "run"):
            code, message = _call(interface, survey, survey.diffs, survey.template,
                                  folder / "fits.tbl", capsys)
            assert code == 1 and str(folder / "fits.tbl") in message
    finally:
        folder.chmod(0o755)
    assert (folder / "fits.tbl").read_bytes() == PREVIOUS


class _FullDisk:
    """A text stream whose writes (or flushes) fail with ENOSPC, as on a full disk."""

    def __init__(self, stream, on: str) -> None:
        self._stream = stream
        self._on = on

    def _fail(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, text: str) -> int:
        if self._on == "write":
            self._fail()
        return self._stream.write(text)

    def flush(self) -> None:
        if self._on == "flush":
            self._fail()
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _fill_disk(monkeypatch, where: str) -> None:
    """Make fits.tbl row writes, its final flush, or the journal fail with ENOSPC."""
    if where == "journal":
        start_journal = diffit.runner._Journal.start

        def full_start(self):
            start_journal(self)
            self._stream = _FullDisk(self._stream, "write")

        monkeypatch.setattr(diffit.runner._Journal, "start", full_start)
        return
    init = diffit.runner._OrderedWriter.__init__

    def full_init(self, output, *args):
        init(self, output, *args)
        self.stream = self.file.stream = _FullDisk(self.stream, where)

    monkeypatch.setattr(diffit.runner._OrderedWriter, "__init__", full_init)


@pytest.mark.parametrize("where", ["write", "flush", "journal"])
@pytest.mark.parametrize("interface", ["api", "montage", "run"])
def test_disk_full_while_writing(where: str, interface: str, tmp_path: Path, capsys, monkeypatch) -> None:
    survey = make_survey(tmp_path / "s")
    output = tmp_path / "out" / "fits.tbl"
    output.parent.mkdir()
    output.write_bytes(PREVIOUS)
    _fill_disk(monkeypatch, where)
    code, message = _call(interface, survey, survey.diffs, survey.template, output, capsys)
    assert code == 1 and "No space left on device" in message, message
    assert str(output) in message, message
    assert output.read_bytes() == PREVIOUS
    left = {p.name for p in output.parent.iterdir()}
    assert left <= {"fits.tbl", "fits.tbl.journal"}, "temporary files left behind"  # journal: --resume


# --------------------------------------------------------------------------------------
# properties: random tables through the whole run; the kernels on random inputs
# --------------------------------------------------------------------------------------

_NAMES = st.sampled_from(["im0.fits", "im1.fits", "im2.fits", "absent.fits", "im1", "", "./im0.fits",
                          "im0.fits.gz", "x y", "../im1.fits"])


@st.composite
def overlap_tables(draw) -> bytes:
    """mOverlaps-like tables with random rows, blank lines, comments and damage."""
    rows = draw(st.lists(st.tuples(st.integers(-5, 99), st.integers(-5, 99), _NAMES, _NAMES,
                                   st.sampled_from(["d.fits", "d.fit", "d", "sub/d.fits"])),
                         max_size=6))
    text = format_overlap_table(rows, namelen=12).encode()
    lines = text.split(b"\n")
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(lines)))
        lines.insert(where, draw(st.sampled_from([b"", b"\\ comment", b"| int | x |", b"   ",
                                                  b"\x00\xff garbage", b"|"])))
    content = b"\n".join(lines)
    cut = draw(st.integers(0, len(content)))
    return content if draw(st.booleans()) else content[:cut]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=st.one_of(overlap_tables(), st.binary(max_size=300)))
def test_random_tables_never_crash_a_run(content: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("table")
    survey = make_survey(root, offsets=OFFSETS[:3])
    (root / "diffs.tbl").write_bytes(content)
    output = root / "fits.tbl"
    output.write_bytes(PREVIOUS)
    try:
        result = run(root, root / "diffs.tbl", survey.template, output, jobs=1, keep_outcomes=True)
    except TableError as error:
        assert "\n" not in str(error)
        assert output.read_bytes() == PREVIOUS
        return
    assert result.count == len(result.outcomes)
    assert output.read_text().startswith(FITS_TBL_HEADER)
    assert len(_rows(output)) == result.succeeded
    for outcome in result.failures:
        assert outcome.reason and "\n" not in outcome.reason and "unexpected" not in outcome.reason


_VALUES = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e308, -1e308]))


@settings(max_examples=100, deadline=None)
@given(template=st.tuples(st.integers(1, 60), st.integers(1, 60), st.floats(-1e7, 1e7), st.floats(-1e7, 1e7)),
       images=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60), st.floats(-1e7, 1e7),
                                 st.floats(-1e7, 1e7)), min_size=2, max_size=2))
def test_overlap_window_never_crashes_and_stays_inside_images(template, images) -> None:
    tgrid = GridGeometry(*template)
    grids = [GridGeometry(*image) for image in images]
    window = overlap_window(tgrid, *grids)
    if window is None:
        return
    assert 0 <= window.i0 < window.i1 <= tgrid.naxis1 - 1 and 0 <= window.j0 < window.j1 <= tgrid.naxis2 - 1
    for which, grid in ((1, grids[0]), (2, grids[1])):
        rows, cols = window.image_slices(which)
        assert 0 <= rows.start < rows.stop <= grid.naxis2 and 0 <= cols.start < cols.stop <= grid.naxis1


@st.composite
def windows(draw):
    ny, nx = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    arrays = [np.array(draw(st.lists(_VALUES, min_size=ny * nx, max_size=ny * nx))).reshape(ny, nx)
              for _ in range(4 if draw(st.booleans()) else 2)]
    return arrays


@settings(max_examples=100, deadline=None)
@given(arrays=windows())
def test_difference_never_crashes(arrays) -> None:
    with np.errstate(all="ignore"):
        result = difference(*arrays[:2], *arrays[2:])
    if result is not None:
        assert result.data.shape == result.area.shape
        assert result.data.shape[0] >= 1 and result.data.shape[1] >= 1
        kept = result.area != 0.0
        assert kept.any() and np.all(np.isnan(result.data[~kept]))


@settings(max_examples=100, deadline=None)
@given(image=windows().map(lambda arrays: arrays[0]),
       crpix=st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)), level_only=st.booleans())
def test_fit_plane_raises_only_fit_errors(image, crpix, level_only) -> None:
    try:
        with np.errstate(all="ignore"):
            fit = fit_plane(image, *crpix, level_only)
    except FitError as error:
        assert str(error) in ("Too few pixels to fit", "Singular Matrix-1", "Singular Matrix-2")
        return
    assert fit.crpix1 == crpix[0] and fit.crpix2 == crpix[1]
    assert fit.boxwidth > 0 and fit.boxheight > 0
