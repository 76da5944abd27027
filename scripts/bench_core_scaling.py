"""How much faster this machine does twice the compute on two cores: the ceiling for
diffit's 1 -> 2 worker scaling.

Runs diffit's plane-fit kernel (compiled, GIL released, data in cache: no Python, no I/O)
on one thread, then the same amount per thread on two threads at once, and prints the
throughput ratio. On a machine whose single busy core clocks higher than two busy ones
(turbo), or whose virtual CPUs share physical cores, this is well below 2, and no
program can scale better.

Usage::

    python scripts/bench_core_scaling.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np

from diffit.fitplane import N_ITERATIONS, _fit_kernel


def _pixels(n_rows: int = 100, n_cols: int = 340):
    rng = np.random.default_rng(1)
    ys = np.repeat(np.arange(n_rows) - 20.5, n_cols)
    xs = np.tile(np.arange(n_cols) - 10.5, n_rows)
    zs = 0.01 * xs - 0.02 * ys + rng.normal(0.0, 1.0, xs.size)
    return xs, ys, zs


def _fits(pixels, count: int) -> None:
    for _ in range(count):
        _fit_kernel(*pixels, False, N_ITERATIONS, False)


def measure(fits_per_thread: int, threads: int = 2) -> float:
    """Throughput of ``threads`` threads over one thread, for the same work per thread."""
    pixels = _pixels()
    start = time.perf_counter()
    _fits(pixels, fits_per_thread)
    one = time.perf_counter() - start
    workers = [threading.Thread(target=_fits, args=(pixels, fits_per_thread))
               for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    many = time.perf_counter() - start
    return threads * one / many


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fits", type=int, default=300, help="fits per thread per repeat")
    args = parser.parse_args(argv)
    _fits(_pixels(), 1)  # load the compiled kernel
    ratios = [measure(args.fits) for _ in range(args.repeats)]
    print("two-core throughput over one core, pure compute: "
          + ", ".join(f"{r:.2f}x" for r in ratios)
          + f" (median {statistics.median(ratios):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
