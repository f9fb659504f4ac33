"""Fixtures of the load-test tier: the tiny checkpoint and one real tritonserver per module (free ports
on 127.0.0.1, always stopped)."""

from __future__ import annotations

from pathlib import Path

import pytest

import loadtest_helpers  # noqa: F401  (puts loadtest/ on sys.path)
from internvl_serve.serving.launcher import TritonServer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from internvl_serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny", fmt="bin", seed=0)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> TritonServer:
    log = tmp_path_factory.mktemp("triton") / "server.log"
    # Leaving the with-block (also on errors and interrupts) stops the server and its process group.
    with TritonServer(tiny_checkpoint, log_file=log, exit_timeout_s=5, ready_timeout_s=300) as s:
        yield s
