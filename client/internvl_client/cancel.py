"""Cancelling a running generation on the server, and only one's own.

Stopping a gRPC stream makes Triton cancel the `internvl_chat` request, but Triton 2.51's ensemble
passes that only to steps not yet started: a request already generating in the decoupled `llm` step
would run on to max_tokens. So every request carries `cancel_key`, a new random secret, and after
stopping a stream early the SDK sends the llm model one small request, `cancel_request_id = <the
request's id>` with that `cancel_key`; the server aborts the generation at its next step and frees its
KV cache (it answers finish_reason "cancelled", or "not_found" when no running request has that id and
key: finished, or never sent with this key). Another client using the same request id cannot cancel it
without the key. Best effort: it never raises, and waits at most CANCEL_TIMEOUT_S. Clients in other
languages do the same (docs/contract.md, Cancellation).
"""
from __future__ import annotations

import queue
import secrets

import numpy as np
import tritonclient.grpc as grpcclient

LLM_MODEL = "llm"
CANCEL_INPUT = "cancel_request_id"
CANCEL_KEY_INPUT = "cancel_key"
CANCEL_TIMEOUT_S = 3.0


def new_cancel_key() -> str:
    """A new unguessable key for one request (32 hex digits)."""
    return secrets.token_hex(16)


def _bytes_input(name: str, value: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
    return tensor


def cancel_key_input(key: str) -> grpcclient.InferInput:
    """The `cancel_key` input that goes with the request itself."""
    return _bytes_input(CANCEL_KEY_INPUT, key)


def cancel_inputs(request_id: str, key: str) -> list[grpcclient.InferInput]:
    return [_bytes_input(CANCEL_INPUT, request_id), _bytes_input(CANCEL_KEY_INPUT, key)]


def send_cancel(tc: grpcclient.InferenceServerClient, request_id: str, key: str, *,
                timeout_s: float = CANCEL_TIMEOUT_S) -> str | None:
    """Ask the server, over `tc` (a client with no stream open), to abort `request_id` sent with `key`;
    its finish_reason ("cancelled" / "not_found"), or None when the server could not be asked (gone, or
    no answer in time)."""
    answers: queue.SimpleQueue = queue.SimpleQueue()
    try:
        tc.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=timeout_s)
        try:
            tc.async_stream_infer(LLM_MODEL, cancel_inputs(request_id, key), request_id=f"cancel-{request_id}")
            result, error = answers.get(timeout=timeout_s)
        finally:
            tc.stop_stream(cancel_requests=False)
        if error is not None:
            return None
        reason = result.as_numpy("finish_reason")
        return reason[0].decode() if reason is not None and len(reason) else None
    except Exception:  # noqa: BLE001 - best effort: the caller is already leaving
        return None


async def send_cancel_async(client, request_id: str, key: str, *,
                            timeout_s: float = CANCEL_TIMEOUT_S) -> str | None:
    """The same over an open tritonclient aio client (its channel is shared with the streams)."""
    import asyncio

    async def one():
        yield {"model_name": LLM_MODEL, "inputs": cancel_inputs(request_id, key), "request_id": f"cancel-{request_id}"}

    try:
        async def first():
            async for result, error in client.stream_infer(one(), stream_timeout=timeout_s):
                if error is not None:
                    return None
                reason = result.as_numpy("finish_reason")
                return reason[0].decode() if reason is not None and len(reason) else None
            return None
        return await asyncio.wait_for(first(), timeout_s)
    except Exception:  # noqa: BLE001 - best effort
        return None
