#!/usr/bin/env python
"""Benchmark diffit on huge overlap tables: wall time, pairs/s and peak memory.

Generates one synthetic survey of small tiles (:func:`diffit.datasets.make_survey`) big
enough for the largest table, writes overlap tables of the first N pairs for each size,
and runs ``diffit.run`` on each in a fresh Python process while sampling the RSS (and
PSS) of that process and all its descendants (the joblib workers) every 50 ms from
/proc. Memory should stay flat as the table grows: diffit streams the table and writes
rows as they complete.

Example::

    python scripts/bench_huge_table.py --pairs 100000 --jobs 2 --json out.json

Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_huge_table")

#: Pairs per tile of make_survey's layout for square tiles (measured: 2.82-2.91).
PAIRS_PER_TILE = 2.8
sys.path.insert(0, str(Path(__file__).resolve().parent))
from proctree import process_tree, rss_bytes  # noqa: E402

# Runs in the fresh child process: one diffit.run, a JSON line on stdout.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
args = json.loads(sys.argv[1])
from diffit.runner import run
t1 = time.perf_counter()
extra = {"backend": args["backend"]} if args.get("backend") else {}
r = run(args["projdir"], args["diffs"], args["template"], args["output"], jobs=args["jobs"], **extra)
t2 = time.perf_counter()
print(json.dumps({"count": r.count, "succeeded": r.succeeded, "diff_failed": r.diff_failed,
                  "fit_failed": r.fit_failed, "import_s": t1 - t0, "run_s": t2 - t1}))
"""


# ------------------------------------------------------------------------------------
# process-tree memory sampling
# ------------------------------------------------------------------------------------

def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between their users; 0 if unknown)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as stream:
            for line in stream:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


@dataclass
class MemoryPeaks:
    """Peaks over the samples of a process tree."""

    rss_tree: int = 0
    pss_tree: int = 0
    rss_main: int = 0
    processes: int = 0
    samples: int = 0

    def sample(self, root: int) -> None:
        tree = process_tree(root)
        rss = [rss_bytes(pid) for pid in tree]
        self.rss_tree = max(self.rss_tree, sum(rss))
        self.pss_tree = max(self.pss_tree, sum(pss_bytes(pid) for pid in tree))
        self.rss_main = max(self.rss_main, rss[0])
        self.processes = max(self.processes, sum(1 for value in rss if value))
        self.samples += 1


def run_child(args: dict, interval: float) -> tuple[dict, float, MemoryPeaks]:
    """Run one diffit.run in a fresh interpreter, sampling its process tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    peaks = MemoryPeaks()
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while child.poll() is None:
        peaks.sample(child.pid)
        time.sleep(interval)
    wall = time.perf_counter() - start
    out, err = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"diffit run failed (exit {child.returncode}):\n{err}")
    return json.loads(out.strip().splitlines()[-1]), wall, peaks


# ------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------

def make_inputs(workdir: Path, sizes: list[int], *, tile: int, overlap: float, seed: int,
                max_tiles: int) -> dict:
    """Generate the survey and one overlap table per size; describe them."""
    from diffit.datasets import find_overlaps, make_survey, write_overlap_table

    largest = max(sizes)
    n_tiles = min(max_tiles, math.ceil(largest / PAIRS_PER_TILE * 1.02) + 16)
    log.info("generating %d tiles of %dx%d in %s", n_tiles, tile, tile, workdir)
    start = time.perf_counter()
    survey = make_survey(workdir / "survey", n_tiles=n_tiles, tile_shape=(tile, tile),
                         overlap=overlap, seed=seed)
    generate_s = time.perf_counter() - start
    pairs = find_overlaps(survey.tiles)
    tables = {}
    for size in sizes:
        rows = [pairs[k % len(pairs)] for k in range(size)]  # cycles only if too few
        tables[str(size)] = str(write_overlap_table(workdir / f"diffs_{size}.tbl", survey.tiles, rows))
    return {
        "directory": str(survey.directory), "projdir": str(survey.projdir),
        "template": str(survey.template), "tiles": n_tiles, "tile_shape": [tile, tile],
        "overlap": overlap, "seed": seed, "distinct_pairs": len(pairs),
        "repeated": largest > len(pairs), "generate_s": round(generate_s, 2), "tables": tables,
    }


# ------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="largest table (pairs)")
    parser.add_argument("--sizes", default="10000,30000",
                        help="smaller tables to run too, comma-separated (default: 10000,30000)")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="diffit workers (threads unless --backend processes)")
    parser.add_argument("--backend", choices=["threads", "processes"],
                        help="diffit.run backend (default: run()'s default)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--workdir", help="where to generate the survey (default: a temporary"
                        " folder, removed afterwards); an existing survey there is reused")
    parser.add_argument("--tile", type=int, default=40, help="tile size in pixels (square)")
    parser.add_argument("--overlap", type=float, default=0.25, help="fractional tile overlap")
    parser.add_argument("--max-tiles", type=int, default=50_000,
                        help="generate at most this many tiles (pairs repeat beyond)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-fits", action="store_true",
                        help="keep the fits.tbl of each size in --workdir (e.g. for diffit plot)")
    parser.add_argument("--interval", type=float, default=0.05, help="memory sampling period (s)")
    return parser


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; optionally write JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | {args.pairs})
    if sizes[0] < 1:
        raise SystemExit("sizes must be positive")
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="diffit-bench-") if temporary else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        stamp = workdir / "inputs.json"
        wanted = {"sizes": sizes, "tile": args.tile, "overlap": args.overlap, "seed": args.seed,
                  "max_tiles": args.max_tiles}
        inputs = None
        if stamp.exists():
            saved = json.loads(stamp.read_text())
            if saved.get("wanted") == wanted:
                inputs = saved["inputs"]
                log.info("reusing the survey in %s", workdir)
        if inputs is None:
            inputs = make_inputs(workdir, sizes, tile=args.tile, overlap=args.overlap,
                                 seed=args.seed, max_tiles=args.max_tiles)
            stamp.write_text(json.dumps({"wanted": wanted, "inputs": inputs}))
        note = (f"pairs repeat: the survey has {inputs['distinct_pairs']} distinct pairs"
                if inputs["repeated"] else "all pairs distinct")
        log.info("survey: %d tiles %dx%d, %d distinct pairs (%s)", inputs["tiles"], args.tile,
                 args.tile, inputs["distinct_pairs"], note)
        results = []
        for size in sizes:
            log.info("running %d pairs with %d jobs ...", size, args.jobs)
            output = workdir / f"fits_{size}.tbl"
            child_args = {"projdir": inputs["projdir"], "diffs": inputs["tables"][str(size)],
                          "template": inputs["template"], "output": str(output),
                          "jobs": args.jobs, "backend": args.backend}
            load_before = os.getloadavg()[0]
            counts, wall, peaks = run_child(child_args, args.interval)
            with open(output, "rb") as stream:
                rows = sum(1 for _ in stream) - 1
            if counts["count"] != size or rows != counts["succeeded"]:
                raise SystemExit(f"bad output for {size} pairs: {counts}, {rows} rows")
            result = {"pairs": size, "wall_s": round(wall, 2), "run_s": round(counts["run_s"], 2),
                      "startup_s": round(wall - counts["run_s"], 2),
                      "pairs_per_s": round(size / counts["run_s"], 1),
                      "pairs_per_s_wall": round(size / wall, 1),
                      "peak_rss_tree_mb": _mb(peaks.rss_tree), "peak_pss_tree_mb": _mb(peaks.pss_tree),
                      "peak_rss_main_mb": _mb(peaks.rss_main), "max_processes": peaks.processes,
                      "samples": peaks.samples, "succeeded": counts["succeeded"],
                      "diff_failed": counts["diff_failed"], "fit_failed": counts["fit_failed"],
                      # other load on the machine skews the timings (not the memory)
                      "loadavg_1min_before": round(load_before, 2),
                      "loadavg_1min_after": round(os.getloadavg()[0], 2)}
            log.info("%d pairs: %.1f s, %.0f pairs/s, peak RSS tree %.1f MB", size, wall,
                     result["pairs_per_s"], result["peak_rss_tree_mb"])
            results.append(result)
            if not args.keep_fits:
                output.unlink()
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"diffit huge-table benchmark: backend={args.backend or 'default'}, jobs={args.jobs},"
          f" {inputs['tiles']} tiles of "
          f"{args.tile}x{args.tile}, {note}, {os.cpu_count()} CPUs")
    header = (f"{'pairs':>8} {'wall s':>8} {'run s':>8} {'pairs/s':>8} {'RSS tree MB':>12}"
              f" {'PSS tree MB':>12} {'RSS main MB':>12} {'procs':>6} {'load':>5}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['pairs']:8d} {r['wall_s']:8.1f} {r['run_s']:8.1f} {r['pairs_per_s']:8.0f}"
              f" {r['peak_rss_tree_mb']:12.1f} {r['peak_pss_tree_mb']:12.1f}"
              f" {r['peak_rss_main_mb']:12.1f} {r['max_processes']:6d}"
              f" {r['loadavg_1min_after']:5.1f}")
    first, last = results[0], results[-1]
    growth = last["peak_rss_tree_mb"] / first["peak_rss_tree_mb"] if first["peak_rss_tree_mb"] else 0
    print(f"peak RSS of the tree at {last['pairs']} pairs is {growth:.2f}x that at "
          f"{first['pairs']} pairs ({last['pairs'] / first['pairs']:.0f}x the pairs)")
    if args.json:
        report = {
            "benchmark": "bench_huge_table", "jobs": args.jobs,
            "backend": args.backend or "default", "note": note,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "survey": {k: v for k, v in inputs.items() if k not in ("tables", "directory",
                                                                      "projdir", "template")},
            "results": results, "rss_growth_largest_vs_smallest": round(growth, 3),
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
