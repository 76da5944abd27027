"""The benchmark scripts (``scripts/``) still run end to end, on tiny surveys.

They are the measurement of speed and memory, so they must not rot; nothing here
asserts a time (timings belong to the benchmarks themselves, not to tests)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_montage_side_by_side(tmp_path: Path) -> None:
    pytest.importorskip("MontagePy.main")
    out = run_script("bench_montage.py", "--sizes", "6", "--repeats", "2", "--jobs", "2",
                     "--tile", "96", "64", "--workdir", str(tmp_path / "work"),
                     "--json", str(tmp_path / "bench.json"))
    assert "every diffit fits.tbl was identical to Montage's" in out
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert result["identical_output"] is True
    assert result["runs"] == {"montage": 2, "diffit_j2": 2, "diffit_j1": 2}
    assert len(result["scaling_per_round"]) == len(result["core_ceiling_per_round"]) == 2
    assert all(value > 0 for value in result["peak_rss_mb"].values())
    for key, calls in result["call_seconds"].items():  # the call is part of its process's time
        assert len(calls) == 2
        assert all(0 < call < whole for call, whole in zip(calls, result["seconds"][key]))
    assert result["call_scaling_1_to_n_workers"] > 0


def test_bench_huge_table_memory(tmp_path: Path) -> None:
    out = run_script("bench_huge_table.py", "--pairs", "60", "--sizes", "30", "--jobs", "2",
                     "--json", str(tmp_path / "huge.json"))
    assert "peak RSS of the tree at 60 pairs" in out
    results = json.loads((tmp_path / "huge.json").read_text())["results"]
    assert [r["pairs"] for r in results] == [30, 60]
    assert all(r["succeeded"] == r["pairs"] and r["peak_rss_tree_mb"] > 0 for r in results)


def test_bench_core_scaling() -> None:
    out = run_script("bench_core_scaling.py", "--repeats", "1", "--fits", "5")
    assert out.startswith("two-core throughput over one core")


def test_process_tree_walks_descendants_through_threads() -> None:
    """The sampler's cheap walk (children files) finds what a full /proc scan finds:
    a child started from a worker thread and that child's own child."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import proctree
    finally:
        sys.path.remove(str(SCRIPTS))
    code = ("import subprocess, threading, time\n"
            "def spawn():\n"
            "    subprocess.Popen(['sh', '-c', 'sleep 30 & wait'])\n"
            "t = threading.Thread(target=spawn); t.start(); t.join()\n"
            "time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    scanned: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while len(proctree._scan_tree(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        scanned = sorted(proctree._scan_tree(parent.pid))
        assert len(scanned) == 3  # python, sh, sleep
        assert sorted(proctree.process_tree(parent.pid)) == scanned
        assert proctree.tree_rss(parent.pid) > 0
    finally:
        for pid in scanned[::-1] or [parent.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait()
