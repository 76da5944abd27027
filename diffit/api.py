"""Python API: a drop-in for ``MontagePy.main.mDiffFitExec`` and the modern ``run``."""
from __future__ import annotations

import os

from diffit.headers import TemplateError
from diffit.runner import Interrupted, RunError, RunResult, run
from diffit.tables import TableError


def mDiffFitExec(  # noqa: N802 - Montage's name
    path: str,
    tblfile: str,
    template: str,
    diffdir: str,
    fitfile: str,
    keepAll: bool = False,  # noqa: N803
    levelOnly: bool = False,  # noqa: N803
    noAreas: bool = False,  # noqa: N803
    archive: str = "",
    debug: int = 0,
    *,
    jobs: int | None = None,
) -> dict:
    """Difference and fit every overlap pair, exactly as MontagePy's mDiffFitExec does.

    Parameters
    ----------
    path : str
        Folder of the projected images.
    tblfile : str
        Overlap table from mOverlaps (diffs.tbl).
    template : str
        Montage text header of the mosaic grid.
    diffdir : str
        Folder for the difference images (written only with ``keepAll``).
    fitfile : str
        Output fits.tbl.
    keepAll, levelOnly, noAreas : bool, optional
        Keep difference images; fit level only; inputs have no area images.
    archive : str, optional
        MontagePy's AWS S3 bucket. Not supported: an error status unless empty.
    debug : int, optional
        Print one line per pair (what was done and why a pair failed).
    jobs : int, optional
        Workers (default: all cores, or one thread when the first pairs are small: see
        :func:`diffit.run`). Keyword only; not in MontagePy.

    Returns
    -------
    dict
        ``{'status': '0', 'count', 'diff_failed', 'fit_failed', 'warning'}`` or, on a
        global error, ``{'status': '1', 'msg': b'...'}`` -- MontagePy's types.
    """
    reader_gone = []

    def report(outcome) -> None:
        from diffit.cli import debug_lines

        for line in debug_lines(outcome, path or ".", diffdir):
            if reader_gone:
                return
            try:
                try:
                    print(line, flush=True)
                except UnicodeEncodeError:  # a name that was not valid UTF-8 in the table
                    print(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                          flush=True)
            except BrokenPipeError:  # the reader went away: the run goes on, quietly
                reader_gone.append(True)

    if archive:
        return {"status": "1", "msg": b"archive (AWS S3) is not supported by diffit:"
                                      b" copy the images to a local or shared folder"}
    try:
        path, tblfile, template, diffdir, fitfile = (
            os.fsdecode(p) if p is not None else p for p in (path, tblfile, template, diffdir, fitfile))
    except TypeError as error:
        return {"status": "1", "msg": f"bad file name argument: {error}".encode()}
    try:
        result: RunResult = run(
            path or ".", tblfile, template, fitfile, diffdir=diffdir or ".",
            keep_all=bool(keepAll), level_only=bool(levelOnly), no_areas=bool(noAreas),
            jobs=jobs, on_outcome=report if debug else None,
        )
    except (TableError, TemplateError, RunError, Interrupted, OSError) as error:
        return {"status": "1", "msg": str(error).encode()}
    return {"status": "0", "count": result.count, "diff_failed": result.diff_failed,
            "fit_failed": result.fit_failed, "warning": result.warning}


__all__ = ["mDiffFitExec", "run", "RunResult"]
