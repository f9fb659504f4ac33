"""Typed errors of the client, and the one place that maps gRPC / Triton failures onto them.

Owns: the exception hierarchy a caller catches, and `from_grpc_status` (status code + message ->
exception). Does not own: retry decisions (client.py) or request validation (generation.py, media.py).

Errors of a request on a gRPC stream arrive in-band (`ModelStreamInferResponse.error_message`) without
a status code. Triton >= 24.08 can end the stream with the real status instead (metadata
`triton_grpc_error: true`), but with Triton 2.51 (the server here) that mode crashed the server
(SIGSEGV) after a few failed requests, so this client does not use it and classifies the message:
- Triton's own request checks ("unexpected inference input", "data-type is", "unexpected shape") and
  messages of the composing models ("in ensemble 'internvl_chat', ...") are the caller's mistakes
  (INVALID_ARG), except
- the models' internal failures, which our adapters prefix with the model and the exception type
  ("in ensemble 'internvl_chat', llm: RuntimeError: ..."), and the Python backend's own failures;
- "Request for unknown model" / "is not ready": the model is not served.
Transport failures (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) always come with their gRPC status.
"""

from __future__ import annotations

import re


class InternVLError(Exception):
    """Base class of every error this package raises about a request.

    `status` is the gRPC status name when there is one (for example "INVALID_ARGUMENT"), and
    `server_message` the server's own words, unmodified.
    """

    def __init__(self, message: str, *, status: str | None = None, server_message: str | None = None):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class InvalidInputError(InternVLError, ValueError):
    """The server rejected the request (Triton INVALID_ARG): fix the request, do not retry it."""


class ServerUnavailableError(InternVLError, ConnectionError):
    """No server answers at the URL, or the connection to it broke (server stopped or died)."""


class RequestTimeoutError(InternVLError, TimeoutError):
    """The request's deadline (`timeout=`) passed before the last response arrived."""


class ModelNotReadyError(InternVLError):
    """The server answers but does not serve the model (not loaded, unknown name, unloading)."""


class RequestCancelledError(InternVLError):
    """The request was cancelled (by the server, or by this client after a stream was abandoned)."""


def _short_status(status: str | None) -> str | None:
    # tritonclient spells codes "StatusCode.INVALID_ARGUMENT"; grpc.StatusCode has .name.
    if status is None:
        return None
    status = str(status)
    return status.split(".", 1)[1] if status.startswith("StatusCode.") else status


def from_grpc_status(status: str | None, message: str, *, url: str = "") -> InternVLError:
    """Map a gRPC status name and the server's message to the matching exception."""
    code = _short_status(status)
    where = f" at {url}" if url else ""
    msg = message or ""
    if code == "INVALID_ARGUMENT":
        return InvalidInputError(f"invalid request: {msg}", status=code, server_message=msg)
    if code == "UNAVAILABLE":
        return ServerUnavailableError(
            f"server unavailable{where}: {msg or 'connection failed'} "
            "(is tritonserver running and its gRPC port reachable?)",
            status=code,
            server_message=msg,
        )
    if code == "DEADLINE_EXCEEDED":
        return RequestTimeoutError(f"request timed out{where}: {msg}", status=code, server_message=msg)
    if code == "CANCELLED":
        return RequestCancelledError(f"request cancelled: {msg}", status=code, server_message=msg)
    if code in ("NOT_FOUND", "FAILED_PRECONDITION") or _looks_like_model_not_ready(msg):
        return ModelNotReadyError(f"model not ready{where}: {msg}", status=code, server_message=msg)
    if code is None and "the server is busy" in msg:
        # An in-band refusal of the llm's bounded queue (max_pending_requests): retry later.
        return ServerUnavailableError(f"server busy{where}: {msg}", status="UNAVAILABLE", server_message=msg)
    if code is None and _looks_like_invalid_input(msg):
        # An in-band stream error (no status): see the module docstring.
        return InvalidInputError(f"invalid request: {msg}", status="INVALID_ARGUMENT", server_message=msg)
    label = code or "error"
    return InternVLError(f"server error ({label}): {msg}", status=code, server_message=msg)


_INTERNAL = re.compile(
    r"(^|, )(preprocess|vision|llm): [A-Za-z_][\w.]*: "  # our adapters' internal failures
    r"|stub process|failed to process the request|python backend|internal",
    re.IGNORECASE,
)
_TRITON_INVALID = re.compile(
    r"unexpected inference input|data-type is|unexpected shape for input|expected \d+ inputs"
    r"|unable to find|does not support|is not a valid",
    re.IGNORECASE,
)


def _looks_like_model_not_ready(msg: str) -> bool:
    low = msg.lower()
    return "unknown model" in low or "is not ready" in low or "unavailable model" in low


def _looks_like_invalid_input(msg: str) -> bool:
    if _INTERNAL.search(msg):
        return False
    return msg.startswith("in ensemble ") or bool(_TRITON_INVALID.search(msg))
