"""Run a command and measure its wall time and the peak resident memory of its whole
process tree (the process and every descendant, e.g. joblib workers), from /proc.

Used by the benchmark scripts in this folder; Linux only.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measurement:
    """Wall time (s) and peak tree RSS (MB) of one command."""

    seconds: float
    peak_mb: float
    returncode: int
    stdout: str
    stderr: str


def _all_children() -> dict[int, list[int]]:
    """ppid -> child pids of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stream:
                stat = stream.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _children_of(pid: int) -> list[int] | None:
    """Child pids of one process from its threads' ``children`` files (None where the
    kernel has no such files, CONFIG_PROC_CHILDREN)."""
    children: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children  # gone
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", "rb") as stream:
                children.extend(int(child) for child in stream.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{thread}"):
                continue  # the thread ended
            return None
        except OSError:
            continue
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now.

    Walks the tree down from ``root`` through /proc/<pid>/task/<tid>/children, which
    reads a handful of small files per sample; where the kernel lacks those files it
    scans every process in /proc instead (about ten times the work, which would come
    out of the measured run's CPU time on a busy machine).
    """
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        children = _children_of(pid)
        if children is None:
            return _scan_tree(root)
        todo.extend(children)
    return tree


def _scan_tree(root: int) -> list[int]:
    children = _all_children()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as stream:
            return int(stream.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    return sum(rss_bytes(member) for member in process_tree(pid))


def measure(command: list[str], interval: float = 0.02, env: dict | None = None,
            cwd: str | None = None) -> Measurement:
    """Run ``command``, sampling the process tree's RSS every ``interval`` seconds."""
    peak = 0
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=cwd)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(process.pid))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return Measurement(seconds, peak / 2**20, process.returncode, stdout, stderr)
