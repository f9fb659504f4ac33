"""Running a probe in a fresh interpreter, for the tests of the malloc setting and of the reused host buffers
(serving/heap.py, internvl_serve/hostbuf.py): the setting is process-wide and page faults are counted per
process, so each probe is a script of its own, run with this interpreter, printing what it counted.

PREPROCESS_HEAP: a probe's first lines for the preprocess stub's heap (as its adapter's initialize() sets
it) and `faults()`, the process's minor page faults so far."""
from __future__ import annotations

import subprocess
import sys

PREPROCESS_HEAP = """
import resource
from internvl_serve.serving.heap import cache_image_blocks, mmap_large_allocations
assert mmap_large_allocations() and cache_image_blocks() >= 1  # as the preprocess stub runs
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
"""


def run_probe(code: str, *args: str) -> str:
    """`code` run as `python -c code *args` in a fresh interpreter; its stdout (it must exit 0)."""
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout
