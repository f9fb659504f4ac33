"""The `internvl_chat` ensemble's contract as the client sees it: tensor names, request building,
response parsing. Triton-transport-free apart from `tritonclient.grpc.InferInput`.

Owns: `ChatRequest` (a validated request), `to_infer_inputs` (-> Triton input tensors),
`parse_response` (one streamed Triton response -> `Chunk`), `ChatResponse` (the finished answer).
Does not own: the transport (client.py / aio.py), the input names, types and defaults (contract_inputs.py,
generated from the server's declaration). docs/contract.md is the prose form of this file.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import InferInput

from . import contract_inputs

MODEL_NAME = "internvl_chat"

# Input and output names and Triton datatypes: generated from the server's declaration
# (contract_inputs.py; cancel_key is made anew for each request by client.py / aio.py, never by callers).
INPUTS: dict[str, str] = contract_inputs.INPUTS
OUTPUTS: dict[str, str] = contract_inputs.OUTPUTS
FINISH_REASONS = ("stop", "length", "cancelled")
# Response parameter Triton sets when the request asked for `triton_enable_empty_final_response`.
FINAL_RESPONSE_PARAM = "triton_final_response"

_NUMPY_TYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}

History = Sequence[Sequence[str]]  # [(question, answer), ...] as the card's chat returns it


@dataclass
class ChatRequest:
    """One request to the ensemble, in the contract's terms (generation values already mapped)."""

    question: str
    images: list[bytes] = field(default_factory=list)
    video: bytes | None = None
    num_segments: int = 8
    history: list[tuple[str, str]] = field(default_factory=list)
    num_patches_list: list[int] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    stream: bool = True

    def validate(self) -> "ChatRequest":
        if not isinstance(self.question, str):
            raise TypeError(f"question must be a str, got {type(self.question).__name__}")
        if self.images and self.video is not None:
            raise ValueError("give images or a video, not both (the model card has no such prompt)")
        if self.video is not None and not (isinstance(self.num_segments, int) and self.num_segments >= 1):
            raise ValueError(f"num_segments must be an integer >= 1, got {self.num_segments!r}")
        if self.num_patches_list is not None:
            if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in self.num_patches_list):
                raise ValueError(f"num_patches_list must hold integers >= 1, got {self.num_patches_list!r}")
            if self.images and sum(self.num_patches_list) != len(self.images):
                raise ValueError(
                    f"num_patches_list sums to {sum(self.num_patches_list)} but {len(self.images)} images "
                    "were given (each V1-1 image is one patch)"
                )
        for i, pair in enumerate(self.history):
            if len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                raise ValueError(f"history[{i}] must be a (question, answer) pair of strings, got {pair!r}")
        unknown = set(self.generation) - set(INPUTS)
        if unknown:
            raise ValueError(f"unknown contract inputs: {sorted(unknown)}")
        if "cancel_key" in self.generation:
            raise ValueError("cancel_key is not a setting: the client makes a new one for each request")
        return self


def normalize_history(history: History | None) -> list[tuple[str, str]]:
    if history is None:
        return []
    if isinstance(history, (str, bytes)):
        raise TypeError("history must be a list of (question, answer) pairs, not a string")
    out = []
    for i, pair in enumerate(history):
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"history[{i}] must be a (question, answer) pair, got {pair!r}")
        out.append((pair[0], pair[1]))
    return out


def _tensor(name: str, values: Any) -> InferInput:
    datatype = INPUTS[name]
    if datatype == "BYTES":
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        array = np.array(items, dtype=np.object_)
    else:
        array = np.asarray(values, dtype=_NUMPY_TYPES[datatype])
    array = array.reshape([len(values)])
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def to_infer_inputs(request: ChatRequest) -> list[InferInput]:
    """The Triton input tensors of a request. Optional inputs that were not given are left out, so the
    server's documented defaults apply."""
    request.validate()
    inputs = [_tensor("text_input", [request.question])]
    if request.images:
        inputs.append(_tensor("images", request.images))
    if request.video is not None:
        inputs.append(_tensor("video", [request.video]))
        inputs.append(_tensor("num_segments", [request.num_segments]))
    if request.history:
        inputs.append(_tensor("history", [json.dumps([list(p) for p in request.history], ensure_ascii=False)]))
    if request.num_patches_list is not None:
        inputs.append(_tensor("num_patches_list", [int(n) for n in request.num_patches_list]))
    for name, value in request.generation.items():
        values = value if INPUTS[name] == "BYTES" and not isinstance(value, (str, bytes)) else [value]
        if name == "stop_words" and not values:
            continue
        inputs.append(_tensor(name, values))
    inputs.append(_tensor("stream", [bool(request.stream)]))
    return inputs


@dataclass
class Chunk:
    """One streamed response: a text delta; the last one also has finish_reason and the counts."""

    text: str
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    final: bool = False  # Triton's final-response flag (the stream for this request is over)


@dataclass
class ChatResponse:
    """A finished answer with the server's final metadata."""

    text: str
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None
    request_id: str = ""


class ResponseAssembler:
    """Accumulates Chunks into a ChatResponse; decodes UTF-8 incrementally so a character split over
    two responses is still decoded right."""

    def __init__(self, request_id: str = ""):
        self.request_id = request_id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.finish_reason: str | None = None
        self.num_input_tokens: int | None = None
        self.num_output_tokens: int | None = None
        self.received = 0  # responses received (0: nothing yet, so a retry is safe)

    def add(self, response_pb: Any) -> Chunk:
        """Parse one `ModelInferResponse` protobuf."""
        self.received += 1
        outputs = _outputs(response_pb)
        raw = outputs.get("text_output")
        text = self._decoder.decode(raw or b"", final=False)
        chunk = Chunk(text=text)
        reason = outputs.get("finish_reason")
        if reason:
            chunk.finish_reason = self.finish_reason = reason.decode("utf-8", "replace")
        for name in ("num_input_tokens", "num_output_tokens"):
            if name in outputs:
                setattr(chunk, name, outputs[name])
                setattr(self, name, outputs[name])
        param = response_pb.parameters.get(FINAL_RESPONSE_PARAM)
        chunk.final = bool(param is not None and param.bool_param)
        if chunk.final:
            tail = self._decoder.decode(b"", final=True)
            chunk.text += tail
        self._parts.append(chunk.text)
        return chunk

    def add_end(self) -> Chunk:
        """The stream ended without a flagged final response (asyncio path): flush and mark final."""
        chunk = Chunk(
            text=self._decoder.decode(b"", final=True),
            finish_reason=self.finish_reason,
            num_input_tokens=self.num_input_tokens,
            num_output_tokens=self.num_output_tokens,
            final=True,
        )
        self._parts.append(chunk.text)
        return chunk

    def response(self) -> ChatResponse:
        return ChatResponse(
            text="".join(self._parts),
            finish_reason=self.finish_reason,
            num_input_tokens=self.num_input_tokens,
            num_output_tokens=self.num_output_tokens,
            request_id=self.request_id,
        )


def _outputs(response_pb: Any) -> dict[str, Any]:
    """Decode the outputs of a ModelInferResponse (raw_output_contents or typed contents).

    BYTES outputs (shape [1]) -> bytes of the single element; INT32 outputs -> int.
    """
    out: dict[str, Any] = {}
    raws = list(response_pb.raw_output_contents)
    for i, tensor in enumerate(response_pb.outputs):
        if tensor.name not in OUTPUTS:
            continue
        if i < len(raws):
            raw = raws[i]
            if tensor.datatype == "BYTES":
                value = _first_bytes_element(raw)
            else:
                arr = np.frombuffer(raw, dtype=np.int32) if tensor.datatype == "INT32" else None
                value = int(arr[0]) if arr is not None and arr.size else None
        elif tensor.datatype == "BYTES":
            value = tensor.contents.bytes_contents[0] if tensor.contents.bytes_contents else None
        else:
            value = int(tensor.contents.int_contents[0]) if tensor.contents.int_contents else None
        if value is not None:
            out[tensor.name] = value
    return out


def _first_bytes_element(raw: bytes) -> bytes | None:
    # Triton's BYTES serialisation: each element is a 4-byte little-endian length, then the bytes.
    if len(raw) < 4:
        return None
    length = int.from_bytes(raw[:4], "little")
    return raw[4 : 4 + length]


def merge_generation(base: Mapping[str, Any] | None, override: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Card-style generation configs merged key by key (override wins); None when both are None."""
    if base is None and override is None:
        return None
    merged = dict(base or {})
    merged.update(override or {})
    return merged


def build_request(
    question: str,
    *,
    images: Any = None,
    video: Any = None,
    history: History | None = None,
    num_patches_list: Sequence[int] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    num_segments: int = 8,
) -> ChatRequest:
    """Card-style arguments (paths / bytes / PIL images, card generation words) -> a validated request."""
    from .generation import to_contract_inputs
    from .media import encode_images, encode_video

    return ChatRequest(
        question=question,
        images=encode_images(images),
        video=None if video is None else encode_video(video),
        num_segments=num_segments,
        history=normalize_history(history),
        num_patches_list=None if num_patches_list is None else list(num_patches_list),
        generation=to_contract_inputs(generation_config),
    ).validate()
