"""Fixtures of the gateway tests: gateway processes (`python -m internvl_gateway`, as deployed) on free
ports, always stopped (the tiny checkpoint and the per-module tritonserver are tests/conftest.py's)."""
from __future__ import annotations

import sys

import pytest

from gateway_helpers import GATEWAY_DIR, Gateway

try:  # installed by scripts/setup.sh (pip install -e gateway); else straight from the checkout
    import internvl_gateway  # noqa: F401
except ImportError:
    sys.path.insert(0, str(GATEWAY_DIR))


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    g = Gateway(server.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield g
    g.stop()
