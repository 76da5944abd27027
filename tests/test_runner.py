from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import diffit.pair
import diffit.runner

from diffit.runner import Interrupted, RunError, process_batch, run
from diffit.tables import FITS_TBL_HEADER


def _run(survey, output, **kwargs):
    return run(survey.projdir, survey.diffs, survey.template, output, **kwargs)


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_parallel_equals_serial_and_rows_in_table_order(small_survey, tmp_path, backend) -> None:
    serial = _run(small_survey, tmp_path / "serial.tbl", jobs=1, keep_outcomes=True)
    parallel = _run(small_survey, tmp_path / "parallel.tbl", jobs=2, batch_size=1, backend=backend)
    assert (tmp_path / "serial.tbl").read_bytes() == (tmp_path / "parallel.tbl").read_bytes()
    assert (serial.count, serial.diff_failed, serial.fit_failed) == (
        parallel.count, parallel.diff_failed, parallel.fit_failed)
    assert serial.count == small_survey.n_pairs
    assert [o.index for o in serial.outcomes] == list(range(serial.count))
    rows = (tmp_path / "serial.tbl").read_text().splitlines()
    assert rows[0] + "\n" == FITS_TBL_HEADER
    fitted = [o for o in serial.outcomes if o.stage == "ok"]
    assert [o.row for o in fitted] == [r + "\n" for r in rows[1:]]
    assert serial.succeeded == len(fitted) > 0
    assert not list(tmp_path.glob(".*diffit-*")), "temporary files left behind"


@pytest.mark.parametrize("threshold, chosen, parallel_expected", [
    (10**9, None, False),  # small pairs, workers not chosen: one thread
    (0, None, True),       # large pairs, workers not chosen: all cores
    (10**9, 2, True),      # small pairs, two workers asked for: two
])
def test_default_workers_stay_in_one_thread_for_small_pairs(small_survey, tmp_path, monkeypatch,
                                                            threshold, chosen,
                                                            parallel_expected) -> None:
    """With the number of workers left to diffit, a threads run whose first pairs are
    small goes on in one thread (worker threads would only take turns at the GIL); an
    explicit number is always honoured. The table is the same either way."""
    monkeypatch.setattr(diffit.runner, "SMALL_PAIR_PIXELS", threshold)
    monkeypatch.setattr(diffit.runner, "default_jobs", lambda: 2)
    real_parallel = diffit.runner._parallel
    used = []

    def parallel(*args, **kwargs):
        used.append(True)
        return real_parallel(*args, **kwargs)

    monkeypatch.setattr(diffit.runner, "_parallel", parallel)
    result = _run(small_survey, tmp_path / "auto.tbl", jobs=chosen, keep_outcomes=True)
    assert bool(used) == parallel_expected
    if chosen is None and parallel_expected:  # this thread's probe arrays were freed
        assert getattr(diffit.pair._LOCAL, "workspace", None) is None
    _run(small_survey, tmp_path / "serial.tbl", jobs=1)
    assert (tmp_path / "auto.tbl").read_bytes() == (tmp_path / "serial.tbl").read_bytes()
    assert [o.index for o in result.outcomes] == list(range(small_survey.n_pairs))


@pytest.mark.parametrize("sizes, fails", [([1, 1, 5, 3], set()), ([2, 7], {0, 1, 2}),
                                          ([1] * 30, set(range(30))), ([3], set())])
def test_probe_does_every_pair_once_in_table_order(sizes, fails) -> None:
    """The pairs the probe does and the batches it hands on cover the table exactly."""
    from types import SimpleNamespace

    pairs = list(range(sum(sizes)))
    batches, start = [], 0
    for size in sizes:
        batches.append(pairs[start:start + size])
        start += size

    def task(batch, template, options):
        return [SimpleNamespace(index=k, fit=None if k in fails else SimpleNamespace(npixel=100))
                for k in batch]

    probe = diffit.runner._probe(iter(batches), None, None, task)
    done = []
    try:
        while True:
            done += [outcome.index for outcome in next(probe)]
    except StopIteration as stop:
        rest, small = stop.value
    fitted = [k for k in done if k not in fails]
    assert len(fitted) == min(diffit.runner.PROBE_PAIRS, len(pairs) - len(fails)) or \
        len(done) >= 4 * diffit.runner.PROBE_PAIRS
    assert small == bool(fitted)  # 100 fitted pixels: small
    assert done + [k for batch in rest for k in batch] == pairs


def test_progress_callable_sees_every_pair(small_survey, tmp_path) -> None:
    seen = []
    _run(small_survey, tmp_path / "f.tbl", jobs=1, progress=seen.append)
    assert sum(seen) == small_survey.n_pairs


def _stop_after(n):
    calls = []

    def callback(outcome):
        calls.append(outcome)
        if len(calls) == n:
            raise KeyboardInterrupt

    return callback


def test_interrupt_then_resume_gives_identical_table(small_survey, tmp_path) -> None:
    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)
    output = tmp_path / "fits.tbl"
    output.write_text("previous run\n")
    with pytest.raises(Interrupted) as caught:
        _run(small_survey, output, jobs=1, batch_size=2, on_outcome=_stop_after(5))
    assert "rerun with --resume" in str(caught.value)
    assert caught.value.total == small_survey.n_pairs and 0 < caught.value.done < caught.value.total
    assert output.read_text() == "previous run\n", "an interrupted run must not touch fits.tbl"
    journal = tmp_path / "fits.tbl.journal"
    assert journal.exists()
    processed = []
    result = _run(small_survey, output, jobs=1, resume=True, task=None,
                  on_outcome=processed.append)
    assert output.read_bytes() == reference.read_bytes()
    assert result.count == small_survey.n_pairs
    assert not journal.exists()


def test_resume_refuses_a_journal_from_other_options(small_survey, tmp_path) -> None:
    output = tmp_path / "fits.tbl"
    with pytest.raises(Interrupted):
        _run(small_survey, output, jobs=1, batch_size=1, on_outcome=_stop_after(2))
    with pytest.raises(RunError, match="other inputs or options"):
        _run(small_survey, output, jobs=1, resume=True, level_only=True)


@pytest.mark.parametrize("change", ["table", "template"])
def test_resume_refuses_a_journal_whose_inputs_changed(small_survey, tmp_path, change) -> None:
    """Same paths, same number of pairs, other content: the journal's rows are stale."""
    import shutil

    diffs = tmp_path / "diffs.tbl"
    template = tmp_path / "template.hdr"
    shutil.copy(small_survey.diffs, diffs)
    shutil.copy(small_survey.template, template)
    output = tmp_path / "fits.tbl"
    with pytest.raises(Interrupted):
        run(small_survey.projdir, diffs, template, output, jobs=1, batch_size=1,
            on_outcome=_stop_after(2))
    if change == "table":  # swap plus and minus of the first pair
        lines = diffs.read_text().splitlines(keepends=True)
        first = next(i for i, line in enumerate(lines) if line[:1] not in "|\\")
        fields = lines[first].split()
        lines[first] = lines[first].replace(fields[2], "\0").replace(fields[3], fields[2]).replace("\0", fields[3])
        diffs.write_text("".join(lines))
    else:
        template.write_text(template.read_text().replace("CRPIX1  = ", "CRPIX1  = 1"))
    with pytest.raises(RunError, match="other inputs or options"):
        run(small_survey.projdir, diffs, template, output, jobs=1, resume=True)


_GOOD = {"index": 3, "stage": "diff", "reason": "x", "row": None, "cntr1": 1, "cntr2": 2,
         "plus": "a", "minus": "b", "diff": "d"}


def _record(**change) -> str:
    import json

    return json.dumps(dict(_GOOD, **change))


@pytest.mark.parametrize("record", ["5", '{"index": 3}', '{"index": "x", "stage": "ok"}', "[1, 2]",
                                    _record(index=True), _record(index=10 ** 9), _record(index=-1),
                                    _record(stage="ok", row="garbage\n"), _record(row=" 1 2\n"),
                                    _record(stage="ok", row=" 9 9" + " 0" * 18 + "\n")])
def test_resume_with_a_damaged_journal_record_is_a_clear_error(small_survey, tmp_path, record) -> None:
    output = tmp_path / "fits.tbl"
    with pytest.raises(Interrupted):
        _run(small_survey, output, jobs=1, batch_size=1, on_outcome=_stop_after(2))
    journal = tmp_path / "fits.tbl.journal"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], record] + lines[1:]) + "\n")
    with pytest.raises(RunError, match="journal .* is corrupt"):
        _run(small_survey, output, jobs=1, resume=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"batch_size": -5}, "batch size must be at least 1"),
    ({"jobs": 100_000}, "jobs must be at most 1024"),
    ({"backend": "bogus"}, "unknown backend 'bogus'"),
    ({"backend": "multiprocessing"}, "backend 'multiprocessing' cannot return results as they complete"),
])
def test_bad_settings_are_refused_before_anything_is_written(small_survey, tmp_path, kwargs, message) -> None:
    output = tmp_path / "out" / "fits.tbl"
    output.parent.mkdir()
    output.write_text("previous run\n")
    with pytest.raises(RunError, match=message):
        _run(small_survey, output, **kwargs)
    assert output.read_text() == "previous run\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["fits.tbl"]


def test_file_names_as_bytes_and_paths_and_nul(small_survey, tmp_path) -> None:
    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)
    run(os.fsencode(small_survey.projdir), os.fsencode(small_survey.diffs),
        os.fsencode(small_survey.template), os.fsencode(tmp_path / "bytes.tbl"), jobs=1)
    assert (tmp_path / "bytes.tbl").read_bytes() == reference.read_bytes()
    with pytest.raises(RunError, match="NUL"):
        _run(small_survey, str(tmp_path / "a\0.tbl"), jobs=1)
    with pytest.raises(RunError, match="must be a file name"):
        _run(small_survey, 42, jobs=1)


def test_output_that_is_a_folder_fails_before_the_run(small_survey, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    seen = []
    with pytest.raises(RunError, match="Is a directory"):
        _run(small_survey, tmp_path / "out", jobs=1, on_outcome=seen.append)
    assert seen == [] and not (tmp_path / "out.journal").exists()


def test_output_through_a_symbolic_link_and_to_a_device(small_survey, tmp_path) -> None:
    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "fits.tbl"
    link = tmp_path / "fits.tbl"
    link.symlink_to(target)
    _run(small_survey, link, jobs=1)
    assert link.is_symlink() and target.read_bytes() == reference.read_bytes()
    result = _run(small_survey, os.devnull, jobs=1)  # counters only
    assert result.count == small_survey.n_pairs
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(small_survey, tmp_path) -> None:
    """Two runs writing one fits.tbl would replace and delete each other's journals."""
    output = tmp_path / "fits.tbl"
    refused = []

    def second_run(outcome):
        if not refused:
            with pytest.raises(RunError, match="another diffit run is writing") as caught:
                _run(small_survey, output, jobs=1)
            refused.append(str(caught.value))

    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)
    _run(small_survey, output, jobs=1, on_outcome=second_run)
    assert refused and output.read_bytes() == reference.read_bytes()
    _run(small_survey, output, jobs=1)  # the lock ends with the run


def test_the_lock_is_taken_before_the_run_writes_anything(small_survey, tmp_path, monkeypatch) -> None:
    """A second run starting while the first opens its output (before any row) is refused:
    the journal was once written into place first and locked after, so two runs starting
    together locked different files and deleted each other's temporary fits.tbl."""
    output = tmp_path / "fits.tbl"
    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)
    init = diffit.runner._OrderedWriter.__init__
    refused = []

    def racing_init(self, *args, **kwargs):
        if not refused:
            refused.append(None)
            with pytest.raises(RunError, match="another diffit run is writing") as caught:
                _run(small_survey, output, jobs=1)
            refused[0] = str(caught.value)
        init(self, *args, **kwargs)

    monkeypatch.setattr(diffit.runner._OrderedWriter, "__init__", racing_init)
    _run(small_survey, output, jobs=1)
    assert refused[0] and output.read_bytes() == reference.read_bytes()
    assert not Path(str(output) + ".journal").exists()


def test_a_run_that_cannot_start_leaves_no_journal(small_survey, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "fits.tbl"
    output.mkdir()  # found only once the run holds the lock, when fits.tbl is opened
    with pytest.raises(RunError, match="Can't open output file"):
        _run(small_survey, output, jobs=1)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fits.tbl"]
    with pytest.raises(RunError, match="does not exist"):
        _run(small_survey, tmp_path / "no-such-folder" / "fits.tbl", jobs=1)
    assert not (tmp_path / "no-such-folder").exists()


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(small_survey, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".fits.tbl.diffit-k1ll3d"  # as a kill -9 leaves it
    other = tmp_path / "out" / ".other.tbl.diffit-x1y2z3"  # another output's: not ours
    stale.write_text("half a table")
    other.write_text("half a table")
    _run(small_survey, tmp_path / "out" / "fits.tbl", jobs=1)
    assert not stale.exists() and other.exists()


@pytest.mark.parametrize("name", ["fits.tbl", "out/fits.tbl", "./out/../fits.tbl"])
def test_relative_output_paths(small_survey, tmp_path, monkeypatch, name) -> None:
    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    _run(small_survey, name, jobs=2)
    assert (tmp_path / name).read_bytes() == reference.read_bytes()
    left = [p.name for p in (tmp_path / name).parent.iterdir() if p.name.startswith(".")]
    assert left == [] and not (tmp_path / (name + ".journal")).exists()


def test_output_that_is_a_loop_of_links_is_an_error(small_survey, tmp_path) -> None:
    loop = tmp_path / "loop1"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    with pytest.raises(RunError, match="Can't open output file .*loop1"):
        _run(small_survey, loop, jobs=1)
    assert loop.is_symlink() and (tmp_path / "loop2").is_symlink()


def test_two_names_of_one_output_share_the_lock(small_survey, tmp_path) -> None:
    target = tmp_path / "target.tbl"
    link = tmp_path / "link.tbl"
    link.symlink_to(target)
    refused = []

    def second_run(outcome):
        if not refused:
            with pytest.raises(RunError, match="another diffit run is writing"):
                _run(small_survey, link, jobs=1)
            refused.append(True)

    _run(small_survey, target, jobs=1, on_outcome=second_run)
    assert refused and target.read_text().count("\n") > 1


def test_long_output_name(small_survey, tmp_path) -> None:
    name = tmp_path / ("a" * 250 + ".tbl")
    result = _run(small_survey, name, jobs=1)
    assert result.count == small_survey.n_pairs and name.exists()
    with pytest.raises(Interrupted) as caught:
        _run(small_survey, name, jobs=1, batch_size=1, on_outcome=_stop_after(2))
    assert os.path.exists(caught.value.journal)
    _run(small_survey, name, jobs=1, resume=True)
    assert not os.path.exists(caught.value.journal)


def test_resume_with_kept_images_refuses_another_diff_folder(small_survey, tmp_path) -> None:
    output = tmp_path / "fits.tbl"
    with pytest.raises(Interrupted):
        _run(small_survey, output, jobs=1, batch_size=1, keep_all=True, diffdir=tmp_path / "kdA",
             on_outcome=_stop_after(2))
    with pytest.raises(RunError, match="other inputs or options"):
        _run(small_survey, output, jobs=1, resume=True, keep_all=True, diffdir=tmp_path / "kdB")
    _run(small_survey, output, jobs=1, resume=True, keep_all=True, diffdir=tmp_path / "kdA")


def test_without_resume_a_stale_journal_is_ignored(small_survey, tmp_path) -> None:
    output = tmp_path / "fits.tbl"
    with pytest.raises(Interrupted):
        _run(small_survey, output, jobs=1, batch_size=1, on_outcome=_stop_after(2))
    result = _run(small_survey, output, jobs=1)
    assert result.count == small_survey.n_pairs


def test_missing_output_folder_is_a_clear_error(small_survey, tmp_path) -> None:
    with pytest.raises(RunError, match="folder .* does not exist"):
        _run(small_survey, tmp_path / "nowhere" / "fits.tbl", jobs=1)


def crash_on_pair_three(batch, template, options):
    """A worker task that kills its process on pair 3 (simulates an OOM kill)."""
    if any(pair.index == 3 for pair in batch):
        os.kill(os.getpid(), signal.SIGKILL)
    return process_batch(batch, template, options)


def test_a_dying_worker_fails_only_its_pair(small_survey, tmp_path) -> None:
    reference = _run(small_survey, tmp_path / "ref.tbl", jobs=1, keep_outcomes=True)
    result = _run(small_survey, tmp_path / "f.tbl", jobs=2, batch_size=2, keep_outcomes=True,
                  backend="processes", task=crash_on_pair_three)
    assert result.count == reference.count
    for got, want in zip(result.outcomes, reference.outcomes):
        if got.index == 3:
            assert got.stage == "diff" and "worker process died" in got.reason
        else:
            assert (got.stage, got.row) == (want.stage, want.row)
    # The next run with worker processes in this process starts cleanly (the retry's
    # executor is not left behind for joblib to reuse).
    again = _run(small_survey, tmp_path / "g.tbl", jobs=3, batch_size=1, backend="processes")
    assert again.count == reference.count
    assert (tmp_path / "g.tbl").read_bytes() == (tmp_path / "ref.tbl").read_bytes()


@pytest.mark.parametrize("total, jobs", [(0, 2), (1, 1), (7, 2), (121, 2), (1117, 2), (5000, 8)])
def test_guided_batches_cover_the_table_in_order_and_shrink_to_the_end(total, jobs) -> None:
    from diffit.runner import _guided_batches

    batches = list(_guided_batches(iter(range(total)), total, jobs))
    assert [item for batch in batches for item in batch] == list(range(total))
    sizes = [len(batch) for batch in batches]
    assert all(0 < size <= 64 for size in sizes)
    assert sizes == sorted(sizes, reverse=True)
    # the last task of every worker is small: at most 1/(4*jobs) of what came before it
    for k, size in enumerate(sizes):
        assert size <= max(1, (total - sum(sizes[:k])) // (4 * jobs))
    if total >= 4 * jobs:
        assert sizes[-1] == 1


def test_keep_all_names_shared_by_several_pairs_keep_the_last_pair(small_survey, tmp_path) -> None:
    """Montage overwrites a difference file named by several rows in table order, so it
    ends up with the last pair whose difference succeeded; workers finishing in any order
    must leave the same file (here the earliest pairs finish last)."""
    lines = small_survey.diffs.read_text().splitlines(keepends=True)
    header = [line for line in lines if line[:1] in "|\\"]
    rows = [line for line in lines if line.strip() and line[:1] not in "|\\"]
    names = [row.split()[-1] for row in rows]
    shared = tmp_path / "shared.tbl"
    shared.write_text("".join(header + [row.replace(name, "same.fits") for row, name in zip(rows, names)]))

    def late_early_pairs(batch, template, options):
        time.sleep(0.05 * (len(rows) - batch[0].index))
        return process_batch(batch, template, options)

    serial = tmp_path / "serial"
    run(small_survey.projdir, shared, small_survey.template, tmp_path / "serial.tbl", jobs=1,
        keep_all=True, diffdir=serial)
    parallel = tmp_path / "parallel"
    run(small_survey.projdir, shared, small_survey.template, tmp_path / "parallel.tbl",
        jobs=len(rows), batch_size=1, keep_all=True, diffdir=parallel, task=late_early_pairs)
    assert sorted(p.name for p in parallel.iterdir()) == ["same.fits", "same_area.fits"]
    for name in ("same.fits", "same_area.fits"):
        assert (parallel / name).read_bytes() == (serial / name).read_bytes()


@pytest.mark.parametrize("kind", ["dangling link", "link to a file", "fifo"])
def test_a_journal_path_that_is_not_a_plain_file_is_refused(small_survey, tmp_path, kind) -> None:
    output = tmp_path / "fits.tbl"
    journal = Path(str(output) + ".journal")
    other = tmp_path / "unrelated.txt"
    other.write_text("keep me\n")
    if kind == "dangling link":
        journal.symlink_to(tmp_path / "nowhere")
    elif kind == "link to a file":
        journal.symlink_to(other)
    else:
        os.mkfifo(journal)
    with pytest.raises(RunError, match=r"journal .*fits.tbl.journal (is a|is not a).*; remove it"):
        _run(small_survey, output, jobs=1)
    assert other.read_text() == "keep me\n" and not output.exists()


def test_resume_appends_to_the_journal_instead_of_rewriting_it(small_survey, tmp_path, monkeypatch) -> None:
    """A resumed run's journal keeps the earlier records where they are: rewriting them (as
    a run once did) lost them all when that write failed (a full disk)."""
    output = tmp_path / "fits.tbl"
    reference = tmp_path / "reference.tbl"
    _run(small_survey, reference, jobs=1)

    def interrupt_late(batch, template, options):
        if batch[0].index >= 4:
            raise KeyboardInterrupt
        return process_batch(batch, template, options)

    with pytest.raises(Interrupted):
        _run(small_survey, output, jobs=1, batch_size=1, task=interrupt_late)
    journal = Path(str(output) + ".journal")
    before = journal.read_bytes()
    start = diffit.runner._Journal.start

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def start_on_full_disk(self):
        self._stream = FullDisk(self._stream)
        start(self)

    monkeypatch.setattr(diffit.runner._Journal, "start", start_on_full_disk)
    with pytest.raises(RunError, match="Can't write journal"):
        _run(small_survey, output, jobs=1, resume=True)
    assert journal.read_bytes() == before
    monkeypatch.undo()
    _run(small_survey, output, jobs=1, resume=True)
    assert output.read_bytes() == reference.read_bytes() and not journal.exists()
