"""The `internvl_chat` ensemble's contract as data: its tensors, and the typed values its requests become.

Owns: the tensor table (names, Triton datatypes, dims, defaults, meaning) that the config.pbtxt tests,
the README and clients read, with each generation input declared once (`GENERATION`: its range, the
SamplingParams field it fills, its OpenAI, model-card and TensorRT-LLM names; contract_files.py generates
and checks every copy); the model names; the tensors between the steps; the cancellation inputs
(`cancel_key`, the llm's `cancel_request_id`); the typed requests (`ChatRequest`, `GenerationRequest`,
`LLMRequest`) and the numpy form of a response. `InvalidInput` and `ServingLimits` are limits.py's,
importable from here too.
Does not own: parsing a request's tensors into those values (parsing.py), the size limits (limits.py),
the prompt rules (prompt.py), image decoding (imageproc.py), enforcing the sampling ranges
(engine/sampling.py validates them as declared here; a test checks they agree), or anything that imports
Triton or torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from internvl_serve.engine import SamplingParams  # torch-free
from internvl_serve.serving.limits import InvalidInput, ServingLimits  # noqa: F401  (importable from here)

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
# The models with the chat interface (the ensemble's inputs; max_batch_size 0: dims without a batch dim),
# the ones a client reaches through the guards by default.
CHAT_MODELS = (ENSEMBLE, ENSEMBLE_BLS)
CHAT_INPUT_SPECS = {spec.name: spec for spec in ENSEMBLE_INPUTS}

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


# ---- the typed requests (parsing.py builds them) -------------------------------------------------


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


@dataclass(frozen=True)
class LLMRequest:
    """What the llm model receives from preprocess and vision, plus the client's generation inputs."""

    input_ids: np.ndarray  # (T,) int32
    image_embeds: np.ndarray | None  # (images * num_image_token, hidden) float32; None without images
    text_input: str
    generation: GenerationRequest


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
# key alone) passes; parsing.parse_llm_request names a missing required one.
LLM_INPUTS: tuple[TensorSpec, ...] = (INPUT_IDS, IMAGE_EMBEDS, CHAT_INPUTS[0], *GENERATION_INPUTS, CANCEL_KEY, CANCEL)
CANCEL_KEY_LENGTH = (16, 256)  # characters: long enough not to be guessed, short enough to hold
