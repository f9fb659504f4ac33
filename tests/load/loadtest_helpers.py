"""Helpers of the load-test tier: where the repository is, and running its tools. (loadtest/ itself is on
sys.path from tests/conftest.py: its modules import each other as top-level modules, the way Locust and
`python loadtest/soak.py` load them.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOADTEST = REPO_ROOT / "loadtest"


def run_tool(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run a Python tool (Locust, soak.py) in the repository root to its end, output captured."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)
