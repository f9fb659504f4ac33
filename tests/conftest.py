"""Fixtures shared by every test tier: the tiny checkpoint (the real V1-1 layout, random weights; made
once per test session by the project's own tool, internvl_serve.tiny, and only read by the tests)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# loadtest/ (its modules import each other as top-level modules): servermetrics.py reads the server's
# /metrics for every tier
LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from internvl_serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny", fmt="bin", seed=0)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """A real tritonserver (the nvidia-pytriton wheel's) serving model_repository/ on the tiny checkpoint,
    on free ports of 127.0.0.1, started once per test module; leaving the with-block (also on errors and
    interrupts) stops it and its process group. Folders that need another server define their own."""
    from internvl_serve.serving.launcher import TritonServer

    log = tmp_path_factory.mktemp("triton") / "server.log"
    with TritonServer(tiny_checkpoint, log_file=log, exit_timeout_s=5, ready_timeout_s=300) as s:
        yield s
