"""The gateway app's HTTP layer in-process (FastAPI's TestClient, no Triton needed for these routes):
FastAPI's own errors (422 request validation, 500 an unexpected exception) come out in OpenAI's shape,
as the gateway's own do. Routes with typed parameters are added here because the gateway's routes parse
their bodies themselves (their bad input is a 400, tested in test_gateway_e2e.py)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from internvl_gateway import GatewayConfig, create_app


@pytest.fixture
def client():
    app = create_app(GatewayConfig(triton="127.0.0.1:1"))

    @app.get("/typed/{n}")
    async def typed(n: int, limit: int = 3) -> dict:
        return {"n": n, "limit": limit}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def assert_openai_shaped(response, status):
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    return response.json()["error"]


def test_validation_error_is_422_openai_shaped(client):
    assert client.get("/typed/4").json() == {"n": 4, "limit": 3}
    error = assert_openai_shaped(client.get("/typed/4?limit=many"), 422)
    assert error["param"] == "limit" and error["type"] == "invalid_request_error"


def test_unexpected_exception_is_500_openai_shaped(client):
    error = assert_openai_shaped(client.get("/boom"), 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]


def test_unknown_route_is_404_openai_shaped(client):
    assert assert_openai_shaped(client.post("/v2/whatever"), 404)["code"] == "not_found"
