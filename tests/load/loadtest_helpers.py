"""Helpers of the load-test tier: where loadtest/ is (put on sys.path: its modules import each other as
top-level modules, the way Locust and `python loadtest/soak.py` load them) and running its tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOADTEST = REPO_ROOT / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))


def run_tool(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run a Python tool (Locust, soak.py) in the repository root to its end, output captured."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)
