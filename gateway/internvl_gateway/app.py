"""The FastAPI app: /v1/chat/completions (JSON or server-sent events), /v1/models, /health.

Owns: HTTP, fetching http(s) images (only when the config allows), and running each request over
gRPC with the client SDK's AsyncClient (one channel for the app, one stream per request). A streamed
request waits for Triton's first response before answering, so a refused request (a bad image, a
prompt over the context window) still gets a real 400; an error after that is sent as a last
`data: {"error": ...}` event. A client that disconnects cancels its gRPC call. Does not own: the
translation (translate.py) or the contract (internvl_client).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from internvl_client import AsyncClient
from internvl_client.errors import InternVLError

from . import translate
from .config import GatewayConfig
from .translate import CompletionRequest, GatewayError, RemoteImage, bad_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _fetch(image: RemoteImage, config: GatewayConfig) -> bytes:
    """GET one http(s) image, bounded in size and time (blocking; run in a thread)."""
    host = urllib.parse.urlsplit(image.url).hostname or ""
    if config.remote_image_hosts and host not in config.remote_image_hosts:
        raise bad_request(f"{image.param}: host {host!r} is not in this gateway's allowed image hosts", image.param)
    request = urllib.request.Request(image.url, headers={"User-Agent": "internvl-gateway"})
    try:
        with urllib.request.urlopen(request, timeout=config.remote_image_timeout_s) as response:
            data = response.read(config.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"{image.param}: could not fetch the image: {e}", image.param) from None
    if len(data) > config.max_image_bytes:
        raise bad_request(f"{image.param}: the image is larger than {config.max_image_bytes} bytes", image.param)
    return data


async def resolve_images(request: CompletionRequest, config: GatewayConfig) -> list[bytes]:
    images = request.conversation.images
    fetched = await asyncio.gather(*(asyncio.to_thread(_fetch, i, config) for i in images
                                     if isinstance(i, RemoteImage)))
    it = iter(fetched)
    return [next(it) if isinstance(i, RemoteImage) else i for i in images]


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(config: GatewayConfig) -> FastAPI:
    client = AsyncClient(config.triton, timeout=config.timeout_s, retries=config.retries)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.close()

    app = FastAPI(title="InternVL OpenAI-compatible gateway", lifespan=lifespan)
    app.state.config = config

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health() -> JSONResponse:
        if await client.is_ready():
            return JSONResponse({"status": "ok", "triton": config.triton})
        raise GatewayError(503, f"Triton at {config.triton} does not serve internvl_chat (or is unreachable)",
                           type="server_error", code="service_unavailable")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "internvl-serve"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(config.model_name)]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict:
        if model not in config.served_names:
            raise GatewayError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
        return model_card(model)

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        try:
            body = await http_request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        parsed = translate.parse_chat_completion(body, config)
        chat_request = parsed.to_chat_request(await resolve_images(parsed, config))
        stream = client.stream_request(chat_request, as_chunks=True)
        chunks = stream.__aiter__()
        try:
            first = await chunks.__anext__()  # a refused request fails here, before any byte is sent
        except StopAsyncIteration:
            first = None
        except InternVLError as e:
            await stream.aclose()
            raise translate.from_client_error(e) from None
        except BaseException:
            await stream.aclose()
            raise
        if parsed.stream:
            return StreamingResponse(_events(parsed, stream, first), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await _answer(parsed, stream)

    return app


async def _answer(parsed: CompletionRequest, stream) -> JSONResponse:
    """stream=false: the contract's single response (the SDK still reads it as a stream)."""
    try:
        async for _ in stream:
            pass
    except InternVLError as e:
        raise translate.from_client_error(e) from None
    finally:
        await stream.aclose()
    r = stream.response  # set once the stream has ended
    return JSONResponse(translate.completion(translate.new_completion_id(), parsed.model, r.text, r.finish_reason,
                                             r.num_input_tokens, r.num_output_tokens))


async def _events(parsed: CompletionRequest, stream, first) -> AsyncIterator[str]:
    completion_id, created, model = translate.new_completion_id(), int(time.time()), parsed.model
    reason = counts = None
    try:
        yield _sse(translate.chunk(completion_id, model, created, delta={"role": "assistant", "content": ""}))
        pending = [first] if first is not None else []
        while True:
            if pending:
                item = pending.pop()
            else:
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if item.text:
                yield _sse(translate.chunk(completion_id, model, created, delta={"content": item.text}))
            if item.finish_reason:
                reason = item.finish_reason
            if item.num_input_tokens is not None:
                counts = (item.num_input_tokens, item.num_output_tokens)
        yield _sse(translate.chunk(completion_id, model, created, reason=reason or "stop"))
        if parsed.include_usage:
            yield _sse(translate.chunk(completion_id, model, created, usage_=translate.usage(*(counts or (0, 0)))))
        yield "data: [DONE]\n\n"
    except InternVLError as e:  # after the 200: the error is the stream's last event
        yield _sse(translate.from_client_error(e).body())
    finally:
        await stream.aclose()
