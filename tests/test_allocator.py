"""The allocator setting keeps freed per-pair arrays in the heap (no fresh page faults)."""
from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from diffit.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_pair():  # a few arrays of a pair: 8 x 1.6 MB allocated, touched, freed
    arrays = [np.ones(200_000) for _ in range(8)]
    return sum(a[0] for a in arrays)
for _ in range(3):  # warm up
    one_pair()
before = faults()
for _ in range(50):
    one_pair()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_arrays_are_reused_without_page_faults() -> None:
    tuned = _faults("tuned")
    assert tuned < 200  # the blocks are recycled: no faults per iteration
    assert _faults("default") > 10 * max(tuned, 20)  # glibc alone maps it afresh each time
