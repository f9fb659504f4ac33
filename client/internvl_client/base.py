"""What the sync `Client` and the asyncio `AsyncClient` share, the transport aside.

Owns: the defaults (server address, request deadline, stream headers), the settings both clients are
built with (`ClientBase`: url, timeout, model_name, retries, retry_backoff, ssl, verbose) and what a
stream knows of its request (`StreamBase`: the request id, the finished response, deltas or Chunks).
Does not own: the transports, pools and cancellation (client.py, aio.py, cancel.py), the contract
(request.py).
"""

from __future__ import annotations

from typing import Any

from .request import MODEL_NAME, ChatResponse, Chunk

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TIMEOUT = 600.0
# No `triton_grpc_error: true` header: with Triton 2.51 it crashed the server (errors.py says more).
STREAM_HEADERS: dict[str, str] = {}


class ClientBase:
    """The settings of a client of the `internvl_chat` ensemble on a Triton server's gRPC port.

    `timeout` is the deadline of one request in seconds (None: no deadline). `retries` is how often a
    request that failed to connect is tried again; a request is retried only while no response has
    arrived, so a retry never duplicates text the caller has already seen. `model_name`: the model to
    ask (`internvl_chat_bls` serves the same contract). `ssl`, `verbose`: tritonclient's.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        model_name: str = MODEL_NAME,
        retries: int = 2,
        retry_backoff: float = 0.25,
        ssl: bool = False,
        verbose: bool = False,
    ):
        self.url = url
        self.timeout = timeout
        self.model_name = model_name
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._ssl = ssl
        self._verbose = verbose
        self._closed = False
        self._init_transport()

    def _init_transport(self) -> None:
        """Set up the transport's own state (each client's)."""


class StreamBase:
    """One streamed answer: `chunks` yields the request's Chunks; `box` holds the ResponseAssembler of
    the attempt that produced the answer. Iterating (the subclass's) yields text deltas, or Chunks
    when `as_chunks`."""

    def __init__(self, chunks: Any, box: list, *, as_chunks: bool = False):
        self._chunks = chunks
        self._box = box
        self._as_chunks = as_chunks
        self._done = False

    def _item(self, chunk: Chunk) -> Any:
        """What iterating yields for this chunk; None: nothing (a Chunk without text, for deltas)."""
        if self._as_chunks:
            return chunk
        return chunk.text or None

    @property
    def request_id(self) -> str | None:
        """The id sent with the request (Triton passes it to the models; it appears in server logs)."""
        return self._box[0].request_id if self._box else None

    @property
    def response(self) -> ChatResponse | None:
        """The finished answer; None until the stream has ended normally."""
        return self._box[0].response() if self._done and self._box else None
