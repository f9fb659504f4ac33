"""The FastAPI app: /v1/chat/completions and /v1/completions (JSON or server-sent events), /v1/models,
/health.

Owns: HTTP (OpenAI-shaped errors on every route, 404 / 405 / 422 / 500 included; the optional API key
on /v1/*), fetching http(s) images (only when the config allows), and running each request over
gRPC with the client SDK's AsyncClient (one channel for the app, one stream per request). A streamed
request waits for Triton's first response before answering, so a refused request (a bad image, a
prompt over the context window) still gets a real 400; an error after that is sent as a last
`data: {"error": ...}` event. A client that disconnects cancels its gRPC call. Does not own: the
translation (translate.py), the answer objects (answers.py) or the contract (internvl_client).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from internvl_client import AsyncClient
from internvl_client.errors import InternVLError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import answers, translate
from .config import GatewayConfig
from .translate import CompletionRequest, GatewayError, RemoteImage, bad_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPEN_PATHS = ("/health",)  # never behind the API key
log = logging.getLogger("internvl_gateway")


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


class APIKeyMiddleware:
    """Every route but OPEN_PATHS needs `Authorization: Bearer <key>`; else 401 in OpenAI's shape. Plain
    ASGI (not BaseHTTPMiddleware), so streamed answers and client disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._key):
                error = GatewayError(401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'",
                                     code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own 404 / 405 (an unknown route, a wrong method) in OpenAI's shape."""
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"{request.method} {request.url.path}: no such route on this gateway",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse(GatewayError(error.status_code, message, code=codes.get(error.status_code)).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = (error.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(GatewayError(422, f"{param or 'request'}: {first.get('msg', 'invalid')}",
                                         param=param).body(), status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(GatewayError(500, f"internal error in the gateway: {type(error).__name__}",
                                         type="server_error").body(), status_code=500)

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

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

    async def run(http_request: Request, parse) -> Any:
        try:
            body = await http_request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        parsed = parse(body, config)
        if parsed.ignored:
            log.warning("%s: ignored unknown request field(s): %s", http_request.url.path, ", ".join(parsed.ignored))
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

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        return await run(http_request, translate.parse_chat_completion)

    @app.post("/v1/completions")
    async def completions(http_request: Request):
        return await run(http_request, translate.parse_completion)

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
    return JSONResponse(answers.completion(parsed.endpoint, answers.new_id(parsed.endpoint), parsed.model, r.text,
                                           r.finish_reason, r.num_input_tokens, r.num_output_tokens))


async def _events(parsed: CompletionRequest, stream, first) -> AsyncIterator[str]:
    """The SSE stream: (chat: a role chunk,) text chunks, a finish-reason chunk, the usage-only chunk if
    asked (include_usage), [DONE]. continuous_usage_stats: every chunk also carries the usage so far."""
    endpoint = parsed.endpoint
    completion_id, created, model = answers.new_id(endpoint), int(time.time()), parsed.model
    counts = (first.num_input_tokens, 0) if first is not None and first.num_input_tokens is not None else (0, 0)
    reason = None

    def event(**fields) -> str:
        usage = answers.usage(*counts) if parsed.continuous_usage else None
        return _sse(answers.chunk(endpoint, completion_id, model, created, usage_=usage, **fields))

    try:
        if endpoint == translate.CHAT:
            yield event(role=True)
        pending = [first] if first is not None else []
        while True:
            if pending:
                item = pending.pop()
            else:
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if item.num_input_tokens is not None:
                counts = (item.num_input_tokens, item.num_output_tokens)
            if item.finish_reason:
                reason = item.finish_reason
            if item.text:
                yield event(text=item.text)
        yield event(reason=reason or "stop")
        if parsed.include_usage:
            yield _sse(answers.chunk(endpoint, completion_id, model, created, usage_=answers.usage(*counts),
                                     choices=False))
        yield "data: [DONE]\n\n"
    except InternVLError as e:  # after the 200: the error is the stream's last event
        yield _sse(translate.from_client_error(e).body())
    finally:
        await stream.aclose()
