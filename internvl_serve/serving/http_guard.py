"""The public HTTP port: a small reverse proxy in front of tritonserver's own HTTP front end, which the
launcher binds to 127.0.0.1 on an internal port.

Why: Triton 2.51's HTTP front end parses JSON bodies recursively (a body nested ~200k levels deep, 400 KB,
killed tritonserver with SIGSEGV), converts JSON numbers to the input's type without a range check
(`max_tokens` 2**32 + 1 became 1), and answers malformed or wrongly typed bodies with 500 and no input
name. The guard refuses those requests before they reach Triton, and passes everything else through
unchanged, `generate_stream`'s server-sent events included, one chunk as it comes.

Owns: the body-size bound; the JSON nesting bound (every JSON body: inference and admin APIs); the
inference endpoints' model list (production: the chat models only; other models' GET endpoints, health,
metadata and statistics stay open); the type and representable-range check of the contract's inputs in
`generate`, `generate_stream` and `infer` bodies (400 naming the input). Upstream, each request gets
its own connection to tritonserver, so a client that goes away closes it, as if it had called Triton.
Does not own: the contract's meaning or semantic ranges (serving/contract.py, checked by the models),
the admin APIs' key (the launcher passes it to tritonserver; the guard forwards the header), gRPC (not
proxied).

CLI (the launcher starts it):  python -m internvl_serve.serving.http_guard --port 8000
      --upstream http://127.0.0.1:PORT [--host 127.0.0.1] [--models internvl_chat,internvl_chat_bls]
      [--max-body-bytes N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
from dataclasses import dataclass

from internvl_serve.serving.contract import CHAT_INPUT_SPECS, CHAT_MODELS
from internvl_serve.serving.grpc_checks import BYTES_PREFIX, DTYPE_SIZES, GuardPolicy

DEFAULT_MODELS = CHAT_MODELS
# The chat's largest request: preprocess's max_request_bytes (64 MiB of images and video) as base64 data
# URLs (4/3), plus the question and history.
DEFAULT_MAX_BODY_BYTES = 96 * 1024 * 1024
MAX_JSON_DEPTH = 16  # a chat body is 2 deep; an infer body ~3 + the tensor's rank
INFER_ENDPOINT = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/(?P<kind>infer|generate|generate_stream)$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length"}
INTEGER_RANGES = {"INT8": (-2**7, 2**7 - 1), "INT16": (-2**15, 2**15 - 1), "INT32": (-2**31, 2**31 - 1),
                  "INT64": (-2**63, 2**63 - 1), "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1),
                  "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**64 - 1)}
FLOAT_MAX = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": math.inf, "BF16": 3.3895313892515355e38}


class Refused(Exception):
    """A request the guard answers itself: HTTP `status` with {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GuardConfig:
    upstream: str  # tritonserver's own HTTP front end, e.g. http://127.0.0.1:41234
    models: tuple[str, ...] = DEFAULT_MODELS  # the models whose inference endpoints are reachable
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


# ---- checks (Triton-free, synchronous: unit-tested) -----------------------------------------------------


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(body: bytes, max_depth: int = MAX_JSON_DEPTH):
    """The body as JSON; Refused(400) if it is not JSON or nests deeper than max_depth."""
    try:
        value = json.loads(body)
    except RecursionError:  # CPython's decoder stops at the interpreter's recursion limit
        raise Refused(400, f"the request body nests JSON deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused(400, f"the request body is not valid JSON: {e}") from None
    if json_depth(value) > max_depth:
        raise Refused(400, f"the request body nests JSON deeper than {max_depth} levels")
    return value


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def check_element(name: str, datatype: str, value) -> None:
    """One element of input `name` converts to `datatype` exactly (no wrap-around, no truncation)."""
    if datatype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[datatype]
        if isinstance(value, bool) or not isinstance(value, int):
            raise Refused(400, f"input '{name}' must hold integers ({datatype}), got {_kind(value)}")
        if not low <= value <= high:
            raise Refused(400, f"input '{name}' must be in [{low}, {high}] ({datatype}), got {value}")
    elif datatype in FLOAT_MAX:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refused(400, f"input '{name}' must hold numbers ({datatype}), got {_kind(value)}")
        if not (math.isfinite(value) and abs(value) <= FLOAT_MAX[datatype]):
            raise Refused(400, f"input '{name}' must be a finite {datatype} number, got {value}")
    elif datatype == "BOOL":
        if not isinstance(value, bool):
            raise Refused(400, f"input '{name}' must hold booleans (BOOL), got {_kind(value)}")
    elif datatype == "BYTES":
        if not isinstance(value, str):
            raise Refused(400, f"input '{name}' must hold strings (BYTES), got {_kind(value)}")


def _flatten(data) -> list:
    items, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            items.append(item)
    return items


def check_generate_body(body) -> None:
    """A `generate` / `generate_stream` body: one object whose keys that name a contract input hold that
    input's type (a list where the input takes several elements). An input that takes one value may come
    as a list holding exactly one, nested or not (`"max_tokens": [4]`, or `[[4]]` with TensorRT-LLM's
    leading batch dimension of 1): tritonserver reads those as the one value. Other keys are Triton's
    parameters, which the models refuse themselves."""
    if not isinstance(body, dict):
        raise Refused(400, f"the request body must be a JSON object of inputs, got {_kind(body)}")
    for key, value in body.items():
        spec = CHAT_INPUT_SPECS.get(key)
        if spec is None:
            continue
        many = spec.dims == (-1,)
        if isinstance(value, list):
            if not many:
                items = _flatten(value)
                if len(items) != 1:
                    raise Refused(400, f"input '{key}' takes one value ({spec.datatype}), got a list of "
                                       f"{len(items)}: a batch of one request at most")
                check_element(key, spec.datatype, items[0])
                continue
            for item in value:
                check_element(key, spec.datatype, item)
        else:
            check_element(key, spec.datatype, value)


def check_shape(name: str, tensor: dict, values: list | None, max_bytes: int) -> None:
    """An `infer` input's shape: integers, the element count exact (as the gRPC guard's), its bytes
    within `max_bytes` and equal to its data: the JSON values or `binary_data_size`. A shape whose element
    count wraps past 2**64 passes Triton 2.51's own byte-size check and aborts the Python stub."""
    shape, datatype = tensor.get("shape"), tensor["datatype"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise Refused(400, f"input '{name}' needs 'shape': a list of integers")
    if datatype not in DTYPE_SIZES:
        raise Refused(400, f"input '{name}' has an unknown datatype {datatype!r}")
    if len(shape) > GuardPolicy.max_dims or any(d < 0 for d in shape):
        raise Refused(400, f"input '{name}' has shape {shape}: at most {GuardPolicy.max_dims} dimensions, "
                           f"none negative")
    count = math.prod(shape)  # Python ints: exact, whatever the dims
    size = DTYPE_SIZES[datatype]
    need = count * (size if size is not None else BYTES_PREFIX)  # BYTES: at least the length prefixes
    if need > max_bytes:
        raise Refused(400, f"input '{name}' of shape {shape} ({datatype}) needs {need} bytes, more than the "
                           f"{max_bytes} a request may carry")
    parameters = tensor.get("parameters")
    binary = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if values is not None:  # the JSON data, flattened
        if len(values) != count:
            raise Refused(400, f"input '{name}' has {len(values)} values; its shape {shape} holds {count}")
    elif binary is not None and (not isinstance(binary, int) or (size is not None and binary != need)
                                 or (size is None and binary < need)):
        raise Refused(400, f"input '{name}': binary_data_size {binary!r} does not fit shape {shape} ({datatype})")


def check_infer_body(body, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """An `infer` body (its JSON part): each input's shape fits its data (check_shape) and its data
    matches its declared datatype (and the contract's datatype for the contract's inputs)."""
    if not isinstance(body, dict):
        raise Refused(400, f"the request body must be a JSON object, got {_kind(body)}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise Refused(400, "the request body needs 'inputs': a list of {name, shape, datatype, data}")
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise Refused(400, "each element of 'inputs' must be an object with a 'name'")
        name, datatype = tensor["name"], tensor.get("datatype")
        if not isinstance(datatype, str):
            raise Refused(400, f"input '{name}' needs a 'datatype' string")
        spec = CHAT_INPUT_SPECS.get(name)
        if spec is not None and datatype != spec.datatype:
            raise Refused(400, f"input '{name}' must be {spec.datatype}, got {datatype}")
        values = _flatten(tensor["data"]) if "data" in tensor else None
        check_shape(name, tensor, values, max_bytes)
        for item in values or ():
            check_element(name, datatype, item)


def check_request(config: GuardConfig, method: str, path: str, headers: dict, body: bytes) -> None:
    """Every check of one request; raises Refused. headers: lower-case names."""
    match = INFER_ENDPOINT.match(path)
    if match and match["model"] not in config.models:
        raise Refused(404, f"model '{match['model']}' is not served over HTTP here "
                           f"(inference is open for: {', '.join(config.models)})")
    if not body:
        return
    json_part = body
    header_length = headers.get("inference-header-content-length")
    if header_length is not None:  # binary tensor data follows a JSON header
        if not header_length.isdigit() or int(header_length) > len(body):
            raise Refused(400, "bad Inference-Header-Content-Length")
        json_part = body[:int(header_length)]
    value = parse_json(json_part)
    if match and method == "POST":
        if match["kind"] == "infer":
            check_infer_body(value, config.max_body_bytes)
        else:
            check_generate_body(value)


# ---- the proxy ----------------------------------------------------------------------------------------


class Upstream:
    """One HTTP/1.1 exchange with tritonserver on its own connection (`Connection: close`), framed by h11
    (uvicorn's own HTTP parser): the answer's head, then its body as it arrives."""

    def __init__(self, url: str):
        address = url.split("://", 1)[-1].rstrip("/")
        self.host, _, port = address.rpartition(":")
        self.port = int(port)

    async def open(self, method: str, target: str, headers: list, body: bytes):
        import h11

        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            connection = h11.Connection(our_role=h11.CLIENT)
            head = [*headers, ("host", f"{self.host}:{self.port}"), ("content-length", str(len(body))),
                    ("connection", "close")]
            writer.write(connection.send(h11.Request(method=method, target=target, headers=head)))
            if body:
                writer.write(connection.send(h11.Data(data=body)))
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
            while True:
                event = await self._next(connection, reader)
                if isinstance(event, h11.Response):
                    break
                if not isinstance(event, h11.InformationalResponse):
                    raise ConnectionError(f"tritonserver answered {type(event).__name__}")
        except BaseException:
            writer.close()
            raise

        async def body_chunks():
            try:
                while True:
                    event = await self._next(connection, reader)
                    if isinstance(event, h11.Data):
                        yield bytes(event.data)
                    else:  # EndOfMessage, or the server closed mid-answer: the answer ends here
                        return
            except (ConnectionError, h11.ProtocolError):
                return
            finally:
                writer.close()

        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        return event.status_code, headers, body_chunks()

    @staticmethod
    async def _next(connection, reader):
        import h11

        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(1 << 16)
            connection.receive_data(data)  # b"": end of stream


def make_app(config: GuardConfig):
    """The ASGI app: checks, then the request as it came to `config.upstream`, the answer streamed back."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    upstream = Upstream(config.upstream)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise Refused(413, f"the request body is larger than {config.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise Refused(413, f"the request body is larger than {config.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def proxy(request: Request):
        try:
            body = await read_body(request)
            headers = {k.lower(): v for k, v in request.headers.items()}
            if len(body) > 1 << 20:  # parse big bodies off the event loop: other streams keep flowing
                await asyncio.get_running_loop().run_in_executor(
                    None, check_request, config, request.method, request.url.path, headers, body)
            else:
                check_request(config, request.method, request.url.path, headers, body)
        except Refused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        forward = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            status, answer_headers, chunks = await upstream.open(request.method, target, forward, body)
        except (OSError, ConnectionError):
            return JSONResponse({"error": "the inference server is not reachable"}, status_code=502)
        answer_headers = {k: v for k, v in answer_headers if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(chunks, status_code=status, headers=answer_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m internvl_serve.serving.http_guard", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="tritonserver's HTTP front end, e.g. http://127.0.0.1:41234")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="models whose inference endpoints are open (comma-separated)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    return p.parse_args(argv)


def main(argv=None) -> None:
    import uvicorn

    args = parse_args(argv)
    config = GuardConfig(upstream=args.upstream, models=tuple(m for m in args.models.split(",") if m),
                         max_body_bytes=args.max_body_bytes)
    uvicorn.run(make_app(config), host=args.host, port=args.port, http="h11", lifespan="off",
                access_log=False, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
