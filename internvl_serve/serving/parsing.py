"""The Triton-free parsing of the contract's requests: numpy arrays in, typed values out.

Owns: turning a dict of numpy arrays (what an adapter pulls out of a Triton request) into a typed
`ChatRequest` / `GenerationRequest` / `LLMRequest`, checking each tensor against its `TensorSpec`
(datatype, shape, UTF-8, data URLs) and the request against `ServingLimits`, and raising `InvalidInput`
with a message that names the tensor and says what is allowed (and `.input`, the tensor's name);
refusing request parameters (the contract has none); the cancellation inputs (`cancel_key`, the llm's
`cancel_request_id`). Does not own: the tensor table and the typed values (contract.py), the limits
(limits.py), enforcing the sampling ranges (engine/sampling.py validates them as declared in
contract.GENERATION, and InvalidRequest.field is mapped back to the tensor here), the prompt rules
(prompt.py), image decoding (imageproc.py), or anything that imports Triton or torch.

Images may be sent raw (the encoded file bytes) or, for JSON clients such as HTTP `generate_stream`,
as a `data:image/<type>;base64,<payload>` string; a video likewise as raw bytes or `data:video/...`.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from typing import Any, Mapping

import numpy as np

from internvl_serve.engine import InvalidRequest, SamplingParams  # torch-free
from internvl_serve.serving.contract import (CANCEL, CANCEL_INPUT, CANCEL_KEY, CANCEL_KEY_LENGTH, GENERATION,
                                             GENERATION_INPUTS, IMAGE_EMBEDS, INPUT_IDS, SPECS, ChatRequest,
                                             GenerationInput, GenerationRequest, LLMRequest, TensorSpec)
from internvl_serve.serving.limits import InvalidInput, ServingLimits

_NUMPY_DTYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}


# ---- checking one tensor -------------------------------------------------------------------------


def _numpy_datatype(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    names = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}
    names.update({np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16",
                  np.dtype(np.int8): "INT8", np.dtype(np.int16): "INT16", np.dtype(np.uint8): "UINT8",
                  np.dtype(np.uint32): "UINT32", np.dtype(np.int64): "INT64"})
    return names.get(array.dtype, str(array.dtype))


def _shape_text(dims) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _checked(inputs: Mapping[str, np.ndarray], spec: TensorSpec) -> np.ndarray | None:
    """The tensor named by `spec`, after checking its datatype and shape; None when absent."""
    array = inputs.get(spec.name)
    if array is None:
        if not spec.optional:
            raise InvalidInput(f"input '{spec.name}' is required ({spec.datatype} {_shape_text(spec.dims)})", spec.name)
        return None
    array = np.asarray(array)
    got = _numpy_datatype(array)
    if got != spec.datatype:
        raise InvalidInput(f"input '{spec.name}' must be {spec.datatype}, got {got}", spec.name)
    if len(array.shape) != len(spec.dims) or any(d != -1 and d != n for d, n in zip(spec.dims, array.shape)):
        raise InvalidInput(f"input '{spec.name}' must have shape {_shape_text(spec.dims)}, "
                           f"got {_shape_text(array.shape)}", spec.name)
    return array


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InvalidInput(f"input '{name}' must hold bytes, got {type(value).__name__}")


def _as_text(name: str, value: Any) -> str:
    raw = _as_bytes(name, value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input '{name}' is not valid UTF-8 (bad byte at offset {e.start})") from None


def _scalar(inputs: Mapping[str, np.ndarray], spec: TensorSpec) -> Any:
    array = _checked(inputs, spec)
    if array is None:
        return spec.default
    return array.reshape(-1)[0].item() if spec.datatype != "BYTES" else array.reshape(-1)[0]


_DATA_URL = re.compile(rb"^data:(?P<kind>[a-z]+)/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9.+-]+=[^;,]*)*;base64,", re.I)


def decode_data_url(name: str, value: bytes, kind: str, max_bytes: int) -> bytes:
    """`value` itself, or the payload of a `data:<kind>/<type>;base64,<payload>` URL."""
    if not value[:5].lower() == b"data:":
        return value
    match = _DATA_URL.match(value)
    if match is None or match.group("kind").lower() != kind.encode():
        raise InvalidInput(f"input '{name}' starts with 'data:' but is not a '{kind}' data URL; "
                           f"expected data:{kind}/<type>;base64,<payload>")
    payload = re.sub(rb"\s+", b"", value[match.end():])
    if len(payload) > (max_bytes + 2) // 3 * 4:
        raise InvalidInput(f"input '{name}' decodes to more than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input '{name}' has a data URL whose payload is not valid base64") from None


# ---- the chat -----------------------------------------------------------------------------------


def _parse_question(inputs, limits: ServingLimits) -> str:
    spec = SPECS["text_input"]
    raw = _as_bytes(spec.name, _scalar(inputs, spec))
    if len(raw) > limits.max_question_bytes:
        raise InvalidInput(f"input 'text_input' is {len(raw)} bytes; at most {limits.max_question_bytes} allowed")
    question = _as_text(spec.name, raw)
    if not question.strip():
        raise InvalidInput("input 'text_input' is empty: send a non-blank question")
    return question


def _parse_images(inputs, limits: ServingLimits) -> list[bytes]:
    array = _checked(inputs, SPECS["images"])
    if array is None:
        return []
    if array.shape[0] > limits.max_images:
        raise InvalidInput(f"input 'images' holds {array.shape[0]} images; at most {limits.max_images} allowed")
    images = []
    for i, value in enumerate(array.reshape(-1)):
        name = f"images[{i}]"
        data = decode_data_url(name, _as_bytes(name, value), "image", limits.max_image_bytes)
        if not data:
            raise InvalidInput(f"input '{name}' is empty: send an encoded image file")
        if len(data) > limits.max_image_bytes:
            raise InvalidInput(f"input '{name}' is {len(data)} bytes; at most {limits.max_image_bytes} allowed")
        images.append(data)
    return images


def _parse_video(inputs, limits: ServingLimits) -> bytes | None:
    spec = SPECS["video"]
    if _checked(inputs, spec) is None:
        return None
    data = decode_data_url(spec.name, _as_bytes(spec.name, _scalar(inputs, spec)), "video", limits.max_video_bytes)
    if not data:
        raise InvalidInput("input 'video' is empty: send an encoded video file")
    if len(data) > limits.max_video_bytes:
        raise InvalidInput(f"input 'video' is {len(data)} bytes; at most {limits.max_video_bytes} allowed")
    return data


_HISTORY_HELP = 'a JSON list of [question, answer] string pairs, e.g. [["<image>\\nWhat is it?", "A cat."]]'


def _parse_history(inputs, limits: ServingLimits) -> list[tuple[str, str]] | None:
    spec = SPECS["history"]
    if _checked(inputs, spec) is None:
        return None
    raw = _as_bytes(spec.name, _scalar(inputs, spec))
    if len(raw) > limits.max_history_bytes:
        raise InvalidInput(f"input 'history' is {len(raw)} bytes; at most {limits.max_history_bytes} allowed")
    text = _as_text(spec.name, raw)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"input 'history' is not valid JSON ({e.msg} at char {e.pos}); "
                           f"expected {_HISTORY_HELP}") from None
    except RecursionError:  # json's parser recurses once per nested list or object
        raise InvalidInput(f"input 'history' nests JSON lists or objects too deeply; expected {_HISTORY_HELP}") from None
    if not isinstance(value, list):
        raise InvalidInput(f"input 'history' must be {_HISTORY_HELP}; got a JSON {type(value).__name__}")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise InvalidInput(f"input 'history' entry {i} must be a [question, answer] pair of strings; "
                               f"expected {_HISTORY_HELP}")
        for text in pair:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" is no character
                raise InvalidInput(f"input 'history' entry {i} holds {text[e.start]!r} (a lone UTF-16 surrogate "
                                   f"escape), which is not text; send valid Unicode") from None
        pairs.append((pair[0], pair[1]))
    return pairs


def _parse_num_patches_list(inputs, limits: ServingLimits) -> list[int] | None:
    array = _checked(inputs, SPECS["num_patches_list"])
    if array is None:
        return None
    if array.shape[0] > limits.max_images:
        raise InvalidInput(f"input 'num_patches_list' holds {array.shape[0]} counts; at most {limits.max_images} "
                           f"allowed (one per <image> placeholder)")
    values = [int(v) for v in array.reshape(-1)]
    if not values or any(v < 1 for v in values):
        raise InvalidInput(f"input 'num_patches_list' must list one positive count per <image> placeholder, "
                           f"got {values}")
    return values


def parse_chat_request(inputs: Mapping[str, np.ndarray], limits: ServingLimits = ServingLimits()) -> ChatRequest:
    """The chat part of a request; raises InvalidInput. Unknown names are Triton's to reject."""
    question = _parse_question(inputs, limits)
    images = _parse_images(inputs, limits)
    video = _parse_video(inputs, limits)
    media_bytes = sum(len(i) for i in images) + len(video or b"")
    if media_bytes > limits.max_request_bytes:
        raise InvalidInput(f"the request's images and video are {media_bytes} bytes in total; "
                           f"at most {limits.max_request_bytes} allowed")
    num_segments = int(_scalar(inputs, SPECS["num_segments"]))
    if video is not None:
        if images:
            raise InvalidInput("send either 'images' or 'video', not both")
        if not 1 <= num_segments <= limits.max_frames:
            raise InvalidInput(f"input 'num_segments' must be between 1 and {limits.max_frames}, got {num_segments}")
    num_patches_list = _parse_num_patches_list(inputs, limits)
    if num_patches_list is not None and video is not None:
        raise InvalidInput("input 'num_patches_list' does not apply to a video (one frame per <image>)")
    return ChatRequest(question=question, images=images, video=video, num_segments=num_segments,
                       history=_parse_history(inputs, limits), num_patches_list=num_patches_list)


# ---- generation ---------------------------------------------------------------------------------

_PYTHON_TYPES = {"INT32": int, "UINT64": int, "FP32": float, "BOOL": bool}


@functools.cache
def _specs(g: GenerationInput) -> tuple[TensorSpec, ...]:
    """g.specs(), made once per declared input rather than on every request."""
    return g.specs()


def _generation_array(inputs, g: GenerationInput) -> tuple[str, np.ndarray | None]:
    """(the name it was sent under, the checked tensor) of a generation input or one of its aliases."""
    specs = _specs(g)
    sent = [spec for spec in specs if spec.name in inputs]
    if len(sent) > 1:
        names = " and ".join(f"'{spec.name}'" for spec in sent)
        raise InvalidInput(f"inputs {names} are the same setting: send one of them", sent[-1].name)
    spec = sent[0] if sent else specs[0]
    return spec.name, _checked(inputs, spec)


def _strings(name: str, array: np.ndarray, limit: int) -> tuple[str, ...]:
    """A BYTES list's non-empty strings (TensorRT-LLM sends "" for none)."""
    if array.shape[0] > limit:
        raise InvalidInput(f"input '{name}' holds {array.shape[0]} strings; at most {limit} allowed", name)
    words = tuple(_as_text(f"{name}[{i}]", v) for i, v in enumerate(array.reshape(-1)))
    return tuple(w for w in words if w)


def _generation_value(inputs, g: GenerationInput, limits: ServingLimits) -> tuple[str, Any]:
    name, array = _generation_array(inputs, g)
    if array is None:
        return name, g.default
    if g.datatype == "BYTES":
        words = _strings(name, array, limits.max_stop_words)
        if g.only_empty and words:
            raise InvalidInput(f"input '{name}' is not supported by this server: send it empty (\"\") or "
                               f"leave it out; got {list(words)[:4]}", name)
        return name, words
    return name, _PYTHON_TYPES[g.datatype](array.reshape(-1)[0].item())


def parse_generation_request(inputs: Mapping[str, np.ndarray],
                             limits: ServingLimits = ServingLimits()) -> GenerationRequest:
    """Sampling parameters and response options; raises InvalidInput naming the offending tensor."""
    sent_as, values = {}, {}
    for g in GENERATION:
        sent_as[g.name], values[g.name] = _generation_value(inputs, g, limits)
    if values["max_tokens"] > limits.max_output_tokens:
        raise InvalidInput(f"input 'max_tokens' is {values['max_tokens']}; at most {limits.max_output_tokens} "
                           f"allowed", "max_tokens")
    try:
        sampling = SamplingParams(**{g.field: values[g.name] for g in GENERATION if g.field}).validate()
    except InvalidRequest as e:
        g = next((g for g in GENERATION if g.field == e.field), None)
        if g is None:
            raise InvalidInput(str(e)) from None
        name = sent_as[g.name]
        message = str(e).replace(g.field, name, 1) if g.field != name else str(e)
        raise InvalidInput(f"input '{name}': {message}", name) from None
    return GenerationRequest(sampling=sampling, stream=values["stream"],
                             exclude_input_in_output=values["exclude_input_in_output"])


# ---- request parameters ---------------------------------------------------------------------------


def check_request_parameters(parameters: str | Mapping[str, Any] | None) -> None:
    """Refuse request parameters (what the Python backend's `request.parameters()` returns, JSON).

    The contract has none: every setting is an input tensor. Triton passes a request's parameters through
    untouched (its own, `triton_*`, `priority`, `timeout`, `sequence_*`, are taken out before), and HTTP
    `/generate` turns every JSON key that is not an input into one, so a misspelt setting such as
    `"max_token": 16` would otherwise be ignored silently."""
    if not parameters:
        return
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters)
        except json.JSONDecodeError:
            raise InvalidInput("the request's parameters are not valid JSON") from None
    names = sorted(str(k) for k in parameters)
    if not names:
        return
    as_inputs = [n for n in names if n in SPECS]
    if as_inputs:
        raise InvalidInput(f"request parameter(s) {', '.join(repr(n) for n in as_inputs)} must be sent as input "
                           f"tensors, not as request parameters")
    raise InvalidInput(f"unknown request parameter(s) {', '.join(repr(n) for n in names)}: this model takes no "
                       f"request parameters; its settings are the inputs {', '.join(s.name for s in GENERATION_INPUTS)}")


# ---- the llm model's request -----------------------------------------------------------------------


def parse_llm_request(inputs: Mapping[str, np.ndarray], limits: ServingLimits = ServingLimits()) -> LLMRequest:
    ids = _checked(inputs, INPUT_IDS)
    if ids.size == 0:
        raise InvalidInput("input 'input_ids' is empty")
    embeds = _checked(inputs, IMAGE_EMBEDS)
    embeds = embeds.reshape(embeds.shape[1:]) if embeds.shape[1] else None
    text = _as_text("text_input", _scalar(inputs, SPECS["text_input"]))
    return LLMRequest(input_ids=ids, image_embeds=embeds, text_input=text,
                      generation=parse_generation_request(inputs, limits))


# ---- the cancellation side channel of the llm model (contract.py: CANCEL) -----------------------------


def parse_cancel_key(inputs: Mapping[str, np.ndarray]) -> str | None:
    """The request's cancel_key (None when it was sent without one); InvalidInput for a bad one."""
    if CANCEL_KEY.name not in inputs:
        return None
    key = _as_text(CANCEL_KEY.name, _scalar(inputs, CANCEL_KEY))
    low, high = CANCEL_KEY_LENGTH
    if not low <= len(key) <= high:
        raise InvalidInput(f"input '{CANCEL_KEY.name}' is {len(key)} characters; it must be {low} to {high} "
                           f"(send a new random secret with each request, e.g. 32 hex digits)")
    return key


def parse_cancel_request(inputs: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(request id, cancel_key) of a cancellation request to the llm model; None when it is not one."""
    if CANCEL_INPUT not in inputs:
        return None
    request_id = _as_text(CANCEL_INPUT, _scalar(inputs, CANCEL))
    if not request_id.strip():
        raise InvalidInput(f"input '{CANCEL_INPUT}' is empty")
    key = parse_cancel_key(inputs)
    if key is None:
        raise InvalidInput(f"input '{CANCEL_INPUT}' needs input '{CANCEL_KEY.name}': the key that was sent "
                           f"with the request to cancel (a request sent without one cannot be cancelled by name)")
    return request_id, key
