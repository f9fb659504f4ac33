"""Synchronous SDK: `Client.chat / generate / stream` over Triton's gRPC streaming API.

Owns: the transport of one request: a gRPC bidirectional stream per request (`start_stream` +
`async_stream_infer` of tritonclient.grpc), the end of a request (Triton's final-response flag),
cancellation when a caller leaves a stream early, error mapping and the safe retry.
Does not own: the settings and defaults both clients share, and what a stream knows of its request
(base.py), the contract's tensors (request.py), card-word mapping (generation.py), conversations
(session.py).

Why one stream per request: an error on a shared stream carries no request id, and cancelling a
shared stream would cancel every request on it. tritonclient's `InferenceServerClient` holds one
stream at a time, so the Client keeps a small pool of them (gRPC shares the TCP connection between
channels with the same target and options); concurrent calls from several threads are fine.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .base import DEFAULT_TIMEOUT, DEFAULT_URL, STREAM_HEADERS, ClientBase, StreamBase  # noqa: F401 (re-exported)
from .cancel import cancel_key_input, new_cancel_key, send_cancel
from .errors import InternVLError, RequestTimeoutError, ServerUnavailableError, from_grpc_status
from .card_call import takes_card_arguments
from .request import ChatRequest, ChatResponse, Chunk, ResponseAssembler, to_infer_inputs

_POLL_S = 0.5  # how often a waiting reader checks that tritonclient's reader thread is still alive


class _Transport(grpcclient.InferenceServerClient):
    """tritonclient's client, closed once. tritonclient's `__del__` closes its gRPC channel again after
    an explicit `close()`, and under gevent (Locust) each close also lowers gRPC's count of open
    channels (grpc/_channel.py `_close`): a second close lowers it for a channel still open elsewhere,
    and one run by the garbage collector at the process's exit was seen to wait there forever (a CI
    run's Locust never exited; tests/load/killed_gevent_users.py)."""

    _closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            super().close()


class ChatStream(StreamBase):
    """Iterator over one streamed answer.

    Iterating yields text deltas (str), or `Chunk`s for `Client.stream_chunks`. After the last one,
    `response` holds the `ChatResponse` (whole text, finish_reason, token counts). Leaving early
    (`break`, `close()`, an exception, leaving a `with` block) cancels the request on the server.
    """

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                raise
            item = self._item(chunk)
            if item is not None:
                return item

    def close(self) -> None:
        """Stop reading; a request still running on the server is cancelled."""
        self._chunks.close()

    cancel = close

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a dropped stream must not keep the server generating
        try:
            self._chunks.close()
        except Exception:
            pass


class Client(ClientBase):
    """Client of the `internvl_chat` ensemble on a Triton server's gRPC port.

    >>> client = Client("127.0.0.1:8001")
    >>> client.chat("Describe the image.", images=["cat.png"], generation_config=dict(max_new_tokens=64))

    Arguments (url, timeout, model_name, retries, retry_backoff, ssl, verbose): ClientBase (base.py).
    """

    def _init_transport(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[grpcclient.InferenceServerClient] = []

    # ---- public API -------------------------------------------------------------------------
    # chat / generate / stream / stream_chunks take the card's arguments (card_call.py):
    # (question, images=None, video=None, history=None, num_patches_list=None, generation_config=None,
    #  num_segments=8); each is written here for the ChatRequest those arguments build.
    @takes_card_arguments
    def chat(self, request: ChatRequest) -> str:
        """The answer to `question` (the card's `model.chat`, minus the tokenizer and pixel values)."""
        return self.generate_request(request).text

    @takes_card_arguments
    def generate(self, request: ChatRequest) -> ChatResponse:
        """Like chat, returning a ChatResponse (text, finish_reason, num_input/output_tokens)."""
        return self.generate_request(request)

    @takes_card_arguments
    def stream(self, request: ChatRequest) -> ChatStream:
        """Text deltas as they arrive; `.response` holds the metadata once the stream has ended."""
        return self.stream_request(request)

    @takes_card_arguments
    def stream_chunks(self, request: ChatRequest) -> ChatStream:
        """Like stream, yielding `Chunk`s (text delta, and on the last: finish_reason, token counts)."""
        return self.stream_request(request, as_chunks=True)

    def generate_request(self, request: ChatRequest) -> ChatResponse:
        """The finished answer to a prepared ChatRequest."""
        stream = self.stream_request(request, as_chunks=True)
        with stream:
            for _ in stream:
                pass
        response = stream.response
        assert response is not None  # the loop ended normally
        return response

    def stream_request(self, request: ChatRequest, *, as_chunks: bool = False) -> ChatStream:
        """Stream a prepared ChatRequest (the contract's terms, no card-word mapping)."""
        request_id = uuid.uuid4().hex
        box = [ResponseAssembler(request_id)]
        return ChatStream(self._chunks(request, box, request_id, new_cancel_key()), box, as_chunks=as_chunks)

    def is_ready(self) -> bool:
        """True when the server is up and the model is loaded."""
        tc = self._acquire()
        try:
            return bool(tc.is_model_ready(self.model_name, client_timeout=5.0))
        except InferenceServerException:
            return False
        finally:
            self._release(tc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for tc in idle:
            tc.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transport --------------------------------------------------------------------------
    def _acquire(self) -> grpcclient.InferenceServerClient:
        with self._lock:
            if self._closed:
                raise InternVLError("this Client is closed")
            if self._idle:
                return self._idle.pop()
        return _Transport(self.url, verbose=self._verbose, ssl=self._ssl)

    def _release(self, tc: grpcclient.InferenceServerClient) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < 8:
                self._idle.append(tc)
                return
        tc.close()

    def _chunks(self, request: ChatRequest, box: list, request_id: str, cancel_key: str) -> Iterator[Chunk]:
        """Generator of the Chunks of one request; its `finally` is the cancellation path (cancel.py)."""
        inputs = [*to_infer_inputs(request), cancel_key_input(cancel_key)]
        attempt = 0
        while True:
            assembler = ResponseAssembler(request_id)
            box[:] = [assembler]
            responses: queue.SimpleQueue = queue.SimpleQueue()
            tc = self._acquire()
            finished = failed = False
            try:
                tc.start_stream(
                    callback=lambda result, error: responses.put((result, error)),
                    stream_timeout=self.timeout,
                    headers=STREAM_HEADERS,
                )
                try:
                    tc.async_stream_infer(
                        self.model_name, inputs, request_id=request_id, enable_empty_final_response=True
                    )
                except InferenceServerException:
                    pass  # the stream already failed: its error is in the queue
                while not finished:
                    result, error = self._next_response(responses, tc)
                    if error is not None:
                        exc = from_grpc_status(error.status(), error.message() or "", url=self.url)
                        # the server ended the request, or cannot be reached; a deadline only ends our wait
                        failed = not isinstance(exc, RequestTimeoutError)
                        raise exc
                    chunk = assembler.add(result.get_response())
                    finished = chunk.final
                    yield chunk
                return
            except ServerUnavailableError:
                if assembler.received == 0 and attempt < self.retries:
                    attempt += 1
                    time.sleep(self.retry_backoff * attempt)  # back-off before reconnecting
                    continue
                raise
            finally:
                self._end_stream(tc, finished, failed, request_id, cancel_key)

    def _end_stream(self, tc: grpcclient.InferenceServerClient, finished: bool, failed: bool, request_id: str,
                    cancel_key: str) -> None:
        """Finished: half-close, the server has nothing left to send. Otherwise (break, close, exception,
        KeyboardInterrupt, a killed greenlet) cancel the RPC: Triton cancels the request; and when the
        request did not fail, abort it in the running llm step too (cancel.py). The transport goes back
        to the pool only when all of that completed: one interrupted on the way (a second interrupt, or
        a greenlet killed while it waited here, as Locust does at its run-time limit) is closed here,
        never left to the garbage collector with a stream open: gRPC under gevent can hang for good
        closing such a channel from a collection at the process's exit."""
        ended = False
        try:
            tc.stop_stream(cancel_requests=not finished)
            if not finished and not failed:
                send_cancel(tc, request_id, cancel_key)
            ended = True
        finally:
            if ended:
                self._release(tc)
            else:
                try:
                    tc.stop_stream(cancel_requests=True)
                finally:
                    tc.close()

    @staticmethod
    def _next_response(responses: queue.SimpleQueue, tc: grpcclient.InferenceServerClient) -> tuple:
        while True:
            try:
                return responses.get(timeout=_POLL_S)
            except queue.Empty:
                # tritonclient's reader thread ends silently when the server closes the stream
                # without an error; without this check a reader would wait forever.
                handler = getattr(getattr(tc, "_stream", None), "_handler", None)
                if handler is not None and not handler.is_alive() and responses.empty():
                    raise InternVLError("the server closed the stream before the final response")
