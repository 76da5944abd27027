"""Command-line interfaces: Montage's ``mDiffFitExec`` and diffit's own ``diffit``."""
from __future__ import annotations

import argparse
import csv
import getopt
import logging
import os
import signal
import sys
from collections.abc import Sequence

from diffit.config import ConfigError, load_config
from diffit.headers import TemplateError
from diffit.outputs import AtomicOutput, remove_stale_temporaries
from diffit.pair import PairOutcome, diff_paths, file_path
from diffit.runner import Interrupted, RunError, RunResult, run
from diffit.tables import TableError

log = logging.getLogger("diffit")

MONTAGE_USAGE = (
    "Usage: {prog} [-d] [-l(evel-only)] [-k(eep-all)] [-n(o-areas)] [-p projdir] "
    "[-s statusfile] [-j threads] diffs.tbl template.hdr diffdir fits.tbl"
)
EXPECTED_ERRORS = (TableError, TemplateError, RunError, ConfigError)


def debug_lines(outcome: PairOutcome, projdir: str, diffdir: str) -> list[str]:
    """Montage-style ``-d`` lines for one pair: what was done and why it failed."""
    diff_path = diff_paths(diffdir, outcome.diff)[0]
    plus = file_path(projdir, outcome.plus)
    minus = file_path(projdir, outcome.minus)
    lines = []
    diff_status = f"[struct stat=\"ERROR\", msg=\"{outcome.reason}\"]" if outcome.stage == "diff" \
        else "[struct stat=\"OK\"]"
    lines.append(f"mDiff({plus}, {minus}, {diff_path}) -> {diff_status}")
    if outcome.stage == "fit":
        lines.append(f"mFitplane({diff_path}) -> [struct stat=\"ERROR\", msg=\"{outcome.reason}\"]")
    elif outcome.stage == "ok":
        f = outcome.fit
        lines.append(
            f"mFitplane({diff_path}) -> [struct stat=\"OK\", a={f.a:g}, b={f.b:g}, c={f.c:g}, "
            f"npixel={f.npixel}, rms={f.rms:g}]"
        )
    return lines


def _tolerate_undecodable_names() -> None:
    """Let stdout and stderr print names that were not valid in the file system's
    encoding (read from a table as surrogate escapes) as their original bytes."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError):  # pragma: no cover - a replaced stream
            pass


def _say(text: str, stream=None) -> None:
    """print() that survives a reader that went away (``mDiffFitExec -d ... | head``):
    the run goes on and later output is dropped, instead of a BrokenPipeError."""
    stream = stream if stream is not None else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # pragma: no cover - a stream without a descriptor
            pass


def _install_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # pragma: no cover - not the main thread
        pass


# --------------------------------------------------------------------------------------
# mDiffFitExec: Montage's command line
# --------------------------------------------------------------------------------------

def montage_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mDiffFitExec`` console script (Montage-compatible)."""
    argv = list(sys.argv if argv is None else argv)
    _tolerate_undecodable_names()
    prog = argv[0] if argv else "mDiffFitExec"
    usage = f'[struct stat="ERROR", msg="{MONTAGE_USAGE.format(prog=prog)}"]'
    try:
        opts, args = getopt.gnu_getopt(argv[1:], "klnp:ds:a:j:")
    except getopt.GetoptError:
        print(usage, flush=True)
        return 1
    flags = {"debug": False, "level_only": False, "keep_all": False, "no_areas": False,
             "projdir": ".", "status": None, "jobs": None}
    for option, value in opts:
        if option == "-d":
            flags["debug"] = True
        elif option == "-l":
            flags["level_only"] = True
        elif option == "-k":
            flags["keep_all"] = True
        elif option == "-n":
            flags["no_areas"] = True
        elif option == "-p":
            flags["projdir"] = value
        elif option == "-s":
            flags["status"] = value
        elif option == "-a":
            print('[struct stat="ERROR", msg="-a (S3 archive) is not supported by diffit:'
                  ' copy the images to a local or shared folder and use -p"]', flush=True)
            return 1
        elif option == "-j":
            try:
                flags["jobs"] = int(value)
            except ValueError:
                print(f'[struct stat="ERROR", msg="-j needs a whole number, not {value}"]', flush=True)
                return 1
    if len(args) < 4:
        print(usage, flush=True)
        return 1
    status_stream = sys.stdout
    if flags["status"]:
        try:
            status_stream = open(flags["status"], "w+")
        except OSError:
            print(f'[struct stat="ERROR", msg="Cannot open status file: {flags["status"]}"]', flush=True)
            return 1
    diffs, template, diffdir, output = args[:4]
    _install_sigterm()

    def report(outcome: PairOutcome) -> None:
        for line in debug_lines(outcome, flags["projdir"], diffdir):
            _say(line)

    try:
        result = run(flags["projdir"], diffs, template, output, diffdir=diffdir,
                     keep_all=flags["keep_all"], level_only=flags["level_only"],
                     no_areas=flags["no_areas"], jobs=flags["jobs"],
                     on_outcome=report if flags["debug"] else None)
    except (*EXPECTED_ERRORS, Interrupted) as error:
        _say(f'[struct stat="ERROR", msg="{error}"]', status_stream)
        return 130 if isinstance(error, Interrupted) else 1
    _say(f'[struct stat="OK", module="mDiffFitExec", count={result.count}, '
         f'diff_failed={result.diff_failed}, fit_failed={result.fit_failed}, '
         f'warning={result.warning}]', status_stream)
    if status_stream is not sys.stdout:
        status_stream.close()
    return 0


# --------------------------------------------------------------------------------------
# diffit: the modern command line
# --------------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``diffit: error: ...``), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"diffit: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="diffit",
        description="Difference and fit overlapping image pairs (Montage mDiffFitExec, in parallel).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="fit every pair of an overlap table, write fits.tbl")
    p.add_argument("--config", help="flat TOML file of these options (command line wins)")
    p.add_argument("--projdir", help="folder of the projected images")
    p.add_argument("--diffs", help="overlap table (mOverlaps' diffs.tbl)")
    p.add_argument("--template", help="Montage text header (.hdr) of the mosaic grid")
    p.add_argument("--output", help="fits.tbl to write")
    p.add_argument("--diffdir", help="folder for difference images (with --keep-diffs)")
    p.add_argument("--keep-diffs", action="store_true", default=None,
                   help="write the difference and area images (Montage's -k)")
    p.add_argument("--level-only", action="store_true", default=None, help="fit level only (-l)")
    p.add_argument("--no-areas", action="store_true", default=None,
                   help="images have no _area files (-n)")
    p.add_argument("--jobs", "-j", type=int,
                   help="workers (default: all cores; one thread when the first pairs are small)")
    p.add_argument("--batch-size", type=int, help="pairs per worker task")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.add_argument("--failures", help="write failed pairs and reasons to this CSV file")
    p.add_argument("--resume", action="store_true", default=None,
                   help="skip pairs finished by an interrupted run")
    p.add_argument("--backend", choices=["threads", "processes", "dask"],
                   help="workers: threads (default), processes (isolates crashes) or a Dask cluster")
    p.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786")

    d = sub.add_parser("demo", help="generate a small survey and run diffit on it")
    d.add_argument("directory", nargs="?", default="diffit-demo", help="where to put it")
    d.add_argument("--tiles", type=int, default=24, help="number of tiles")
    d.add_argument("--seed", type=int, default=1, help="random seed")
    d.add_argument("--jobs", "-j", type=int,
                   help="workers (default: all cores; one thread when the first pairs are small)")
    d.add_argument("--no-progress", dest="progress", action="store_false", default=True)

    q = sub.add_parser("plot", help="QA picture of a fits.tbl")
    q.add_argument("fits", help="fits.tbl")
    q.add_argument("--projdir", required=True, help="folder of the projected images")
    q.add_argument("--diffs", required=True, help="overlap table")
    q.add_argument("-o", "--output", default="qa.png", help="PNG to write")
    return parser


def _settings(args: argparse.Namespace) -> dict:
    settings = load_config(args.config) if args.config else {}
    for key in ("projdir", "diffs", "template", "output", "diffdir", "keep_diffs", "level_only",
                "no_areas", "jobs", "batch_size", "progress", "failures", "resume", "backend",
                "scheduler"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    missing = [k for k in ("projdir", "diffs", "template", "output") if not settings.get(k)]
    if missing:
        raise ConfigError("missing " + ", ".join("--" + k for k in missing)
                          + " (give them on the command line or in --config)")
    return settings


def write_failures(output: AtomicOutput, failures: list[PairOutcome]) -> None:
    """Write failed pairs with their reasons as CSV and commit the file (names that were
    not valid UTF-8 in the table are written back as the same bytes).

    Parameters
    ----------
    output : AtomicOutput
        The CSV file, opened before the run (so that a bad path fails first).
    failures : list of PairOutcome
    """
    try:
        writer = csv.writer(output.stream, lineterminator="\n")
        writer.writerow(["index", "cntr1", "cntr2", "plus", "minus", "diff", "stage", "reason"])
        for o in sorted(failures, key=lambda o: o.index):
            writer.writerow([o.index, o.cntr1, o.cntr2, o.plus, o.minus, o.diff, o.stage, o.reason])
        output.commit()
    except OSError as error:
        output.discard()
        raise RunError(f"Can't write failures file {output.path}: {error.strerror or error}") from None


def _show_progress(requested: bool | None) -> bool:
    if requested is False:
        return False
    return sys.stderr.isatty()


def _run_command(args: argparse.Namespace) -> int:
    s = _settings(args)
    try:
        return _run_settings(s)
    except TableError as error:  # Montage's "Need columns" text does not name the table
        if str(s["diffs"]) not in str(error):
            raise TableError(f"{s['diffs']}: {error}") from None
        raise


def _run_settings(s: dict) -> int:
    backend = s.get("backend", "threads")
    if s.get("scheduler") and backend != "dask":
        raise ConfigError("--scheduler (a Dask scheduler address) needs --backend dask")
    if s.get("keep_diffs") and not s.get("diffdir"):
        raise ConfigError("--keep-diffs needs --diffdir (the folder for the difference images)")
    kwargs = dict(diffdir=s.get("diffdir"), keep_all=s.get("keep_diffs", False),
                  level_only=s.get("level_only", False), no_areas=s.get("no_areas", False),
                  jobs=s.get("jobs"), batch_size=s.get("batch_size"),
                  progress=_show_progress(s.get("progress")), resume=s.get("resume", False))
    failures = None
    if s.get("failures"):  # refused before the run, not after fits.tbl is written
        _check_failures_path(s)
        try:
            failures = AtomicOutput(s["failures"])
        except OSError as error:
            raise RunError(f"Can't write failures file {s['failures']}: {error.strerror or error}") from None
    try:
        result = _run_backend(s, backend, kwargs)
    except BaseException:
        if failures is not None:
            failures.discard()
        raise
    if failures is not None:
        write_failures(failures, result.failures)
        remove_stale_temporaries(s["failures"])  # of runs that were killed
    _print_summary(result, s["output"])
    return 0


def _check_failures_path(s: dict) -> None:
    """ConfigError when the failures CSV would replace the output or an input file."""
    failures = os.path.realpath(s["failures"])
    for key, what in (("output", "the output file"), ("diffs", "the overlap table"),
                      ("template", "the template")):
        other = s.get(key)
        if other is None:
            continue
        same = os.path.realpath(other) == failures
        if not same and os.path.exists(other) and os.path.exists(s["failures"]):
            try:
                same = os.path.samefile(other, s["failures"])
            except OSError:
                same = False
        if same:
            raise ConfigError(f"--failures {s['failures']} is {what}; give the CSV another name")


def _run_backend(s: dict, backend: str, kwargs: dict) -> RunResult:
    if backend == "dask":
        from diffit.distributed import dask_backend

        with dask_backend(s.get("scheduler")) as backend_name:
            result = run(s["projdir"], s["diffs"], s["template"], s["output"],
                         backend=backend_name, **kwargs)
    else:
        result = _run_with_logging(s, dict(kwargs, backend=backend))
    return result


def _run_with_logging(s: dict, kwargs: dict) -> RunResult:
    if kwargs["progress"]:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            return run(s["projdir"], s["diffs"], s["template"], s["output"], **kwargs)
    return run(s["projdir"], s["diffs"], s["template"], s["output"], **kwargs)


def _print_summary(result: RunResult, output: str) -> None:
    _say(f"{result.count} pairs: {result.succeeded} fitted, {result.diff_failed} diff failed, "
         f"{result.fit_failed} fit failed -> {output}")
    reasons: dict[str, int] = {}
    for failure in result.failures:
        reasons[failure.reason] = reasons.get(failure.reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda item: -item[1])[:5]:
        _say(f"  {n:6d} x {reason}")


def _demo_command(args: argparse.Namespace) -> int:
    from diffit.demo import run_demo

    return run_demo(args.directory, tiles=args.tiles, seed=args.seed, jobs=args.jobs,
                    progress=_show_progress(args.progress))


def _plot_command(args: argparse.Namespace) -> int:
    from diffit.plot import plot_fits

    if os.path.isdir(args.output):
        raise RunError(f"Can't write picture {args.output}: Is a directory")
    try:
        plot_fits(args.fits, projdir=args.projdir, diffs=args.diffs, output=args.output)
    except ValueError as error:  # matplotlib: an unknown picture format
        raise RunError(f"Can't write picture {args.output}: {str(error).splitlines()[0]}") from None
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffit`` console script."""
    args = _parser().parse_args(argv)
    _tolerate_undecodable_names()
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="diffit: %(levelname)s: %(message)s")
    _install_sigterm()
    commands = {"run": _run_command, "demo": _demo_command, "plot": _plot_command}
    try:
        return commands[args.command](args)
    except Interrupted as error:
        print(f"diffit: {error}", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        reason = getattr(error, "reason", None)
        print(f"diffit: error: {error}" + (f" ({reason})" if reason else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
