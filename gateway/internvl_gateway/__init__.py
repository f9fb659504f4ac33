"""OpenAI-compatible gateway for the internvl_chat Triton ensemble (docs/gateway.md).

`python -m internvl_gateway --triton 127.0.0.1:8001 --port 9000`, then any OpenAI client with
base_url http://HOST:9000/v1. translate.py maps requests and answers (no web framework, no Triton);
app.py is the FastAPI app over the client SDK's AsyncClient (gRPC)."""

from .config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]


def create_app(config: GatewayConfig):  # imported lazily: translate.py is usable without FastAPI
    from .app import create_app as _create_app

    return _create_app(config)
