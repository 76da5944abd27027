from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from diffit.cli import main, montage_main


def _args(survey, output):
    return [str(survey.diffs), str(survey.template), str(output.parent / "diffs"), str(output)]


def test_montage_usage_error(capsys) -> None:
    assert montage_main(["mDiffFitExec", "only.tbl"]) == 1
    assert capsys.readouterr().out == (
        '[struct stat="ERROR", msg="Usage: mDiffFitExec [-d] [-l(evel-only)] [-k(eep-all)] '
        '[-n(o-areas)] [-p projdir] [-s statusfile] [-j threads] diffs.tbl '
        'template.hdr diffdir fits.tbl"]\n')
    assert montage_main(["mDiffFitExec", "-x", "a", "b", "c", "d"]) == 1


def test_montage_status_line_matches_montagepy(small_survey, tmp_path, capsys) -> None:
    montage = pytest.importorskip("MontagePy.main")
    (tmp_path / "m").mkdir()
    want = montage.mDiffFitExec(str(small_survey.projdir), str(small_survey.diffs),
                                str(small_survey.template), str(tmp_path / "m"),
                                str(tmp_path / "m.tbl"), levelOnly=True)
    output = tmp_path / "fits.tbl"
    code = montage_main(["mDiffFitExec", "-l", "-p", str(small_survey.projdir),
                         *_args(small_survey, output), "-j", "2"])
    assert code == 0
    assert capsys.readouterr().out == (
        f'[struct stat="OK", module="mDiffFitExec", count={want["count"]}, '
        f'diff_failed={want["diff_failed"]}, fit_failed={want["fit_failed"]}, warning=0]\n')
    assert output.read_text() == (tmp_path / "m.tbl").read_text()


def test_montage_status_file_and_debug(small_survey, tmp_path, capsys) -> None:
    status = tmp_path / "status.txt"
    output = tmp_path / "fits.tbl"
    assert montage_main(["mDiffFitExec", "-d", "-s", str(status), "-p", str(small_survey.projdir),
                         *_args(small_survey, output)]) == 0
    assert status.read_text().startswith('[struct stat="OK", module="mDiffFitExec", count=')
    out = capsys.readouterr().out
    assert "mDiff(" in out and "[struct stat=\"OK\", module" not in out
    assert montage_main(["mDiffFitExec", "-s", str(tmp_path / "no" / "s.txt"),
                         *_args(small_survey, output)]) == 1
    assert capsys.readouterr().out == (
        f'[struct stat="ERROR", msg="Cannot open status file: {tmp_path / "no" / "s.txt"}"]\n')


def test_montage_global_error_line(tmp_path, capsys) -> None:
    assert montage_main(["mDiffFitExec", str(tmp_path / "none.tbl"), "t.hdr", "d",
                         str(tmp_path / "f.tbl")]) == 1
    assert capsys.readouterr().out == (
        f'[struct stat="ERROR", msg="Invalid diffs metadata file: {tmp_path / "none.tbl"}"]\n')


def test_run_with_config_and_override(small_survey, tmp_path, capsys) -> None:
    config = small_survey.root / "run.toml"
    config.write_text('projdir = "projected"\ndiffs = "diffs.tbl"\ntemplate = "template.hdr"\n'
                      'output = "fits.tbl"\nfailures = "failures.csv"\nlevel_only = false\njobs = 1\n')
    assert main(["run", "--config", str(config), "--level-only", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{small_survey.n_pairs} pairs:" in out
    assert (small_survey.root / "fits.tbl").exists()
    # --level-only on the command line beat level_only = false in the file: b is 0 in every row.
    rows = (small_survey.root / "fits.tbl").read_text().splitlines()[1:]
    assert rows and all(float(r.split()[3]) == 0.0 for r in rows)
    with open(small_survey.root / "failures.csv") as stream:
        failures = list(csv.DictReader(stream))
    assert failures and all(f["reason"] and f["stage"] in ("diff", "fit") for f in failures)


def test_run_reports_missing_options(capsys) -> None:
    assert main(["run", "--projdir", "."]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffit: error: missing --diffs, --template, --output")
    assert err.count("\n") == 1


def _run_args(survey, tmp_path, *extra):
    return ["run", "--projdir", str(survey.projdir), "--diffs", str(survey.diffs), "--template",
            str(survey.template), "--output", str(tmp_path / "out" / "fits.tbl"), "--no-progress", *extra]


@pytest.mark.parametrize("extra, config, fragment", [
    (["--batch-size", "0"], "", "batch size must be at least 1"),
    (["--batch-size", "-5"], "", "batch size must be at least 1"),
    (["--jobs", "100000"], "", "jobs must be at most 1024"),
    ([], "jobs = 99999999\n", "jobs must be at most 1024"),
    ([], 'backend = "bogus"\n', "backend must be one of threads, processes, dask, not 'bogus'"),
    ([], 'backend = "multiprocessing"\n', "backend must be one of threads, processes, dask"),
    (["--failures", "{out}"], "", "--failures {out} is the output file; give the CSV another name"),
    (["--failures", "{diffs}"], "", "is the overlap table; give the CSV another name"),
    ([], 'failures = "{out}"\n', "is the output file"),
    (["--scheduler", "tcp://127.0.0.1:1"], "", "--scheduler (a Dask scheduler address) needs --backend dask"),
    (["--failures", "/nonexistent/failures.csv"], "", "Can't write failures file /nonexistent/failures.csv"),
    (["--keep-diffs"], "", "--keep-diffs needs --diffdir"),
])
def test_bad_run_settings_give_one_line_and_keep_fits_tbl(small_survey, tmp_path, capsys, extra, config,
                                                          fragment) -> None:
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "fits.tbl"
    output.write_text("previous run\n")
    names = {"out": str(output), "diffs": str(small_survey.diffs)}
    extra = [a.format(**names) for a in extra]
    fragment = fragment.format(**names)
    diffs_before = small_survey.diffs.read_bytes()
    args = _run_args(small_survey, tmp_path, *extra)
    if config:
        (tmp_path / "c.toml").write_text(config.format(**names))
        args += ["--config", str(tmp_path / "c.toml")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffit: error: ") and fragment in err and err.count("\n") == 1, err
    assert output.read_text() == "previous run\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["fits.tbl"]
    assert small_survey.diffs.read_bytes() == diffs_before


@pytest.mark.parametrize("args, fragment", [
    (["demo", "{tmp}/d", "--tiles", "0"], "the demo needs 2 to 5000 tiles (got 0)"),
    (["demo", "{tmp}/d", "--seed", "-1"], "the seed must be zero or positive"),
    (["demo", "{tmp}/file/d"], "Can't create demo folder"),
    (["plot", "{tmp}/f.tbl", "--projdir", "{tmp}", "--diffs", "{tmp}/x.tbl", "-o", "{tmp}"], "Is a directory"),
])
def test_demo_and_plot_arguments_give_one_line(tmp_path, capsys, args, fragment) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert main([a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffit: error: ") and fragment in err and err.count("\n") == 1, err


def test_failures_file_keeps_undecodable_names(small_survey, tmp_path, capsysbinary) -> None:
    """A table naming an image with bytes that are not UTF-8: the CSV and the summary have
    the same bytes."""
    import os

    lines = small_survey.diffs.read_bytes().split(b"\n")
    first = next(i for i, line in enumerate(lines) if line[:1] not in (b"|", b"\\") and line.strip())
    plus = lines[first].split()[2]
    odd = plus[:-6] + b"\xff" + plus[-5:]  # same length: the table's columns stay aligned
    lines[first] = lines[first].replace(plus, odd)
    table = tmp_path / "odd.tbl"
    table.write_bytes(b"\n".join(lines))
    (tmp_path / "out").mkdir()
    args = ["run", "--projdir", str(small_survey.projdir), "--diffs", os.fsdecode(table), "--template",
            str(small_survey.template), "--output", str(tmp_path / "out" / "fits.tbl"), "--no-progress",
            "--failures", str(tmp_path / "failures.csv"), "--jobs", "1"]
    stale = tmp_path / ".failures.csv.diffit-k1ll3d"  # left by a run killed outright
    stale.write_text("half")
    assert main(args) == 0, capsysbinary.readouterr().err
    assert odd in (tmp_path / "failures.csv").read_bytes()
    assert odd in capsysbinary.readouterr().out
    assert not stale.exists()


@pytest.mark.parametrize("kind, reason", [("missing", "No such file or directory"),
                                          ("folder", "Is a directory"), ("empty", "no line of column names")])
def test_bad_table_errors_say_why(small_survey, tmp_path, capsys, kind, reason) -> None:
    table = tmp_path / "t.tbl"
    if kind == "folder":
        table.mkdir()
    elif kind == "empty":
        table.write_text("")
    args = ["run", "--projdir", str(small_survey.projdir), "--diffs", str(table), "--template",
            str(small_survey.template), "--output", str(tmp_path / "f.tbl"), "--no-progress"]
    assert main(args) == 1
    assert capsys.readouterr().err == f"diffit: error: Invalid diffs metadata file: {table} ({reason})\n"


def test_relative_paths_everywhere(tmp_path, monkeypatch, capsys) -> None:
    """The README's first command and Montage's usual call, all with relative paths."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "demo", "--tiles", "4", "--no-progress"]) == 0
    assert (tmp_path / "demo" / "fits.tbl").exists()
    out = capsys.readouterr().out
    command = out.split("same job with Montage's interface:")[1].split()
    assert command[0] == "mDiffFitExec"
    relative = [str(os.path.relpath(a, tmp_path)) if os.path.isabs(a) else a for a in command]
    assert montage_main(relative[:-1] + ["again.tbl"]) == 0
    assert capsys.readouterr().out.startswith('[struct stat="OK"')
    assert (tmp_path / "again.tbl").read_bytes() == (tmp_path / "demo" / "fits.tbl").read_bytes()


@pytest.mark.parametrize("args", [["run", "--backend", "foo"], ["run", "--jobs", "x"], ["nosuch"],
                                  ["demo", "--tiles"]])
def test_usage_errors_are_one_line(capsys, args) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffit: error: ") and err.count("\n") == 1, err


def test_debug_output_into_a_closed_pipe(small_survey, tmp_path) -> None:
    """``mDiffFitExec -d ... | head -2``: the run finishes quietly, fits.tbl is complete."""
    reference = tmp_path / "reference.tbl"
    assert montage_main(["mDiffFitExec", "-j", "1", "-p", str(small_survey.projdir),
                         *_args(small_survey, reference)]) == 0
    command = (f"{sys.executable} -c 'import sys; from diffit.cli import montage_main;"
               f" sys.exit(montage_main(sys.argv))' -d -p {small_survey.projdir} "
               + " ".join(_args(small_survey, tmp_path / "piped.tbl")) + " | head -2")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 2
    assert (tmp_path / "piped.tbl").read_bytes() == reference.read_bytes()


def test_no_progress_bar_when_stderr_is_not_a_terminal(small_survey, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diffit", "run", "--projdir", str(small_survey.projdir),
         "--diffs", str(small_survey.diffs), "--template", str(small_survey.template),
         "--output", str(tmp_path / "f.tbl"), "--jobs", "1"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "pairs:" in done.stdout


def test_progress_bar_on_a_terminal(small_survey, tmp_path) -> None:
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    done = subprocess.run(
        [sys.executable, "-m", "diffit", "run", "--projdir", str(small_survey.projdir),
         "--diffs", str(small_survey.diffs), "--template", str(small_survey.template),
         "--output", str(tmp_path / "f.tbl"), "--jobs", "1"],
        stdout=subprocess.PIPE, stderr=follower, timeout=120)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert done.returncode == 0
    bar = b"".join(chunks).decode(errors="replace")
    assert f"{small_survey.n_pairs}/{small_survey.n_pairs}" in bar and "pair/s" in bar


def test_sigterm_leaves_a_journal_and_resume_completes(small_survey, tmp_path) -> None:
    import signal
    import time

    from diffit.tables import format_overlap_table, read_overlap_table

    # A long table: the survey's pairs repeated, so the run is still going when signalled.
    pairs = read_overlap_table(small_survey.diffs)
    rows = [(p.cntr1, p.cntr2, p.plus, p.minus, p.diff) for p in pairs] * 300
    long_table = tmp_path / "long.tbl"
    long_table.write_text(format_overlap_table(rows))
    output = tmp_path / "fits.tbl"
    def command(output, *extra):
        return [sys.executable, "-m", "diffit", "run", "--projdir", str(small_survey.projdir),
                "--diffs", str(long_table), "--template", str(small_survey.template),
                "--output", str(output), *extra]


    process = subprocess.Popen(command(output, "--jobs", "1", "--batch-size", "5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "fits.tbl.journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") > 20:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert err.startswith("diffit: interrupted after ") and err.rstrip().endswith(
        f"of {len(rows)} pairs; rerun with --resume")
    assert not output.exists() and journal.exists()
    resumed = subprocess.run(command(output, "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    fresh = subprocess.run(command(tmp_path / "fresh.tbl"), capture_output=True, text=True,
                           timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert output.read_bytes() == (tmp_path / "fresh.tbl").read_bytes(), (err, resumed.stderr)
    assert not journal.exists()
