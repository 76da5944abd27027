"""``diffit demo``: generate a small survey and run the main job on it, with no downloads."""
from __future__ import annotations

import os
import time
from pathlib import Path

from diffit.datasets import make_survey
from diffit.runner import RunError, run

#: Most tiles the demo generates (about 0.5 MB each, 50 tiles a second).
MAX_TILES = 5000


def run_demo(directory: str | os.PathLike = "diffit-demo", *, tiles: int = 24, seed: int = 1,
             jobs: int | None = None, progress: bool = True) -> int:
    """Generate a synthetic survey in ``directory`` and fit all its overlaps.

    Parameters
    ----------
    directory : path
        Where the survey (projected images, template.hdr, diffs.tbl) and fits.tbl go.
    tiles : int
        Number of survey tiles.
    seed : int
        Random seed of the generated sky.
    jobs : int, optional
        Worker threads (default: all cores, or one when the pairs are small).
    progress : bool
        Show a progress bar.

    Returns
    -------
    int
        Exit status (0).

    Raises
    ------
    RunError
        Bad arguments, or the folder cannot be written.
    """
    if not 2 <= tiles <= MAX_TILES:
        raise RunError(f"the demo needs 2 to {MAX_TILES} tiles (got {tiles})")
    if seed < 0:
        raise RunError(f"the seed must be zero or positive (got {seed})")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"Can't create demo folder {directory}: {error.strerror or error}") from None
    start = time.perf_counter()
    try:
        survey = make_survey(directory, n_tiles=tiles, tile_shape=(512, 256), seed=seed)
    except OSError as error:
        raise RunError(f"Can't write the demo survey in {directory}: {error.strerror or error}") from None
    made = time.perf_counter() - start
    print(f"generated {len(survey.tiles)} tiles ({survey.tiles[0].nx}x{survey.tiles[0].ny} px) "
          f"with {survey.n_pairs} overlaps in {made:.1f} s: {survey.directory}")
    output = directory / "fits.tbl"
    print("fitting")
    start = time.perf_counter()
    result = run(survey.projdir, survey.diffs_table, survey.template, output,
                 jobs=jobs, progress=progress)
    took = time.perf_counter() - start
    rate = result.count / took if took > 0 else float("inf")
    print(f"fitted {result.succeeded} of {result.count} pairs in {took:.2f} s ({rate:.0f} pairs/s): "
          f"diff_failed={result.diff_failed} fit_failed={result.fit_failed} warning={result.warning}")
    print(f"wrote {output}")
    print("same job with Montage's interface:\n"
          f"  mDiffFitExec -p {survey.projdir} {survey.diffs_table} {survey.template} "
          f"{directory / 'diffs'} {output}")
    return 0
