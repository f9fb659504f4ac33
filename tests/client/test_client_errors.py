"""gRPC status + server message -> the SDK's typed exceptions (no server)."""

import pytest

from internvl_client import (
    InternVLError,
    InvalidInputError,
    ModelNotReadyError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from internvl_client.errors import from_grpc_status


@pytest.mark.parametrize(
    "status, cls, base",
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidInputError, ValueError),  # tritonclient's spelling
        ("INVALID_ARGUMENT", InvalidInputError, ValueError),  # grpc.StatusCode.name
        ("StatusCode.UNAVAILABLE", ServerUnavailableError, ConnectionError),
        ("StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError, TimeoutError),
        ("StatusCode.CANCELLED", RequestCancelledError, InternVLError),
        ("StatusCode.NOT_FOUND", ModelNotReadyError, InternVLError),
        ("StatusCode.INTERNAL", InternVLError, Exception),
    ],
)
def test_status_codes_map_to_typed_errors(status, cls, base):
    exc = from_grpc_status(status, "the server's words", url="host:1")
    assert type(exc) is cls and isinstance(exc, base) and isinstance(exc, InternVLError)
    assert "the server's words" in str(exc)
    assert exc.server_message == "the server's words"
    assert exc.status == status.split(".")[-1]


def test_unavailable_message_says_what_to_check():
    exc = from_grpc_status("UNAVAILABLE", "failed to connect to all addresses", url="10.0.0.1:8001")
    assert "10.0.0.1:8001" in str(exc) and "tritonserver running" in str(exc)


# Stream errors arrive in-band, as text without a status (the messages below are the server's).
@pytest.mark.parametrize(
    "message",
    [
        "in ensemble 'internvl_chat', input 'images[0]': image data is not a supported image (7 bytes; ...)",
        "in ensemble 'internvl_chat', the history and question hold 1 <image> placeholders but no images were sent",
        "in ensemble 'internvl_chat', input 'temperature': temperature must be a finite number >= 0, got -1.0",
        "[request id: r] inference input 'max_tokens' data-type is 'INT64', but model 'internvl_chat' expects 'INT32'",
        "unexpected inference input 'bogus' for model 'internvl_chat'",
        "[request id: r] unexpected shape for input 'max_tokens' for model 'internvl_chat'. Expected [1], got [2]. ",
    ],
)
def test_in_band_request_errors_are_invalid_input(message):
    exc = from_grpc_status(None, message)
    assert type(exc) is InvalidInputError and exc.status == "INVALID_ARGUMENT" and exc.server_message == message


@pytest.mark.parametrize(
    "message",
    [
        "in ensemble 'internvl_chat', llm: RuntimeError: CUDA out of memory",
        "in ensemble 'internvl_chat', preprocess: KeyError: 'x'",
        "in ensemble 'internvl_chat', Stub process 'llm_0_0' is not healthy.",
        "something broke",
    ],
)
def test_in_band_internal_errors_are_server_errors(message):
    assert type(from_grpc_status(None, message)) is InternVLError


def test_in_band_unknown_model():
    assert isinstance(from_grpc_status(None, "Request for unknown model: 'x' is not found"), ModelNotReadyError)


def test_in_band_busy_refusal_is_unavailable_and_so_retried():
    msg = ("in ensemble 'internvl_chat', the server is busy: 1024 requests are already running or queued "
           "(max_pending_requests 1024); retry later")
    err = from_grpc_status(None, msg)
    assert isinstance(err, ServerUnavailableError) and err.status == "UNAVAILABLE"
    assert "max_pending_requests 1024" in str(err)
