"""Benchmark diffit against Montage (MontagePy 2.3.0) side by side on the same surveys.

For each survey size it generates a 2MASS-like survey of 512x1024 tiles with diffit's
own generator, warms the file cache, then runs MontagePy's mDiffFitExec and diffit in
fresh processes, interleaved (M D D1 M D D1 ...), checks that every diffit fits.tbl is
identical to Montage's, and prints median wall time, the ratio, pairs per second and
the peak resident memory of each whole process tree (workers included). It also runs
diffit with one worker, for the 1 -> N worker scaling, and in every round measures this
machine's own 1 -> N ceiling at that moment (``bench_core_scaling``: diffit's compiled fit
kernel on N threads, pure compute), so that the scaling can be read against what the
machine gave while it was measured: on a shared VM that ceiling moves from round to round.

Usage::

    python scripts/bench_montage.py --sizes 50 400 --repeats 3 --jobs 2 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core_scaling  # noqa: E402
from proctree import measure  # noqa: E402

# Each timed process also prints how long the call itself took (CALL_SECONDS), so that
# the fixed start-up (interpreter, imports), which no worker count changes, can be told
# apart from the run.
CALL_SECONDS = "call seconds:"
MONTAGE = ("import sys, time; from MontagePy.main import mDiffFitExec as m; t = time.perf_counter(); "
           "r = m(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]); "
           f"print(r); print('{CALL_SECONDS}', time.perf_counter() - t); sys.exit(r['status'] != '0')")
DIFFIT = ("import sys, time, diffit; t = time.perf_counter(); "
          "r = diffit.mDiffFitExec(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], "
          f"jobs=int(sys.argv[6])); print(r); print('{CALL_SECONDS}', time.perf_counter() - t); "
          "sys.exit(r['status'] != '0')")


def make_or_reuse(root: Path, n_tiles: int, tile_shape: tuple[int, int]):
    """Generate the survey once; reuse it on later runs with the same parameters."""
    from diffit.datasets import make_survey

    marker = root / "survey.json"
    wanted = {"n_tiles": n_tiles, "tile_shape": list(tile_shape), "seed": n_tiles}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        n_pairs = sum(1 for line in (root / "diffs.tbl").read_text().splitlines()
                      if line.strip() and line[0] not in "|\\")
        return root / "projected", root / "diffs.tbl", root / "template.hdr", n_pairs
    start = time.perf_counter()
    survey = make_survey(root, n_tiles=n_tiles, tile_shape=tile_shape, seed=n_tiles)
    print(f"  generated {n_tiles} tiles, {survey.n_pairs} pairs in {time.perf_counter() - start:.1f} s",
          flush=True)
    marker.write_text(json.dumps(wanted))
    return survey.projdir, survey.diffs_table, survey.template, survey.n_pairs


def warm(projdir: Path) -> None:
    """Read every file once so both tools start from a warm page cache."""
    for path in projdir.iterdir():
        with open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass


def compile_package() -> None:
    """Write diffit's bytecode once, as ``pip install`` does (an editable install run with
    PYTHONDONTWRITEBYTECODE would otherwise recompile it in every timed process)."""
    import compileall

    import diffit

    compileall.compile_dir(str(Path(diffit.__file__).parent), quiet=1)


def first_pair_table(diffs: Path, target: Path) -> Path:
    """A copy of the overlap table holding only its first pair (to time fixed start-up)."""
    lines = diffs.read_text().splitlines(keepends=True)
    header = [line for line in lines if line[:1] in "|\\"]
    records = [line for line in lines if line.strip() and line[:1] not in "|\\"]
    target.write_text("".join(header + records[:1]))
    return target


def run_tool(code: str, args: list[str]):
    result = measure([sys.executable, "-c", code, *args])
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed: {result.stdout}{result.stderr}")
    return result


def call_seconds(stdout: str) -> float:
    """The duration of the tool's call, as the timed process printed it."""
    for line in stdout.splitlines():
        if line.startswith(CALL_SECONDS):
            return float(line[len(CALL_SECONDS):])
    raise SystemExit(f"benchmark run printed no call time: {stdout}")


def bench_size(workdir: Path, n_tiles: int, repeats: int, jobs: int, tile_shape) -> dict:
    root = workdir / f"survey-{n_tiles}"
    projdir, diffs, template, n_pairs = make_or_reuse(root, n_tiles, tile_shape)
    warm(projdir)
    (root / "mdiffs").mkdir(exist_ok=True)
    montage_out = root / "montage.tbl"
    common = [str(projdir), str(diffs), str(template)]
    times = {"montage": [], f"diffit_j{jobs}": [], "diffit_j1": []}
    peaks = {key: [] for key in times}
    calls = {key: [] for key in times}
    # Untimed warm-up of both (imports, page cache).
    run_tool(MONTAGE, [*common, str(root / "mdiffs"), str(montage_out)])
    run_tool(DIFFIT, [*common, str(root / "ddiffs"), str(root / "diffit.tbl"), str(jobs)])
    reference = montage_out.read_text()
    one = first_pair_table(diffs, root / "first-pair.tbl")
    one_pair = [str(projdir), str(one), str(template), str(root / "ddiffs"), str(root / "one.tbl")]
    startup = []
    ceiling = []
    for _ in range(repeats):
        for key, code, extra in (("montage", MONTAGE, []), (f"diffit_j{jobs}", DIFFIT, [str(jobs)]),
                                 ("diffit_j1", DIFFIT, ["1"])):
            output = root / f"{key}.tbl"
            m = run_tool(code, [*common, str(root / ("mdiffs" if key == "montage" else "ddiffs")),
                                str(output), *extra])
            times[key].append(m.seconds)
            peaks[key].append(m.peak_mb)
            calls[key].append(call_seconds(m.stdout))
            if key != "montage" and output.read_text() != reference:
                raise SystemExit(f"{key}: fits.tbl differs from Montage's on {n_tiles} tiles")
            if key == "montage":
                reference = output.read_text()
        startup.append(run_tool(DIFFIT, [*one_pair, "1"]).seconds)
        ceiling.append(bench_core_scaling.measure(150, threads=jobs))
    median = {key: statistics.median(values) for key, values in times.items()}
    # Each round's own 1 -> N ratio (its two runs are seconds apart, so slow drifts of the
    # machine's speed cancel out), beside the ratio of the medians.
    rounds = [one / many for one, many in zip(times["diffit_j1"], times[f"diffit_j{jobs}"])]
    return {
        "tiles": n_tiles, "tile_shape": list(tile_shape), "pairs": n_pairs,
        "runs": {key: len(values) for key, values in times.items()},
        "median_seconds": median,
        "seconds": times,
        "scaling_per_round": rounds,
        "peak_rss_mb": {key: max(values) for key, values in peaks.items()},
        "pairs_per_second": {key: n_pairs / value for key, value in median.items()},
        "speedup_vs_montage": median["montage"] / median[f"diffit_j{jobs}"],
        "speedup_vs_montage_1_worker": median["montage"] / median["diffit_j1"],
        "scaling_1_to_n_workers": median["diffit_j1"] / median[f"diffit_j{jobs}"],
        # The same without the process start-up: the call alone, timed inside the process.
        "call_seconds": calls,
        "call_scaling_1_to_n_workers": (statistics.median(calls["diffit_j1"])
                                        / statistics.median(calls[f"diffit_j{jobs}"])),
        "diffit_one_pair_seconds": statistics.median(startup),
        "core_ceiling_per_round": ceiling,
        "identical_output": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 400], help="tiles per survey")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tool")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="diffit workers")
    parser.add_argument("--tile", type=int, nargs=2, default=[1024, 512], metavar=("NY", "NX"))
    parser.add_argument("--workdir", default="bench-out", help="where surveys are generated")
    parser.add_argument("--json", help="write results to this JSON file")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    compile_package()
    results = []
    for n_tiles in args.sizes:
        print(f"survey of {n_tiles} tiles:", flush=True)
        results.append(bench_size(workdir, n_tiles, args.repeats, args.jobs, tuple(args.tile)))
    j = f"diffit_j{args.jobs}"
    print()
    print(f"{'tiles':>6} {'pairs':>6} | {'Montage s':>9} {'diffit s':>9} {'ratio':>6} | "
          f"{'pairs/s M':>9} {'pairs/s D':>9} | {'peak MB M':>9} {'peak MB D':>9} | "
          f"{'diffit 1w s':>11} {'1->' + str(args.jobs) + 'w':>6}")
    for r in results:
        s, p, q = r["median_seconds"], r["peak_rss_mb"], r["pairs_per_second"]
        print(f"{r['tiles']:>6} {r['pairs']:>6} | {s['montage']:>9.2f} {s[j]:>9.2f} "
              f"{r['speedup_vs_montage']:>5.1f}x | {q['montage']:>9.0f} {q[j]:>9.0f} | "
              f"{p['montage']:>9.0f} {p[j]:>9.0f} | {s['diffit_j1']:>11.2f} "
              f"{r['scaling_1_to_n_workers']:>5.2f}x")
    print("every diffit fits.tbl was identical to Montage's")
    for r in results:
        rounds = sorted(r["scaling_per_round"])
        print(f"{r['tiles']} tiles: a one-pair run of diffit (start-up: interpreter, imports,"
              f" loading the compiled kernels) takes {r['diffit_one_pair_seconds']:.2f} s;"
              f" 1 -> {args.jobs} workers round by round: "
              + ", ".join(f"{x:.2f}x" for x in rounds)
              + f" (median {statistics.median(rounds):.2f}x); the call alone, without the"
              f" process start-up: {r['call_scaling_1_to_n_workers']:.2f}x")
        ceiling = sorted(r["core_ceiling_per_round"])
        print(f"{r['tiles']} tiles: this machine's own 1 -> {args.jobs} core ceiling in the same rounds"
              f" (compiled fit kernel, pure compute): "
              + ", ".join(f"{x:.2f}x" for x in ceiling)
              + f" (median {statistics.median(ceiling):.2f}x)")
    if args.json:
        meta = {"python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "jobs": args.jobs, "repeats": args.repeats,
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
