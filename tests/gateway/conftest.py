"""Fixtures of the gateway tests: the tiny checkpoint, a real tritonserver per module, and gateway
processes (`python -m internvl_gateway`, as deployed) on free ports, always stopped."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway_helpers import GATEWAY_DIR, Gateway

try:  # installed by scripts/setup.sh (pip install -e gateway); else straight from the checkout
    import internvl_gateway  # noqa: F401
except ImportError:
    sys.path.insert(0, str(GATEWAY_DIR))


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


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    g = Gateway(server.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield g
    g.stop()
