"""Python API: a drop-in for ``MontagePy.main.mDiffFitExec`` and the modern ``run``."""
from __future__ import annotations



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
    debug: int = 0,
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
    debug : int, optional
        Print one line per pair (what was done and why a pair failed).
    jobs : int, optional
        Worker processes (default: all cores). Not in MontagePy.

    Returns
    -------
    dict
        ``{'status': '0', 'count', 'diff_failed', 'fit_failed', 'warning'}`` or, on a
        global error, ``{'status': '1', 'msg': b'...'}`` -- MontagePy's types.
    """
    def report(outcome) -> None:
        from diffit.cli import debug_lines

        for line in debug_lines(outcome, path or ".", diffdir):
            print(line, flush=True)

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
