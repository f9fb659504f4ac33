"""Fixtures of the metrics tests: the tiny checkpoint and a real tritonserver per module (free ports,
always stopped), as in tests/e2e."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from internvl_serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny", fmt="bin", seed=0)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    from internvl_serve.serving.launcher import TritonServer

    log = tmp_path_factory.mktemp("triton") / "server.log"
    with TritonServer(tiny_checkpoint, log_file=log, exit_timeout_s=5, ready_timeout_s=300) as s:
        yield s
