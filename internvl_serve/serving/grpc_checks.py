"""The gRPC guard's checks of an inference request, as pure functions over Triton's protobuf messages.

Owns: what the guard (grpc_guard.py) refuses before a request reaches tritonserver: inputs whose shape
does not fit their data (element counts computed with exact Python ints, so a shape whose product
overflows 64 bits, which Triton 2.51's own byte-size check lets through and which then aborts the Python
backend stub, is refused here), too many inputs, models a production deployment does not expose (the
`llm` step only for the cancellation side channel), and the admin methods. Refusal messages are worded
so that the SDK's error classification (client/internvl_client/errors.py) maps them: bad inputs to
InvalidInputError ("unexpected shape for input ..."), unexposed models to ModelNotReadyError
("Request for unknown model ..."). Also owns the one rewrite the guard makes: a leading batch dimension
of 1 on the chat models' inputs (TensorRT-LLM's clients send one) is dropped (`drop_batch_of_one`).
Does not own: the proxying (grpc_guard.py) or the models' own checks
of values (parsing.py). Imports nothing of Triton: the functions take tritonclient's protobuf messages.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from internvl_serve.serving.contract import CHAT_INPUT_SPECS, CHAT_MODELS, LLM, ServingLimits

# Bytes per element of each Triton datatype; BYTES elements are variable (a 4-byte length prefix each).
DTYPE_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
               "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": None}
BYTES_PREFIX = 4

# The cancellation side channel of the llm step (client/internvl_client/cancel.py; llm.py): a request to
# `llm` whose inputs are only these names is a cancel, everything else is a step-internal request.
CANCEL_INPUTS = frozenset({"cancel_request_id", "cancel_key"})
EXPOSED_MODELS = CHAT_MODELS

# Methods of inference.GRPCInferenceService that only the admin key opens (the launcher's ADMIN_APIS:
# model-repository, shared-memory, logging, trace).
ADMIN_METHODS = frozenset({
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings",
})

# The typed `contents` fields of InferTensorContents (requests not using raw_input_contents).
_CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                   "fp32_contents", "fp64_contents", "bytes_contents")


def default_max_request_bytes(limits: ServingLimits = ServingLimits()) -> int:
    """The largest request preprocess can accept: its images and video as base64 data URLs (4/3 of their
    max_request_bytes), the question and the history at their limits, and 1 MiB for the other inputs."""
    return -(-limits.max_request_bytes * 4 // 3) + limits.max_question_bytes + limits.max_history_bytes + (1 << 20)


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard lets through. expose_all_models: every model (tests and debugging of the steps)."""

    max_request_bytes: int = default_max_request_bytes()
    max_inputs: int = 64  # well above the ensemble's inputs (contract.ENSEMBLE_INPUTS; a test checks)
    max_dims: int = 16
    exposed_models: tuple[str, ...] = EXPOSED_MODELS
    expose_all_models: bool = False
    admin_key: str | None = None  # None: admin methods always refused


class Refused(Exception):
    """A request the guard does not forward; `code` is the grpc.StatusCode name to answer with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_model(request, policy: GuardPolicy) -> None:
    """Refuse (NOT_FOUND) a model the deployment does not expose; `llm` is open to cancel requests only."""
    if policy.expose_all_models or request.model_name in policy.exposed_models:
        return
    names = {t.name for t in request.inputs}
    if request.model_name == LLM and names and names <= CANCEL_INPUTS:
        return
    exposed = ", ".join(policy.exposed_models)
    extra = f" ({LLM} only for its cancel side channel: inputs {sorted(CANCEL_INPUTS)})"
    raise Refused("NOT_FOUND", f"Request for unknown model: '{request.model_name}' is not served here; "
                               f"the models served are {exposed}{extra}")


def element_count(shape, name: str, model: str, max_dims: int) -> int:
    """The product of `shape` as an exact int; negative dims and too many dims are refused."""
    if len(shape) > max_dims:
        raise _bad(name, model, f"{len(shape)} dimensions, at most {max_dims} allowed")
    count = 1
    for d in shape:
        if d < 0:
            raise _bad(name, model, f"shape {list(shape)} has a negative dimension")
        count *= d
    return count


def check_inputs(request, policy: GuardPolicy) -> None:
    """Refuse (INVALID_ARGUMENT) inputs whose shape × datatype does not fit the data sent or the limit."""
    model = request.model_name
    if len(request.inputs) > policy.max_inputs:
        raise Refused("INVALID_ARGUMENT", f"unexpected inference input count for model '{model}': "
                                          f"{len(request.inputs)} inputs, at most {policy.max_inputs} allowed")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise Refused("INVALID_ARGUMENT", f"unexpected inference input count for model '{model}': "
                                          f"{len(request.inputs)} inputs but {len(raw)} raw input contents")
    total = 0
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        count = element_count(tensor.shape, name, model, policy.max_dims)
        if tensor.datatype not in DTYPE_SIZES:
            raise Refused("INVALID_ARGUMENT", f"data-type is not a valid Triton datatype for input '{name}' "
                                              f"of model '{model}': {tensor.datatype!r}")
        size = DTYPE_SIZES[tensor.datatype]
        need = count * (size if size is not None else BYTES_PREFIX)  # at least this many bytes
        if need > policy.max_request_bytes:
            raise _bad(name, model, f"shape {list(tensor.shape)} of {tensor.datatype} needs {need} bytes, "
                                    f"more than the {policy.max_request_bytes} a request may carry")
        if raw:
            have = len(raw[i])
            if size is not None and need != have:
                raise _bad(name, model, f"shape {list(tensor.shape)} of {tensor.datatype} needs {need} bytes "
                                        f"but {have} were sent")
            if size is None and need > have:
                raise _bad(name, model, f"shape {list(tensor.shape)} of BYTES has {count} elements but only "
                                        f"{have} bytes were sent (each element needs a 4-byte length prefix)")
            if have > policy.max_request_bytes:
                raise _bad(name, model, f"{have} bytes, more than the {policy.max_request_bytes} a request "
                                        "may carry")
            total += have
        elif tensor.HasField("contents"):
            values = sum(len(getattr(tensor.contents, f)) for f in _CONTENT_FIELDS)
            if values != count:
                raise _bad(name, model, f"shape {list(tensor.shape)} has {count} elements but {values} "
                                        "values were sent")
            total += need
        elif "shared_memory_region" not in tensor.parameters and count != 0:
            raise _bad(name, model, f"shape {list(tensor.shape)} has {count} elements but no data was sent")
        else:
            total += need
    if total > policy.max_request_bytes:
        raise Refused("INVALID_ARGUMENT", f"unexpected shape for inputs of model '{model}': {total} bytes in "
                                          f"all, more than the {policy.max_request_bytes} a request may carry")


def check_infer_request(request, policy: GuardPolicy) -> None:
    """Every check of one ModelInferRequest (unary or one message of a stream); raises Refused."""
    check_model(request, policy)
    check_inputs(request, policy)


def batch_of_one(model: str, name: str, shape) -> list[int] | None:
    """`shape` without its leading batch dimension of 1, or None when there is none to drop.

    TensorRT-LLM's clients send every input with a batch dimension (`max_tokens` [1,1], `text_input`
    [1,1]): its models are batching models. The chat models take one request per call (max_batch_size
    0), so a shape one dimension longer than an input's declared dims is unambiguous: a leading 1 is
    the same data; any other leading size is a batch they do not take (Refused, naming the input)."""
    spec = CHAT_INPUT_SPECS.get(name) if model in CHAT_MODELS else None
    if spec is None or len(shape) != len(spec.dims) + 1:
        return None
    if shape[0] != 1:
        raise _bad(name, model, f"shape {list(shape)} is a batch of {shape[0]}; this model takes one request "
                                f"per call: dims {list(spec.dims)}, or a leading batch dimension of 1")
    return list(shape[1:])


def drop_batch_of_one(request) -> bool:
    """Drop the leading batch dimension of 1 from the chat models' inputs (batch_of_one) in place; the
    data is unchanged. True when a shape changed (the request must be serialized again)."""
    changed = False
    for tensor in request.inputs:
        shape = batch_of_one(request.model_name, tensor.name, tensor.shape)
        if shape is not None:
            del tensor.shape[:]
            tensor.shape.extend(shape)
            changed = True
    return changed


def check_admin(method: str, metadata, policy: GuardPolicy, header: str) -> None:
    """Refuse (PERMISSION_DENIED) an admin method unless the metadata `header` holds the admin key."""
    if method not in ADMIN_METHODS:
        return
    sent = dict(metadata or ()).get(header)
    if policy.admin_key is None or not hmac.compare_digest(str(sent or "").encode(), policy.admin_key.encode()):
        raise Refused("PERMISSION_DENIED", f"{method} is an admin method: it needs the admin key in the "
                                           f"'{header}' metadata")


def _bad(name: str, model: str, why: str) -> Refused:
    return Refused("INVALID_ARGUMENT", f"unexpected shape for input '{name}' for model '{model}': {why} "
                                       "(refused by the gRPC guard)")
