"""The scheduler and collector: fan overlap pairs out to joblib workers, gather rows.

The overlap table is streamed in batches of consecutive pairs (consecutive pairs in an
mOverlaps table share images, so a worker's open-file cache serves them), a bounded
number of batches is in flight at once, and the collector writes rows to fits.tbl in
input order as soon as they are contiguous, so memory stays flat however long the
table is. Every finished batch is appended to a journal beside the output, which makes
an interrupted run resumable; fits.tbl itself appears only at the end, by a rename.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import chain, islice

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from diffit.allocator import keep_freed_memory
from diffit.fitsio import ImageReader
from diffit.outputs import AtomicOutput, destination, remove_stale_temporaries
from diffit.headers import Template, read_template
from diffit.pair import PairOptions, PairOutcome, diff_paths, process_pair, release_workspace
from diffit.tables import FITS_TBL_HEADER, OverlapPair, iter_overlap_table

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
BACKENDS = ("threads", "processes")
_READER: ImageReader | None = None  # this process's open-file cache, shared by its threads
_READER_LOCK = threading.Lock()


class RunError(Exception):
    """A global fault: nothing was computed, or the output could not be written."""


class Interrupted(Exception):
    """The run was interrupted; completed pairs are in the journal."""

    def __init__(self, done: int, total: int, journal: str) -> None:
        super().__init__(f"interrupted after {done} of {total} pairs; rerun with --resume")
        self.done = done
        self.total = total
        self.journal = journal


@dataclass
class RunResult:
    """Outcome of a run: Montage's counters plus, optionally, every pair's outcome.

    Attributes
    ----------
    count : int
        Records in the overlap table (blank lines included, as Montage counts them).
    diff_failed, fit_failed, warning : int
        Montage's counters (``warning`` is always 0, as in Montage's library).
    failures : list of PairOutcome
        Every pair that failed, with its reason.
    outcomes : list of PairOutcome or None
        Every pair's outcome in table order, when requested.
    """

    count: int = 0
    diff_failed: int = 0
    fit_failed: int = 0
    warning: int = 0
    failures: list[PairOutcome] = field(default_factory=list)
    outcomes: list[PairOutcome] | None = None

    @property
    def succeeded(self) -> int:
        """Pairs with a fits.tbl row."""
        return self.count - self.diff_failed - self.fit_failed

    def tally(self, outcome: PairOutcome) -> None:
        """Count one pair's outcome."""
        self.count += 1
        if outcome.stage == "diff":
            self.diff_failed += 1
        elif outcome.stage == "fit":
            self.fit_failed += 1
        if outcome.stage != "ok":
            self.failures.append(outcome)
        if self.outcomes is not None:
            self.outcomes.append(outcome)


def _worker_reader() -> ImageReader:
    global _READER
    with _READER_LOCK:
        if _READER is None:
            keep_freed_memory()  # also in worker processes
            _READER = ImageReader(max_open=256)
        return _READER


def _close_readers() -> None:
    """Close the files held by this process's reader (it reopens files on demand)."""
    if _READER is not None:
        _READER.close()


def process_batch(
    batch: list[OverlapPair], template: Template, options: PairOptions
) -> list[PairOutcome]:
    """Process consecutive pairs in one worker (the joblib task)."""
    reader = _worker_reader()
    return [process_pair(pair, template, options, reader) for pair in batch]


def _batches(pairs: Iterable[OverlapPair], size: int) -> Iterator[list[OverlapPair]]:
    """Consecutive pairs in batches of ``size``."""
    iterator = iter(pairs)
    while batch := list(islice(iterator, size)):
        yield batch


def _guided_batches(pairs: Iterable[OverlapPair], remaining: int, jobs: int,
                    largest: int = 64) -> Iterator[list[OverlapPair]]:
    """Consecutive pairs in batches that shrink towards the end of the table.

    Each batch is at most 1/(4*jobs) of the pairs still to come (and at most
    ``largest``), so the workers' last tasks are small and end close together
    instead of one worker finishing a long batch while the others idle (OpenMP's
    "guided" schedule).
    """
    iterator = iter(pairs)
    while True:
        size = max(1, min(largest, remaining // (4 * jobs)))
        batch = list(islice(iterator, size))
        if not batch:
            return
        remaining -= len(batch)
        yield batch


def _count_records(path: str) -> int:
    return sum(1 for _ in iter_overlap_table(path))


def default_jobs() -> int:
    """All cores available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _outcome_record(outcome: PairOutcome) -> dict:
    return {"index": outcome.index, "stage": outcome.stage, "reason": outcome.reason,
            "row": outcome.row, "cntr1": outcome.cntr1, "cntr2": outcome.cntr2,
            "plus": outcome.plus, "minus": outcome.minus, "diff": outcome.diff}


@dataclass(frozen=True)
class _JournalOutcome(PairOutcome):
    """A pair outcome restored from the journal (its row is stored as text)."""

    stored_row: str | None = None

    @property
    def row(self) -> str | None:  # type: ignore[override]
        return self.stored_row


def _lock(stream, exclusive: bool) -> bool:
    """Lock an open file for this run without waiting; False when another run holds it
    (True where there are no locks: not POSIX, or a file system without them)."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(stream.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        pass
    return True


_RECORD_TYPES = {"index": (int,), "stage": (str,), "reason": (str, type(None)),
                 "row": (str, type(None)), "cntr1": (int,), "cntr2": (int,), "plus": (str,),
                 "minus": (str,), "diff": (str,)}


def _valid_record(record: object, total: int) -> bool:
    """A journal line as :func:`_outcome_record` writes it, for a table of ``total`` pairs:
    the right types (no booleans for numbers), an index in the table, and a fits.tbl row
    (20 fields, starting with the pair's cntr1 and cntr2) exactly for fitted pairs."""
    if not (isinstance(record, dict)
            and all(isinstance(record.get(key, ...), types) and not isinstance(record.get(key), bool)
                    for key, types in _RECORD_TYPES.items())
            and record["stage"] in ("ok", "diff", "fit") and 0 <= record["index"] < total):
        return False
    row = record["row"]
    if record["stage"] != "ok":
        return row is None
    fields = row.split() if isinstance(row, str) else []
    return (row.endswith("\n") and len(fields) == 20
            and fields[:2] == [str(record["cntr1"]), str(record["cntr2"])])


class _Journal:
    """Append-only record of finished pairs, for resuming an interrupted run.

    The journal is also the output's lock: a run opens it (creating it if need be) and
    takes an exclusive lock on it before it writes or removes anything, holds the lock
    until it ends, and never replaces the file, so two runs on one output always lock
    the same file and the second is refused.
    """

    def __init__(self, path: str, signature: dict, output: str = "") -> None:
        self.path = path
        self.signature = signature
        self.output = output or path[:-len(JOURNAL_SUFFIX)]
        self._stream = None
        self._created = False
        self._resume_at: int | None = None  # where a resumed run's records follow

    def acquire(self) -> None:
        """Open and lock the journal for this run.

        Raises
        ------
        RunError
            Another run holds it, or it cannot be opened, or it is not a regular file.
        """
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        for _ in range(100):  # another run may remove the file between our open and lock
            created = False
            try:
                try:
                    fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                    created = True
                except FileExistsError:
                    try:
                        fd = os.open(self.path, flags)
                    except FileNotFoundError:
                        if os.path.islink(self.path):
                            raise self._odd("is a dangling symbolic link") from None
                        continue  # removed just now: create it afresh
            except OSError as error:
                if os.path.islink(self.path):
                    raise self._odd("is a symbolic link") from None
                raise RunError(f"Can't write journal {self.path}: {_reason(error)}") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                raise self._odd("is not a regular file")
            stream = open(fd, "r+b")  # noqa: SIM115 - held (and locked) until the run ends
            if not _lock(stream, exclusive=True):
                stream.close()
                raise self._locked()
            try:
                same = os.path.samestat(info, os.stat(self.path))
            except OSError:
                same = False
            if same:
                self._stream, self._created = stream, created
                return
            stream.close()  # we locked a file that another run has just removed
        raise self._locked()  # pragma: no cover - the file keeps vanishing

    def _odd(self, what: str) -> RunError:
        return RunError(f"journal {self.path} {what}; remove it")

    def _locked(self) -> RunError:
        return RunError(f"another diffit run is writing {self.output} (its journal is locked);"
                        " wait for it to end")

    def load(self) -> dict[int, dict]:
        """Records of a previous run with the same signature (empty when none).

        The journal is then cut after its last complete record, so that this run's
        records follow it (a torn last line from a crash goes; that batch is redone).
        """
        done: dict[int, dict] = {}
        corrupt = RunError(f"journal {self.path} is corrupt; remove it")
        try:
            self._stream.seek(0)
            first = self._stream.readline()
            if not first:
                return done  # a new (or empty) journal
            try:
                signature = json.loads(first) if first.endswith(b"\n") else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise corrupt from None
            if signature != self.signature:
                raise RunError(
                    f"journal {self.path} belongs to a run with other inputs or options;"
                    " remove it or rerun without --resume"
                )
            end = len(first)
            for line in self._stream:
                try:
                    record = json.loads(line) if line.endswith(b"\n") else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None
                if record is None:
                    break  # a torn last line from a crash: that batch is redone
                if not _valid_record(record, self.signature["pairs"]):
                    raise corrupt
                done[record["index"]] = record
                end += len(line)
            self._resume_at = end
        except OSError as error:
            raise RunError(f"Can't read journal {self.path}: {error.strerror or error}") from None
        return done

    def start(self) -> None:
        """Start this run's records: after the loaded ones (``--resume``), else afresh
        with this run's signature."""
        try:
            if self._resume_at is not None:
                self._stream.seek(self._resume_at)
                self._stream.truncate()
            else:
                self._stream.seek(0)
                self._stream.truncate()
                self._stream.write((json.dumps(self.signature) + "\n").encode())
            self._stream.flush()
        except OSError as error:  # e.g. ENOSPC
            raise RunError(f"Can't write journal {self.path}: {error.strerror or error}") from None

    def append(self, outcomes: list[PairOutcome]) -> None:
        try:
            self._stream.write("".join(json.dumps(_outcome_record(o)) + "\n"
                                       for o in outcomes).encode())
            self._stream.flush()
        except OSError as error:  # e.g. ENOSPC
            raise RunError(f"Can't write journal {self.path}: {error.strerror or error}") from None

    def close(self) -> None:
        """Release the lock, keeping the journal (for ``--resume``)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:  # the final flush failed (full disk): the journal is torn
                pass

    def abandon(self) -> None:
        """Release the lock of a run that did not start; a journal it created goes."""
        if self._created and self._stream is not None:
            self._remove_locked()
        self.close()

    def remove(self) -> None:
        """Remove the journal of a finished run (while still holding its lock)."""
        if self._stream is not None:
            self._remove_locked()
        self.close()

    def _remove_locked(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class _OrderedWriter:
    """Writes rows to fits.tbl in table order, atomically (see :mod:`diffit.outputs`)."""

    def __init__(self, output: str,
                 on_outcome: Callable[[PairOutcome], None] | None = None) -> None:
        self.on_outcome = on_outcome
        try:
            self.file = AtomicOutput(output, encoding="ascii")
        except OSError as error:
            raise RunError(f"Can't open output file {output}: {_reason(error)}") from None
        self.output = output
        self.stream = self.file.stream
        self.next_index = 0
        self.pending: dict[int, PairOutcome] = {}
        self.add_text(FITS_TBL_HEADER)

    def add_text(self, text: str) -> None:
        try:
            self.stream.write(text)
        except OSError as error:  # e.g. ENOSPC when the buffer is flushed
            raise RunError(f"Can't write output file {self.output}: {_reason(error)}") from None

    def add(self, outcome: PairOutcome) -> None:
        """Take a pair's outcome; write (and report) every pair now contiguous, in order."""
        self.pending[outcome.index] = outcome
        while self.next_index in self.pending:
            outcome = self.pending.pop(self.next_index)
            if outcome.row is not None:
                self.add_text(outcome.row)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            self.next_index += 1

    def commit(self) -> None:
        if self.pending:
            raise RunError("internal error: pairs missing from the results")  # pragma: no cover
        try:
            self.file.commit()
        except OSError as error:
            raise RunError(f"Can't write output file {self.output}: {_reason(error)}") from None

    def discard(self) -> None:
        self.file.discard()


def _check_output_folder(output: str) -> None:
    """RunError unless the folder the output will be written in exists."""
    try:
        directory = os.path.dirname(destination(output)) or "."
    except OSError as error:  # a loop of symbolic links
        raise RunError(f"Can't open output file {output}: {_reason(error)}") from None
    if not os.path.isdir(directory):
        raise RunError(f"Can't open output file {output}: folder {directory} does not exist")


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def run(
    projdir: str | os.PathLike,
    diffs: str | os.PathLike,
    template: str | os.PathLike,
    output: str | os.PathLike,
    *,
    diffdir: str | os.PathLike | None = None,
    keep_all: bool = False,
    level_only: bool = False,
    no_areas: bool = False,
    jobs: int | None = None,
    batch_size: int | None = None,
    progress: bool | Callable[[int], object] = False,
    resume: bool = False,
    keep_outcomes: bool = False,
    on_outcome: Callable[[PairOutcome], None] | None = None,
    backend: str = "threads",
    task: Callable[[list[OverlapPair], Template, PairOptions], list[PairOutcome]] | None = None,
) -> RunResult:
    """Difference and fit every pair of an overlap table; write fits.tbl.

    Parameters
    ----------
    projdir : path
        Folder of the projected images (Montage's ``path``/``-p``).
    diffs : path
        Overlap table (mOverlaps' diffs.tbl).
    template : path
        Montage text header of the common pixel grid.
    output : path
        fits.tbl to write (atomically: an existing file is replaced only on success).
    diffdir : path, optional
        Where difference images go with ``keep_all`` (created if missing).
    keep_all, level_only, no_areas : bool
        Montage's ``-k``, ``-l`` and ``-n``.
    jobs : int, optional
        Workers (1 runs in this process). By default all cores, except that a threads run
        whose first pairs are small (under :data:`SMALL_PAIR_PIXELS` fitted pixels) goes
        on in this process: worker threads cannot overlap such pairs' Python work.
    batch_size : int, optional
        Pairs per task (default: up to 64, shrinking towards the end of the table so
        that the workers finish together).
    progress : bool or callable
        ``True`` for a tqdm bar on stderr, or a callable given the number of pairs just
        finished (for a caller's own progress display).
    resume : bool
        Skip pairs finished by an interrupted run with the same inputs (from the journal).
    keep_outcomes : bool
        Keep every pair's outcome in the result (memory grows with the table).
    on_outcome : callable, optional
        Called with each pair's outcome, in table order (as Montage's ``-d`` lines).
    backend : str, optional
        ``"threads"`` (default: worker threads in this process; the kernels release the
        GIL), ``"processes"`` (worker processes, isolating crashes: a dying worker fails
        only its pairs), or another joblib backend name (e.g. ``"dask"`` inside
        ``joblib.parallel_config``).
    task : callable, optional
        The per-batch worker function (default :func:`process_batch`); it must be
        importable by worker processes. For instrumentation and fault injection.

    Returns
    -------
    RunResult

    Raises
    ------
    diffit.tables.TableError, diffit.headers.TemplateError, RunError, Interrupted
    """
    projdir, diffs, template_path, output = (
        _file_name(p, what) for p, what in ((projdir, "image folder"), (diffs, "overlap table"),
                                            (template, "template"), (output, "output file")))
    diffdir = _file_name(diffdir, "diff folder") if diffdir is not None else "."
    if batch_size is not None and batch_size < 1:
        raise RunError(f"batch size must be at least 1 (got {batch_size})")
    if jobs is not None and jobs > MAX_JOBS:
        raise RunError(f"jobs must be at most {MAX_JOBS} (got {jobs})")
    backend = backend or "threads"
    _check_backend(backend)
    total = _count_records(diffs)  # validates the table (TableError) before anything else
    parsed_template = read_template(template_path)
    if keep_all:
        try:
            os.makedirs(diffdir, exist_ok=True)
        except FileExistsError:
            raise RunError(f"Can't create diff folder {diffdir}: a file of that name exists") from None
        except OSError as error:
            raise RunError(f"Can't create diff folder {diffdir}: {error.strerror}") from None
    options = PairOptions(projdir=projdir, diffdir=diffdir, keep_all=keep_all,
                          level_only=level_only, no_areas=no_areas)
    auto_jobs = not jobs or jobs < 0  # not chosen: all cores, or one for small pairs
    jobs = default_jobs() if auto_jobs else jobs
    if backend not in BACKENDS:  # workers elsewhere (Dask) may start in another folder
        options = replace(options, projdir=os.path.abspath(projdir), diffdir=os.path.abspath(diffdir))

    # What the journal's rows depend on: --resume refuses a journal of other inputs.
    signature = {"diffs": os.path.abspath(diffs), "template": os.path.abspath(template_path),
                 "projdir": os.path.abspath(projdir), "level_only": level_only,
                 "no_areas": no_areas, "keep_all": keep_all, "pairs": total,
                 "diffs_sha256": _file_digest(diffs), "template_sha256": parsed_template.digest}
    if keep_all:  # the kept images of the journal's pairs are in that folder
        signature["diffdir"] = os.path.abspath(diffdir)
    _check_output_folder(output)
    journal = _Journal(journal_path(output), signature, output)
    journal.acquire()  # the output's lock, held until the run ends: taken before any write
    writer = None
    try:
        done = journal.load() if resume else {}
        writer = _OrderedWriter(output, on_outcome)
        bar = _make_bar(progress, total)
        kept_names = _KeptNames(diffs, diffdir) if keep_all else None
    except BaseException:
        if writer is not None:
            writer.discard()
        journal.abandon()
        raise
    result = RunResult(outcomes=[] if keep_outcomes else None)
    finished = 0
    try:
        keep_freed_memory()  # per-pair arrays are recycled, not faulted in afresh
        journal.start()
        remove_stale_temporaries(output, keep=writer.file.temporary)
        remove_stale_temporaries(journal.path)
        restored = [_restore(record) for record in done.values()]
        for outcome in sorted(restored, key=lambda o: o.index):
            _collect(outcome, writer, result, kept_names)
        finished = len(restored)
        if bar is not None and finished:
            bar(finished)
        todo = (pair for pair in iter_overlap_table(diffs) if pair.index not in done)
        batches = (_batches(todo, batch_size) if batch_size is not None
                   else _guided_batches(todo, total - len(done), jobs))
        for outcomes in _execute(batches, parsed_template, options, jobs, backend, task,
                                 auto_jobs=auto_jobs):
            journal.append(outcomes)
            for outcome in outcomes:
                _collect(outcome, writer, result, kept_names)
            finished += len(outcomes)
            if bar is not None:
                bar(len(outcomes))
        if kept_names is not None:
            kept_names.rewrite_winners(parsed_template, options)
        writer.commit()
    except KeyboardInterrupt:
        writer.discard()
        journal.close()  # kept, so that --resume can finish the run
        raise Interrupted(finished, total, journal.path) from None
    except BaseException:
        writer.discard()
        journal.close()
        raise
    finally:
        _close_readers()
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    journal.remove()
    if result.outcomes is not None:
        result.outcomes.sort(key=lambda o: o.index)
    return result


def journal_path(output: str) -> str:
    """The journal of an output: beside the file it really is (links followed, so that
    two names of one file share one journal and one lock), named after it."""
    real = os.path.realpath(output)
    directory, name = os.path.split(real)
    if len(name) + len(JOURNAL_SUFFIX) > 255:  # keep within the file system's name limit
        name = name[:200] + "-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(directory, name + JOURNAL_SUFFIX)


#: Most workers a run accepts (thread pools far beyond the cores only cost memory).
MAX_JOBS = 1024


def _file_name(value, what: str) -> str:
    """A path argument as text (str, bytes or path-like), or RunError."""
    try:
        name = os.fsdecode(value)
    except TypeError:
        raise RunError(f"the {what} must be a file name, not {type(value).__name__}") from None
    if "\0" in name:
        raise RunError(f"the {what} name {name!r} contains a NUL character")
    return name


def _check_backend(backend: str) -> None:
    if backend in BACKENDS:
        return
    import joblib.parallel

    if backend not in joblib.parallel.BACKENDS:
        raise RunError(f"unknown backend {backend!r} (use threads, processes or dask)")
    if joblib.parallel.BACKENDS[backend].supports_return_generator is False:
        raise RunError(f"joblib backend {backend!r} cannot return results as they complete"
                       " (use threads, processes or dask)")


def _file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (the overlap table, already read once: it exists)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _restore(record: dict) -> PairOutcome:
    return _JournalOutcome(index=record["index"], cntr1=record["cntr1"], cntr2=record["cntr2"],
                           plus=record["plus"], minus=record["minus"], diff=record["diff"],
                           stage=record["stage"], reason=record["reason"],
                           stored_row=record["row"])


def _collect(outcome: PairOutcome, writer: _OrderedWriter, result: RunResult,
             kept_names: _KeptNames | None = None) -> None:
    writer.add(outcome)  # reports it to on_outcome, in table order
    result.tally(outcome)
    if kept_names is not None:
        kept_names.note(outcome)


class _KeptNames:
    """Difference images that several pairs of a keepAll run write to the same file.

    Montage works through the table in order, so such a file ends up holding the image
    of the last pair (in table order) whose difference succeeded. Parallel workers write
    in any order, so once every pair is done, that pair's images are written once more.
    """

    def __init__(self, diffs: str, diffdir: str) -> None:
        self.diffdir = diffdir
        seen: set[tuple[str, str]] = set()
        self.shared: set[tuple[str, str]] = set()
        for pair in iter_overlap_table(diffs):
            paths = diff_paths(diffdir, pair.diff)
            (self.shared if paths in seen else seen).add(paths)
        self.winners: dict[tuple[str, str], PairOutcome] = {}

    def note(self, outcome: PairOutcome) -> None:
        """Take a finished pair; it wrote its images unless its difference failed."""
        if not self.shared or outcome.stage == "diff":
            return
        paths = diff_paths(self.diffdir, outcome.diff)
        if paths in self.shared:
            best = self.winners.get(paths)
            if best is None or best.index < outcome.index:
                self.winners[paths] = outcome

    def rewrite_winners(self, template: Template, options: PairOptions) -> None:
        """Write each shared file again from the last pair in table order that wrote it."""
        if not self.winners:
            return
        with ImageReader() as reader:
            for outcome in sorted(self.winners.values(), key=lambda o: o.index):
                pair = OverlapPair(index=outcome.index, cntr1=outcome.cntr1, cntr2=outcome.cntr2,
                                   plus=outcome.plus, minus=outcome.minus, diff=outcome.diff)
                process_pair(pair, template, options, reader)


WORKER_DIED = "worker process died (killed or out of memory) while processing this pair, twice"


def _worker_death_errors() -> tuple[type[BaseException], ...]:
    from concurrent.futures.process import BrokenProcessPool

    errors: list[type[BaseException]] = [BrokenProcessPool]
    try:
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        errors.append(TerminatedWorkerError)
    except ImportError:  # pragma: no cover - joblib without loky
        pass
    return tuple(errors)


#: With the number of workers left to diffit, a threads run whose first pairs fit fewer
#: pixels than this (their median) goes on in one thread: such pairs are mostly Python
#: work, which holds the GIL, so worker threads only take turns, and two were slower than
#: one (README, "Small images"). Pairs twice this size already gain from a second thread.
SMALL_PAIR_PIXELS = 4096
#: How many fitted pairs that decision looks at (done in this thread before any worker
#: starts: about 10 ms of one core on 512x1024 tiles).
PROBE_PAIRS = 4


def _probe(batches: Iterator[list[OverlapPair]], template: Template, options: PairOptions,
           task: Callable[..., list[PairOutcome]]):
    """Do the first pairs in this thread, until :data:`PROBE_PAIRS` of them are fitted
    (or four times as many were tried); return the batches still to do and whether the
    fitted pairs are small (see :data:`SMALL_PAIR_PIXELS`)."""
    sizes: list[int] = []
    tried = 0
    for batch in batches:
        while batch and len(sizes) < PROBE_PAIRS and tried < 4 * PROBE_PAIRS:
            now, batch = batch[:PROBE_PAIRS - len(sizes)], batch[PROBE_PAIRS - len(sizes):]
            outcomes = task(now, template, options)
            yield outcomes
            tried += len(now)
            sizes += [outcome.fit.npixel for outcome in outcomes if outcome.fit is not None]
        if batch:  # decided within this batch: its other pairs come first
            batches = chain([batch], batches)
            break
        if len(sizes) >= PROBE_PAIRS or tried >= 4 * PROBE_PAIRS:
            break
    sizes.sort()
    return batches, bool(sizes) and sizes[len(sizes) // 2] < SMALL_PAIR_PIXELS


def _execute(batches: Iterator[list[OverlapPair]], template: Template, options: PairOptions,
             jobs: int, backend: str, task: Callable[..., list[PairOutcome]] | None = None,
             *, auto_jobs: bool = False) -> Iterator[list[PairOutcome]]:
    """Run batches in this process, on worker threads or processes, or on another backend.

    With worker processes, a worker that dies (killed, out of memory) does not end the
    run: the pairs it may have been working on are retried once, one at a time, and
    reported as failed when their worker dies again. With ``auto_jobs`` (the number of
    workers was not chosen) a threads run of small pairs stays in this thread.
    """
    task = task or process_batch
    if backend == "threads":
        if jobs > 1 and auto_jobs:
            batches, small = yield from _probe(batches, template, options, task)
            if small:
                log.info("small overlaps (median fit under %d pixels): going on in one thread,"
                         " faster than %d for such pairs", SMALL_PAIR_PIXELS, jobs)
                jobs = 1
            else:  # the workers do the rest: free what this thread's pairs allocated
                release_workspace()
        if jobs == 1:
            for batch in batches:
                yield task(batch, template, options)
            return
        yield from _parallel(batches, {}, template, options, jobs, "threading", task)
        return
    if backend != "processes":  # e.g. "dask" inside joblib.parallel_config
        yield from _parallel(batches, {}, template, options, -1, backend, task)
        return
    died = _worker_death_errors()
    suspects: list[OverlapPair] = []
    while True:  # a fresh pool after each worker death; batches continue where they were
        in_flight: dict[int, list[OverlapPair]] = {}
        try:
            yield from _parallel(batches, in_flight, template, options, jobs, "loky", task)
            break
        except died:
            lost = [pair for batch in in_flight.values() for pair in batch]
            log.warning("a worker process died; retrying %d pair(s) one by one", len(lost))
            suspects.extend(lost)
    if suspects:
        yield from _retry_alone(suspects, template, options, task, died)


def _retry_alone(pairs: list[OverlapPair], template: Template, options: PairOptions,
                 task: Callable[..., list[PairOutcome]],
                 died: tuple[type[BaseException], ...]) -> Iterator[list[PairOutcome]]:
    """Retry pairs one at a time in a single worker process, so a crash names its pair."""
    from joblib.externals.loky import get_reusable_executor

    executor = None
    try:
        for pair in sorted(pairs, key=lambda p: p.index):
            executor = get_reusable_executor(max_workers=1)
            try:
                yield executor.submit(task, [pair], template, options).result()
            except died:
                yield [_died(pair)]
    finally:
        # loky's own executor lacks what joblib adds to the ones it makes: a later
        # joblib run in this process must not pick it up for reuse.
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)


def _parallel(batches, in_flight, template, options, jobs, backend, task):
    import joblib  # only parallel runs need it (about 0.1 s to import)

    def tracked():
        for batch in batches:
            in_flight[batch[0].index] = batch
            yield joblib.delayed(task)(batch, template, options)

    if backend in ("threading", "loky"):
        parallel = joblib.Parallel(n_jobs=jobs, backend=backend,
                                   return_as="generator_unordered", pre_dispatch="2*n_jobs")
    else:
        # joblib 1.6 builds a backend named in Parallel(backend=...) with nesting_level,
        # which its Dask backend forwards to every task (TypeError in Batch.__call__);
        # a backend chosen through parallel_config is built without it.
        with joblib.parallel_config(backend=backend):
            parallel = joblib.Parallel(n_jobs=jobs, return_as="generator_unordered",
                                       pre_dispatch="2*n_jobs")
    with warnings.catch_warnings():
        # An interrupted run ends with its own one-line message; joblib's warning that
        # the tasks in flight were cancelled would only add noise.
        warnings.filterwarnings("ignore", message=r".*tasks which were still being processed",
                                category=UserWarning)
        for outcomes in parallel(tracked()):
            in_flight.pop(outcomes[0].index, None)
            yield outcomes


def _died(pair: OverlapPair) -> PairOutcome:
    return PairOutcome(index=pair.index, cntr1=pair.cntr1, cntr2=pair.cntr2, plus=pair.plus,
                       minus=pair.minus, diff=pair.diff, stage="diff", reason=WORKER_DIED)


class _Bar:
    """Adapter giving a tqdm bar the ``bar(n)`` interface of a progress callable."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="pair", desc="diffit", dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _make_bar(progress: bool | Callable[[int], object], total: int):
    if callable(progress):
        return progress
    return _Bar(total) if progress else None


__all__ = ["RunError", "RunResult", "Interrupted", "run", "process_batch", "default_jobs"]
