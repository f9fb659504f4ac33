"""asyncio SDK: `AsyncClient.chat / generate / stream` on tritonclient.grpc.aio.

Owns: the asyncio transport: one `stream_infer` call (one gRPC stream) per request, all over one
channel, so many requests run concurrently from one event loop. Leaving a stream early (break +
`aclose()`, task cancellation, `asyncio.timeout`) cancels the gRPC call, and Triton the request.
Does not own: the settings shared with `Client` and the streams' request id and response (base.py),
the contract (request.py), card words (generation.py).

End of a request: the request iterator ends right after the one request (the client half-closes),
and Triton ends the stream once the request's last response is written, so the stream's end is
the request's end. (tritonclient.grpc.aio cannot ask for the empty final response: its parameter
name is reserved.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import tritonclient.grpc.aio as aiogrpcclient

from .base import STREAM_HEADERS, ClientBase, StreamBase
from .cancel import CANCEL_TIMEOUT_S, cancel_key_input, new_cancel_key, send_cancel_async
from .errors import InternVLError, RequestTimeoutError, ServerUnavailableError, from_grpc_status
from .card_call import takes_card_arguments
from .request import ChatRequest, ChatResponse, Chunk, ResponseAssembler, to_infer_inputs


class AsyncChatStream(StreamBase):
    """Async iterator over one streamed answer (text deltas, or Chunks from `stream_chunks`).

    `response` holds the ChatResponse after the end. Use `async with client.stream(...) as s:` or call
    `aclose()` when leaving early, so the request is cancelled at once rather than at garbage collection.
    """

    def __aiter__(self) -> "AsyncChatStream":
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._done = True
                raise
            item = self._item(chunk)
            if item is not None:
                return item

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncClient(ClientBase):
    """asyncio client of the `internvl_chat` ensemble; same arguments and semantics as `Client`.

    >>> async with AsyncClient("127.0.0.1:8001") as client:
    ...     answer = await client.chat("Hello", generation_config=dict(max_new_tokens=32))
    ...     async for delta in client.stream("Tell me a story"):
    ...         print(delta, end="")
    """

    def _init_transport(self) -> None:
        self._tc: aiogrpcclient.InferenceServerClient | None = None
        self._cancels: set[asyncio.Task] = set()  # cancellation requests in flight (cancel.py)

    def _client(self) -> aiogrpcclient.InferenceServerClient:
        # Created on first use, inside the running event loop that will use the channel.
        if self._closed:
            raise InternVLError("this AsyncClient is closed")
        if self._tc is None:
            self._tc = aiogrpcclient.InferenceServerClient(self.url, verbose=self._verbose, ssl=self._ssl)
        return self._tc

    # The card's arguments, as Client's methods take them (card_call.py).
    @takes_card_arguments
    async def chat(self, request: ChatRequest) -> str:
        return (await self.generate_request(request)).text

    @takes_card_arguments
    async def generate(self, request: ChatRequest) -> ChatResponse:
        return await self.generate_request(request)

    @takes_card_arguments
    def stream(self, request: ChatRequest) -> AsyncChatStream:
        """`async for delta in client.stream(...)`: text deltas as they arrive."""
        return self.stream_request(request)

    @takes_card_arguments
    def stream_chunks(self, request: ChatRequest) -> AsyncChatStream:
        return self.stream_request(request, as_chunks=True)

    async def generate_request(self, request: ChatRequest) -> ChatResponse:
        """The finished answer to a prepared ChatRequest."""
        stream = self.stream_request(request, as_chunks=True)
        async with stream:
            async for _ in stream:
                pass
        response = stream.response
        assert response is not None
        return response

    def stream_request(self, request: ChatRequest, *, as_chunks: bool = False) -> AsyncChatStream:
        request_id = uuid.uuid4().hex
        box = [ResponseAssembler(request_id)]
        return AsyncChatStream(self._chunks(request, box, request_id, new_cancel_key()), box, as_chunks=as_chunks)

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client().is_model_ready(self.model_name, client_timeout=5.0))
        except Exception:
            return False

    async def close(self) -> None:
        self._closed = True
        if self._cancels:  # let the cancellation requests reach the server first
            await asyncio.wait(list(self._cancels), timeout=CANCEL_TIMEOUT_S)
        if self._tc is not None:
            await self._tc.close()
            self._tc = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _chunks(self, request: ChatRequest, box: list, request_id: str,
                      cancel_key: str) -> AsyncIterator[Chunk]:
        inputs = [*to_infer_inputs(request), cancel_key_input(cancel_key)]
        attempt = 0
        while True:
            assembler = ResponseAssembler(request_id)
            box[:] = [assembler]

            async def one_request() -> AsyncIterator[dict]:
                yield {"model_name": self.model_name, "inputs": inputs, "request_id": request_id}

            responses = self._client().stream_infer(
                one_request(), stream_timeout=self.timeout, headers=STREAM_HEADERS
            )
            ended = failed = False
            try:
                try:
                    async for result, error in responses:
                        if error is not None:
                            exc = from_grpc_status(error.status(), error.message() or "", url=self.url)
                            # the server ended the request, or cannot be reached; a deadline only ends our wait
                            failed = not isinstance(exc, RequestTimeoutError)
                            raise exc
                        chunk = assembler.add(result.get_response())
                        # No final flag here (module docstring): the answer's last response is the one
                        # with a finish_reason; the stream ends right after it.
                        chunk.final = chunk.final or bool(chunk.finish_reason)
                        yield chunk
                except grpc.aio.AioRpcError as rpc_error:
                    exc = from_grpc_status(rpc_error.code().name, rpc_error.details() or "", url=self.url)
                    failed = not isinstance(exc, RequestTimeoutError)
                    raise exc from None
                ended = True
                tail = assembler.add_end()
                if tail.text:
                    yield tail
                return
            except ServerUnavailableError:
                if assembler.received == 0 and attempt < self.retries:
                    attempt += 1
                    await asyncio.sleep(self.retry_backoff * attempt)  # back-off before reconnecting
                    continue
                raise
            finally:
                if not ended:
                    responses.cancel()  # cancels the gRPC call: Triton cancels the request
                    if not failed:  # left early: abort it in the running llm step too (cancel.py)
                        try:
                            task = asyncio.get_running_loop().create_task(
                                send_cancel_async(self._client(), request_id, cancel_key))
                            self._cancels.add(task)
                            task.add_done_callback(self._cancels.discard)
                        except (RuntimeError, InternVLError):  # no loop any more, or the client is closed
                            pass
