"""The `internvl_chat` ensemble's contract as data, and the Triton-free parsing of its requests.

Owns: the tensor table (names, Triton datatypes, dims, defaults, meaning) that the config.pbtxt tests,
the README and clients read, with each generation input declared once (`GENERATION`: its range, the
SamplingParams field it fills, its OpenAI, model-card and TensorRT-LLM names; contract_files.py generates
and checks every copy); `ServingLimits` (request size limits, overridable from config.pbtxt
`parameters`); turning a dict of numpy arrays (what an adapter pulls out of a Triton request) into a
typed `ChatRequest` / `GenerationRequest`, raising `InvalidInput` with a message that names the tensor
and says what is allowed (and `.input`, the tensor's name); refusing request parameters (the contract has
none); the cancellation inputs (`cancel_key`, the llm's `cancel_request_id`); and the numpy form of a
response. Does not own: the prompt rules (prompt.py), image decoding (imageproc.py), enforcing the
sampling ranges (engine/sampling.py validates them as declared here, a test checks they agree, and
InvalidRequest.field is mapped back to the tensor), or anything that imports Triton or torch.

Images may be sent raw (the encoded file bytes) or, for JSON clients such as HTTP `generate_stream`,
as a `data:image/<type>;base64,<payload>` string; a video likewise as raw bytes or `data:video/...`.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from internvl_serve.engine import InvalidRequest, SamplingParams  # torch-free

# Model names in model_repository/ (the Triton names users see).
ENSEMBLE = "internvl_chat"
ENSEMBLE_BLS = "internvl_chat_bls"  # the same interface, steps run through BLS (sees client cancellation)
PREPROCESS = "preprocess"
VISION = "vision"
LLM = "llm"

IMAGE_SIZE = 448  # the checkpoint's force_image_size; each image (or video frame) is one 448x448 tile


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's interface. `dims` as in config.pbtxt (-1: any length)."""

    name: str
    datatype: str  # Triton wire name: BYTES, INT32, FP32, UINT64, BOOL
    dims: tuple[int, ...]
    optional: bool = True
    default: Any = None
    doc: str = ""

    @property
    def config_type(self) -> str:
        """The config.pbtxt data_type, e.g. TYPE_STRING for BYTES."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


_NUMPY_DTYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}

# Inputs the preprocess model reads (the chat).
CHAT_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "BYTES", (1,), optional=False,
               doc="the question, UTF-8; may hold `<image>` placeholders"),
    TensorSpec("images", "BYTES", (-1,), default=(),
               doc="encoded images (JPEG, PNG, WebP, GIF first frame, BMP, ...), one per element, sent as "
                   "the file's bytes; or `data:image/<type>;base64,<payload>` strings (for JSON clients)"),
    TensorSpec("video", "BYTES", (1,),
               doc="an encoded video file (MP4, AVI, ...) or a `data:video/...;base64,` string; "
                   "the server samples the frames (the card's `get_index`)"),
    TensorSpec("num_segments", "INT32", (1,), default=8, doc="frames to sample from the video, 1..12 (max_frames)"),
    TensorSpec("history", "BYTES", (1,),
               doc="JSON list of earlier `[question, answer]` pairs, questions as they were sent "
                   "(with their `<image>`)"),
    TensorSpec("num_patches_list", "INT32", (-1,),
               doc="the card's `num_patches_list`: images per `<image>` placeholder (default: derived)"),
)

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class GenerationInput:
    """One generation input, declared once. Everything else is generated from these declarations or
    tested against them: the config.pbtxt input lists and ensemble maps, the README and docs/contract.md
    tables, the SDK's `internvl_client/contract_inputs.py` (its request builder, card words and CLI flags),
    the gateway's OpenAI fields, the Node client's tensors (serving/contract_files.py writes and checks
    them: `python -m internvl_serve.serving.contract_files --write`)."""

    name: str                      # the tensor name (TensorRT-LLM's where it has one)
    datatype: str                  # BYTES, INT32, FP32, UINT64, BOOL
    default: Any
    doc: str
    dims: tuple[int, ...] = (1,)
    field: str | None = None       # the SamplingParams field it fills; None: a response option
    low: float | None = None       # the range SamplingParams.validate enforces (a test checks they agree)
    high: float | None = None
    low_open: bool = False         # (low, high] instead of [low, high]
    openai: str | None = None      # the OpenAI / vLLM request field (the gateway)
    card: str | None = None        # the model card's generation_config word (the SDK, the CLI)
    aliases: tuple[str, ...] = ()  # other tensor names accepted for it (TensorRT-LLM's)
    tensorrt_llm: bool = False     # `name` is TensorRT-LLM's name too (its ensemble's input of that name)
    only_empty: bool = False       # a TensorRT-LLM input accepted only empty (not implemented here)

    def specs(self) -> tuple[TensorSpec, ...]:
        """Its tensor and its aliases' tensors."""
        main = TensorSpec(self.name, self.datatype, self.dims, default=self.default, doc=self.doc)
        return (main, *(TensorSpec(a, self.datatype, self.dims, default=self.default,
                                   doc=f"TensorRT-LLM's name for `{self.name}` (send one of the two)")
                        for a in self.aliases))

    @property
    def range_text(self) -> str:
        """The range as the tables show it, e.g. "(0, 1]"; "" when unbounded."""
        if self.low is None and self.high is None:
            return ""
        high = "inf)" if self.high is None else _number_text(self.high) + "]"
        return f"{'(' if self.low_open else '['}{_number_text(self.low)}, {high}"


def _number_text(v: float) -> str:
    return {INT32_MAX: "2^31-1", UINT64_MAX: "2^64-1"}.get(v) or (str(int(v)) if float(v).is_integer() else str(v))


# Inputs that shape generation (read by llm, and validated early by preprocess and the BLS model).
# SamplingParams fields that no client input fills: the serving path sets them (stop_token_ids: the
# conversation template's stop token, prompt.py Template.end_of_answer, passed with every request).
SERVER_SET_SAMPLING_FIELDS = ("stop_token_ids",)

GENERATION: tuple[GenerationInput, ...] = (
    GenerationInput("max_tokens", "INT32", 1024, "new tokens at most (capped by the context window)",
                    field="max_tokens", low=1, high=INT32_MAX, openai="max_tokens", card="max_new_tokens",
                    tensorrt_llm=True),
    GenerationInput("min_length", "INT32", 0,
                    "new tokens at least: `</s>` cannot be generated before (TensorRT-LLM's `min_length`, "
                    "vLLM's `min_tokens`); stop words still stop", field="min_tokens", low=0, high=INT32_MAX,
                    openai="min_tokens", card="min_new_tokens", tensorrt_llm=True),
    GenerationInput("temperature", "FP32", 0.0,
                    "0 is greedy (the card's `do_sample=False`); > 0 samples; a positive value below 1e-5 is "
                    "greedy too (dividing the logits by 1e-45 overflows them)",
                    field="temperature", low=0, openai="temperature", card="temperature", tensorrt_llm=True),
    GenerationInput("top_p", "FP32", 1.0, "nucleus sampling; 1 is off", field="top_p", low=0, high=1,
                    low_open=True, openai="top_p", card="top_p", tensorrt_llm=True),
    GenerationInput("top_k", "INT32", 0, "0 is off", field="top_k", low=0, high=INT32_MAX,
                    openai="top_k", card="top_k", tensorrt_llm=True),
    GenerationInput("repetition_penalty", "FP32", 1.0, "transformers' semantics, over the generated tokens; "
                    "1 is off", field="repetition_penalty", low=0, low_open=True,
                    openai="repetition_penalty", card="repetition_penalty", tensorrt_llm=True),
    GenerationInput("seed", "UINT64", 0, "seed of this request's sampler (same seed + same request = same "
                    "sample)", field="seed", low=0, high=UINT64_MAX, openai="seed", card="seed",
                    aliases=("random_seed",)),
    GenerationInput("stop_words", "BYTES", (), "extra stop strings (at most 16; empty strings are ignored, "
                    'so TensorRT-LLM\'s `""` means none); the template\'s stop (`</s>` for V1-1) always stops',
                    dims=(-1,), field="stop",
                    openai="stop", card="stop", tensorrt_llm=True),
    GenerationInput("bad_words", "BYTES", (), "TensorRT-LLM's; accepted only empty (`\"\"`): banning words "
                    "is not implemented", dims=(-1,), only_empty=True, tensorrt_llm=True),
    GenerationInput("ignore_eos", "BOOL", False, "keep generating past the template's stop token (`</s>`) up to "
                    "`max_tokens` (benchmarks)",
                    field="ignore_eos", openai="ignore_eos", card="ignore_eos"),
    GenerationInput("stream", "BOOL", False, "true: one response per text delta; false: one response with the "
                    "whole answer", tensorrt_llm=True),
    GenerationInput("exclude_input_in_output", "BOOL", True,
                    "false: the first `text_output` starts with `text_input`", tensorrt_llm=True),
)
GENERATION_BY_NAME: dict[str, GenerationInput] = {g.name: g for g in GENERATION}
GENERATION_INPUTS: tuple[TensorSpec, ...] = tuple(spec for g in GENERATION for spec in g.specs())

# The key that makes a request cancellable by name (docs/contract.md, Cancellation): passed by the
# ensemble to the llm step, which keeps it with the request; the llm's side channel needs it.
CANCEL_KEY = TensorSpec("cancel_key", "BYTES", (1,),
                        doc="a secret of 16 to 256 characters, new for each request: with the request's id "
                            "it lets the sender cancel this request (docs/contract.md); none: not cancellable by name")

ENSEMBLE_INPUTS: tuple[TensorSpec, ...] = CHAT_INPUTS + GENERATION_INPUTS + (CANCEL_KEY,)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "BYTES", (1,), optional=False,
               doc="the new text: a delta when streaming, the whole answer otherwise"),
    TensorSpec("finish_reason", "BYTES", (1,), optional=False,
               doc='"" until the last response, then "stop", "length" or "cancelled"'),
    TensorSpec("num_input_tokens", "INT32", (1,), optional=False,
               doc="prompt tokens, image tokens included"),
    TensorSpec("num_output_tokens", "INT32", (1,), optional=False, doc="tokens generated so far"),
)

# Tensors between the composing models (not visible to clients).
INPUT_IDS = TensorSpec("input_ids", "INT32", (-1,), optional=False, doc="prompt token ids, images expanded")
PIXEL_VALUES = TensorSpec("pixel_values", "FP32", (1, -1, 3, IMAGE_SIZE, IMAGE_SIZE), optional=False,
                          doc="normalized image tiles of one request (leading 1: one request)")
IMAGE_EMBEDS = TensorSpec("image_embeds", "FP32", (1, -1, -1), optional=False,
                          doc="(1, images * num_image_token, llm hidden size)")

# The vision model batches requests: its own dims leave out the batch dimension (max_batch_size > 0).
VISION_INPUT_DIMS = (-1, 3, IMAGE_SIZE, IMAGE_SIZE)
VISION_OUTPUT_DIMS = (-1, -1)

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}

SPECS: dict[str, TensorSpec] = {s.name: s for s in ENSEMBLE_INPUTS + OUTPUTS}

# Required by the contract, but declared `optional: true` in the internvl_chat and preprocess configs so
# that preprocess refuses a request without it by name. Triton 2.51 only counts a request's inputs
# against the required ones, and an ensemble that lacks one of its required inputs runs no step at all:
# the client would get an empty final response instead of an error.
DECLARED_OPTIONAL: tuple[str, ...] = ("text_input",)


def contract_table_markdown(outputs: bool = True) -> str:
    """The ensemble's inputs (and outputs) as a Markdown table (the README's; docs/contract.md's inputs)."""
    rows = ["| name | type | dims | default | range | meaning |", "|---|---|---|---|---|---|"]
    generation = {spec.name: g for g in GENERATION for spec in g.specs()}
    for s in ENSEMBLE_INPUTS + (OUTPUTS if outputs else ()):
        if not s.optional:
            default = "required" if s in ENSEMBLE_INPUTS else "always"
        elif s.default is None or s.default == ():
            default = "none"
        else:
            default = json.dumps(s.default)
        dims = "[" + ",".join(str(d) for d in s.dims) + "]"
        g = generation.get(s.name)
        doc = s.doc
        if g is not None and g.name == s.name and g.openai and g.openai != g.name:
            doc += f"; OpenAI gateway: `{g.openai}`"
        rows.append(f"| `{s.name}` | {s.datatype} | {dims} | {default} | {g.range_text if g else ''} | {doc} |")
    return "\n".join(rows)


class InvalidInput(ValueError):
    """A request the client must fix; the message names the tensor and says what is allowed, and `input`
    holds the tensor's name where one input is at fault (callers read it, never the message)."""

    def __init__(self, message: str, input: str | None = None):
        super().__init__(message)
        self.input = input


@dataclass(frozen=True)
class ServingLimits:
    """Per-request size limits. Production defaults; each can be overridden by a config.pbtxt
    parameter of the same name (string value, a positive integer)."""

    max_images: int = 12  # 256 tokens each: 12 images use 3072 of V1-1's 4096-token context
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 36_000_000  # width * height after decoding (decompression bombs)
    # width * height summed over a request's images (or its num_segments video frames), from the headers,
    # before any is decoded: bounds one request's decoding time (~0.7 s per 36 MP) whatever the encoding
    max_request_pixels: int = 100_000_000
    max_video_bytes: int = 64 * 1024 * 1024
    max_frames: int = 12  # num_segments at most
    max_question_bytes: int = 32 * 1024
    max_history_bytes: int = 256 * 1024
    max_stop_words: int = 16
    max_request_bytes: int = 64 * 1024 * 1024  # all images (decoded from data URLs) + the video of one request
    max_output_tokens: int = 4096  # the largest max_tokens accepted (V1-1's context window)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "ServingLimits":
        """Defaults overridden by the keys of `parameters` that name a field; other keys are ignored."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in parameters:
                continue
            raw = str(parameters[f.name]).strip()
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value <= 0:
                raise ValueError(f"parameter {f.name!r} must be a positive integer, got {raw!r}")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class ChatRequest:
    """What the preprocess model turns into a prompt and pixel values."""

    question: str
    images: list[bytes] = field(default_factory=list)  # encoded files, data URLs already decoded
    video: bytes | None = None
    num_segments: int = 8
    history: list[tuple[str, str]] | None = None  # None: no history tensor sent
    num_patches_list: list[int] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What the llm model needs besides the prompt: sampling and response shaping."""

    sampling: SamplingParams  # validated
    stream: bool = False
    exclude_input_in_output: bool = True


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


def _generation_array(inputs, g: GenerationInput) -> tuple[str, np.ndarray | None]:
    """(the name it was sent under, the checked tensor) of a generation input or one of its aliases."""
    sent = [spec for spec in g.specs() if spec.name in inputs]
    if len(sent) > 1:
        names = " and ".join(f"'{spec.name}'" for spec in sent)
        raise InvalidInput(f"inputs {names} are the same setting: send one of them", sent[-1].name)
    spec = sent[0] if sent else g.specs()[0]
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


# ---- the llm model's request ----------------------------------------------------------------------


@dataclass(frozen=True)
class LLMRequest:
    """What the llm model receives from preprocess and vision, plus the client's generation inputs."""

    input_ids: np.ndarray  # (T,) int32
    image_embeds: np.ndarray | None  # (images * num_image_token, hidden) float32; None without images
    text_input: str
    generation: GenerationRequest


def parse_llm_request(inputs: Mapping[str, np.ndarray], limits: ServingLimits = ServingLimits()) -> LLMRequest:
    ids = _checked(inputs, INPUT_IDS)
    if ids.size == 0:
        raise InvalidInput("input 'input_ids' is empty")
    embeds = _checked(inputs, IMAGE_EMBEDS)
    embeds = embeds.reshape(embeds.shape[1:]) if embeds.shape[1] else None
    text = _as_text("text_input", _scalar(inputs, SPECS["text_input"]))
    return LLMRequest(input_ids=ids, image_embeds=embeds, text_input=text,
                      generation=parse_generation_request(inputs, limits))


# ---- responses ----------------------------------------------------------------------------------


def response_arrays(text: str, finish_reason: str, num_input_tokens: int, num_output_tokens: int) -> dict:
    """One response's output tensors as numpy arrays, named and typed as OUTPUTS."""
    return {
        "text_output": np.array([text.encode("utf-8")], dtype=object),
        "finish_reason": np.array([finish_reason.encode("utf-8")], dtype=object),
        "num_input_tokens": np.array([num_input_tokens], dtype=np.int32),
        "num_output_tokens": np.array([num_output_tokens], dtype=np.int32),
    }


# ---- the cancellation side channel of the llm model ---------------------------------------------------
# A request to the llm model holding only cancel_request_id and cancel_key aborts the running requests
# that were sent with that request id AND that key (LLMService.cancel): a client can cancel only what it
# sent, whatever ids other clients choose.

CANCEL_INPUT = "cancel_request_id"  # BYTES [1]: a request to the llm model that aborts another (llm.py)
CANCEL = TensorSpec(CANCEL_INPUT, "BYTES", (1,), optional=True,
                    doc="llm model only: abort the running request sent with this request id and cancel_key")
# The llm model's inputs. Triton sees all of them as optional, so that a cancellation request (its id and
# key alone) passes; parse_llm_request names a missing required one.
LLM_INPUTS: tuple[TensorSpec, ...] = (INPUT_IDS, IMAGE_EMBEDS, CHAT_INPUTS[0], *GENERATION_INPUTS, CANCEL_KEY, CANCEL)
CANCEL_KEY_LENGTH = (16, 256)  # characters: long enough not to be guessed, short enough to hold


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
