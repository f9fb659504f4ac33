"""Helpers of the load-test tier: where the repository is, and running its tools. (loadtest/ itself is on
sys.path from tests/conftest.py: its modules import each other as top-level modules, the way Locust and
`python loadtest/soak.py` load them.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOADTEST = REPO_ROOT / "loadtest"


def run_tool(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run a Python tool (Locust, soak.py) in the repository root to its end, output captured. timeout_s
    guards against a hang only: a tool still running then gets SIGABRT, which makes Python's faulthandler
    print every thread's stack, and the test fails with that (how a Locust run that never exited was
    found waiting in the garbage collector closing a gRPC channel: client.py `_Transport`)."""
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        raise AssertionError(f"{args[:3]} still ran after {timeout_s} s; its threads then:\n{err[-6000:]}\n"
                             f"stdout:\n{out[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
