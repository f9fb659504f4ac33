"""A gRPC proxy in front of tritonserver's gRPC port that refuses what would crash or expose the server.

Owns: serving `inference.GRPCInferenceService` on the public address and forwarding every method to
tritonserver's gRPC on an internal address (grpc.aio, generic handlers: requests are parsed only where
they are checked, responses pass through as raw bytes); applying grpc_checks.py to each inference
request (unary and every message of a stream; a refused stream message gets an in-band error response,
as Triton's own, and the stream stays open); forwarding metadata, deadlines and cancellation (a client
that cancels or vanishes cancels the upstream call); and, for `internvl_chat` requests still in flight
when their client vanishes, sending the llm step's cancel side channel itself (Triton 2.51's ensemble
does not pass the cancellation on). Does not own: the checks (grpc_checks.py), the server's start
(triton_server.py), or the cancel side channel's semantics (llm.py, client/internvl_client/cancel.py).

CLI:  python -m internvl_serve.serving.grpc_guard --listen 0.0.0.0:8001 --upstream 127.0.0.1:18001
      [--max-request-bytes N] [--expose-all-models] [--admin-key KEY]
API:  with GrpcGuard("127.0.0.1:0", upstream) as guard: guard.url ...
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import threading
from collections import deque
from dataclasses import replace

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from internvl_serve.serving.contract import CANCEL_INPUT, CANCEL_KEY, ENSEMBLE, LLM
from internvl_serve.serving.grpc_checks import (GuardPolicy, Refused, check_admin, check_infer_request,
                                                drop_batch_of_one)
from internvl_serve.serving.triton_server import ADMIN_GRPC_HEADER, ADMIN_KEY_ENV

SERVICE = "inference.GRPCInferenceService"
_METHODS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
_DROPPED_HEADERS = ("user-agent", "content-type", "te")  # set by the upstream channel itself
_END = object()
_QUEUE = 64  # responses (and in-band refusals) waiting for a slow client, per stream

# The cancel side channel (llm.py `cancel`, client/internvl_client/cancel.py): a request id and the secret
# key the request was sent with. The guard gives each internvl_chat request that carries no key a fresh
# one, so that it can cancel it for a client that vanishes.
CANCEL_ID_INPUT = CANCEL_INPUT
CANCEL_KEY_INPUT = CANCEL_KEY.name
CANCEL_TIMEOUT_S = 3.0


def cancel_request(request_id: str, key: str) -> pb.ModelInferRequest:
    """The llm side-channel request that aborts `request_id`, sent with `key`."""
    request = pb.ModelInferRequest(model_name=LLM, id=f"cancel-{request_id}")
    for name, value in ((CANCEL_ID_INPUT, request_id), (CANCEL_KEY_INPUT, key)):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        data = value.encode()
        request.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
    return request


def cancellable(request: pb.ModelInferRequest, raw: bytes) -> tuple[bytes, str, str | None]:
    """The bytes to forward, the request id and the cancel key the guard can cancel the request with:
    a request sent without an id gets a fresh one (the side channel names requests by id), one without
    a key a fresh secret (None: a key the guard cannot read; the llm refuses it)."""
    changed = False
    if not request.id:
        request.id = f"guard-{secrets.token_hex(12)}"
        changed = True
    names = [t.name for t in request.inputs]
    if CANCEL_KEY_INPUT in names:
        i = names.index(CANCEL_KEY_INPUT)
        values = ([bytes(request.raw_input_contents[i][4:])] if request.raw_input_contents
                  else list(request.inputs[i].contents.bytes_contents))
        key = values[0].decode(errors="replace") if values else None
    else:
        key = secrets.token_urlsafe(24)
        request.inputs.add(name=CANCEL_KEY_INPUT, datatype="BYTES", shape=[1])
        if request.raw_input_contents:
            request.raw_input_contents.append(len(key).to_bytes(4, "little") + key.encode())
        else:
            request.inputs[-1].contents.bytes_contents.append(key.encode())
        changed = True
    return (request.SerializeToString() if changed else raw), request.id, key


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code)


def _is_final(response: pb.ModelStreamInferResponse) -> bool:
    param = response.infer_response.parameters.get("triton_final_response")
    return param is not None and param.bool_param


class GrpcGuard:
    """The proxy; start() serves it on a thread of its own (an asyncio loop), stop() ends it."""

    def __init__(self, listen: str, upstream: str, policy: GuardPolicy = GuardPolicy()):
        self.listen = listen
        self.upstream = upstream
        self.policy = policy
        self.port: int | None = None
        self.cancels_sent: deque[str] = deque(maxlen=1000)  # the latest ids cancelled for vanished clients
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._channel = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    # ---- life cycle ------------------------------------------------------------------------------------

    def start(self) -> "GrpcGuard":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="grpc-guard", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "GrpcGuard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _start(self) -> None:
        limit = self.policy.max_request_bytes + (1 << 20)  # the message may carry the whole request
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)]
        self._channel = grpc.aio.insecure_channel(self.upstream, options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", -1)])
        self._server = grpc.aio.server(options=options)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self.port = self._server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"grpc guard: cannot listen on {self.listen}")
        await self._server.start()

    async def _stop(self, grace_s: float) -> None:
        await self._server.stop(grace_s)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.close()

    async def serve_forever(self) -> None:
        await self._start()
        await self._server.wait_for_termination()

    # ---- handlers --------------------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for m in _METHODS:
            path = f"/{SERVICE}/{m.name}"
            if m.client_streaming and m.server_streaming:
                upstream = self._channel.stream_stream(path)
                handlers[m.name] = grpc.stream_stream_rpc_method_handler(self._stream_handler(m.name, upstream))
            else:
                upstream = self._channel.unary_unary(path)
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(self._unary_handler(m.name, upstream))
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _unary_handler(self, method: str, upstream):
        policy = self.policy

        async def handle(raw: bytes, context):
            metadata = _forwarded(context)
            try:
                check_admin(method, metadata, policy, ADMIN_GRPC_HEADER)
                if method == "ModelInfer":
                    raw = admit(_parse(raw), raw, policy)
            except Refused as r:
                await context.abort(_status(r.code), r.message)
            try:
                return await upstream(raw, metadata=metadata, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return handle

    def _stream_handler(self, method: str, upstream):
        async def handle(requests, context):
            call = upstream(metadata=_forwarded(context), timeout=context.time_remaining())
            out: asyncio.Queue = asyncio.Queue(maxsize=_QUEUE)  # a client that stops reading pauses both pumps
            inflight: dict[str, list] = {}  # internvl_chat request id -> [cancel key, requests without final]
            writer = asyncio.create_task(self._pump_requests(requests, call, out, inflight))
            reader = asyncio.create_task(self._pump_responses(call, out, inflight))
            finished = False
            try:
                while (item := await out.get()) is not _END:
                    if isinstance(item, grpc.aio.AioRpcError):
                        await context.abort(item.code(), item.details() or "")
                    yield item
                finished = True
            finally:
                writer.cancel()
                reader.cancel()
                call.cancel()
                if not finished and inflight:  # the client left with generations running
                    self._spawn(self._cancel_all(dict(inflight)))

        return handle

    async def _pump_requests(self, requests, call, out: asyncio.Queue, inflight: dict) -> None:
        try:
            await self._forward_requests(requests, call, out, inflight)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the upstream call ended: _pump_responses reports how

    async def _forward_requests(self, requests, call, out: asyncio.Queue, inflight: dict) -> None:
        policy = self.policy
        async for raw in requests:
            request = None
            try:
                request = _parse(raw)
                raw = admit(request, raw, policy)
            except Refused as r:
                await out.put(_error_response(r.message, request))
                continue
            if request.model_name == ENSEMBLE:
                raw, request_id, key = cancellable(request, raw)
                inflight.setdefault(request_id, [key, 0])[1] += 1
            await call.write(raw)
        await call.done_writing()

    async def _pump_responses(self, call, out: asyncio.Queue, inflight: dict) -> None:
        try:
            async for raw in call:
                if inflight:  # parse only while a vanished client would leave a generation behind
                    response = pb.ModelStreamInferResponse.FromString(raw)
                    if response.error_message or _is_final(response):
                        entry = inflight.get(response.infer_response.id)
                        if entry is not None:
                            entry[1] -= 1
                            if entry[1] <= 0:
                                del inflight[response.infer_response.id]
                await out.put(raw)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                await out.put(e)
        await out.put(_END)

    # ---- cancelling for vanished clients ----------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_all(self, inflight: dict) -> None:
        await asyncio.gather(*(self.send_cancel(rid, key) for rid, (key, _) in inflight.items()),
                             return_exceptions=True)

    async def send_cancel(self, request_id: str, key: str | None) -> str | None:
        """Ask the llm step to abort `request_id`; its finish_reason, or None (best effort, never raises)."""
        call = self._channel.stream_stream(f"/{SERVICE}/ModelStreamInfer")(timeout=CANCEL_TIMEOUT_S)
        self.cancels_sent.append(request_id)
        try:
            await call.write(cancel_request(request_id, key).SerializeToString())
            await call.done_writing()
            async for raw in call:
                response = pb.ModelStreamInferResponse.FromString(raw)
                return None if response.error_message else _finish_reason(response)
        except Exception:  # noqa: BLE001 - best effort: the client is gone already
            return None
        finally:
            call.cancel()
        return None


def admit(request: pb.ModelInferRequest, raw: bytes, policy: GuardPolicy) -> bytes:
    """The bytes to forward for a request the checks let through (Refused otherwise): the chat models'
    inputs without a leading batch dimension of 1 (grpc_checks.batch_of_one), else `raw` itself."""
    check_infer_request(request, policy)
    return request.SerializeToString() if drop_batch_of_one(request) else raw


def _parse(raw: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(raw)
    except DecodeError as e:
        raise Refused("INVALID_ARGUMENT", f"unable to parse the inference request: {e}") from None


def _forwarded(context) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ())
                 if not k.startswith((":", "grpc-")) and k not in _DROPPED_HEADERS)


def _error_response(message: str, request: pb.ModelInferRequest | None) -> bytes:
    """An in-band stream error, as Triton sends one: error_message, and the request's model and id."""
    response = pb.ModelStreamInferResponse(error_message=message)
    if request is not None:
        response.infer_response.model_name = request.model_name
        response.infer_response.id = request.id
    return response.SerializeToString()


def _finish_reason(response: pb.ModelStreamInferResponse) -> str | None:
    outputs = response.infer_response.outputs
    for i, tensor in enumerate(outputs):
        if tensor.name == "finish_reason" and i < len(response.infer_response.raw_output_contents):
            return bytes(response.infer_response.raw_output_contents[i][4:]).decode(errors="replace")
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="0.0.0.0:8001", help="the public address")
    p.add_argument("--upstream", default="127.0.0.1:18001", help="tritonserver's gRPC address")
    p.add_argument("--max-request-bytes", type=int, default=GuardPolicy().max_request_bytes)
    p.add_argument("--expose-all-models", action="store_true", help="serve every model (tests, debugging)")
    p.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_ENV) or None,
                   help=f"opens the admin methods (default: ${ADMIN_KEY_ENV}; none: they are refused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    policy = replace(GuardPolicy(), max_request_bytes=args.max_request_bytes,
                     expose_all_models=args.expose_all_models, admin_key=args.admin_key)
    guard = GrpcGuard(args.listen, args.upstream, policy)

    async def run():
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await guard._start()
        print(f"grpc guard: {guard.url} -> {guard.upstream}", flush=True)
        await stopping.wait()
        await guard._stop(1.0)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
