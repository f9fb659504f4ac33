"""The gateway app's HTTP layer in-process (FastAPI's TestClient, no Triton needed for these routes): the API
key (flag or environment; every route but /health),
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


def test_api_key_from_flag_or_environment(monkeypatch):
    from internvl_gateway.__main__ import API_KEY_ENV, parse_args

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert parse_args([]).api_key is None
    assert parse_args(["--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "k1"]).api_key == "k1"  # the flag wins
    monkeypatch.setenv(API_KEY_ENV, "")
    assert parse_args([]).api_key is None  # an empty variable is no key


def test_api_key_guards_every_route_but_health():
    app = create_app(GatewayConfig(triton="127.0.0.1:1", api_key="k"))
    with TestClient(app, raise_server_exceptions=False) as c:
        for path in ("/v1/models", "/v1/no-such-route", "/metrics"):
            error = assert_openai_shaped(c.get(path), 401)
            assert error["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "bearer k"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer kk"}).status_code == 401
        assert c.get("/health").status_code == 503  # open (no Triton here: 503, not 401)
