"""OpenAI requests -> the internvl_chat contract. No web framework, no network.

Owns: validating a `/v1/chat/completions` or `/v1/completions` body and turning it into the client
SDK's `ChatRequest` (question, history, images, generation inputs); which request fields are honoured,
refused (a value the server cannot honour) or ignored (unknown fields, as vLLM: accepted, reported in
`CompletionRequest.ignored` for the app to log); the OpenAI error objects and the mapping of the SDK's
errors onto HTTP statuses. Does not own: HTTP (app.py), fetching remote images (app.py), the answer
and chunk objects (answers.py), the contract (internvl_client.request) or its generation inputs' OpenAI
names, types and ranges (internvl_client.contract_inputs, generated from the server's declaration).

Messages -> the model card's chat(question, history):
- `system` / `developer` messages: refused (400), or dropped with `system_messages="ignore"`: the
  card's internvl_zh template has no system turn;
- the rest must alternate user, assistant, user, ..., and end with a user message: the earlier
  (user, assistant) pairs become `history`, the last user message the `question`;
- a user message's text parts are joined with "\\n"; its image_url parts (in order, over all messages)
  become `images`, and the message gets the card's placeholders in front of its text: `<image>\\n` for
  one image, `Image-1: <image>\\nImage-2: <image>\\n...` for several (the card's separate images), so
  every image is bound to the turn that sent it. This is also what the SDK's ChatSession sends.

A completions `prompt` is the card's question: the server always applies the card's chat template, so
`/v1/completions` with prompt P answers what `/v1/chat/completions` with one user message P does.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from internvl_client.errors import (
    InternVLError,
    InvalidInputError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from internvl_client.contract_inputs import GENERATION
from internvl_client.request import ChatRequest

from .config import GatewayConfig

INT32_MAX = 2**31 - 1
CHAT, COMPLETIONS = "chat", "completions"

# Request fields accepted and not used (they change nothing about the answer); any other unknown field
# is ignored too, but reported (CompletionRequest.ignored, logged by the app), as vLLM does.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort",
                  "verbosity", "prompt_cache_key", "safety_identifier"}
# The contract's generation inputs by their OpenAI / vLLM field (the declaration, generated into the SDK):
# OpenAI's own (max_tokens, temperature, top_p, seed, stop) and vLLM's extensions, sent with the openai
# client's extra_body (top_k, repetition_penalty, ignore_eos, min_tokens).
DECLARED = {g["openai"]: g for g in GENERATION if g["openai"]}
OWN_RULES = ("max_tokens", "temperature", "stop")  # OpenAI's shapes and ranges, below


class GatewayError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def from_client_error(error: Exception) -> GatewayError:
    """The SDK's exceptions -> HTTP statuses: the server refused the request (INVALID_ARG) 400,
    Triton unreachable or not serving the model 503, deadline 504, anything else 500."""
    message = getattr(error, "server_message", None) or str(error)
    if isinstance(error, InvalidInputError):
        return GatewayError(400, message)
    if isinstance(error, (ServerUnavailableError, ModelNotReadyError)):
        return GatewayError(503, str(error), type="server_error", code="service_unavailable")
    if isinstance(error, RequestTimeoutError):
        return GatewayError(504, str(error), type="server_error", code="timeout")
    if isinstance(error, (ValueError, TypeError)) and not isinstance(error, InternVLError):
        return GatewayError(400, str(error))  # ChatRequest.validate
    return GatewayError(500, str(error), type="server_error")


# ---- images -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteImage:
    """An http(s) image_url part, fetched by the app (only when the config allows it)."""

    url: str
    param: str


def parse_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """`data:image/<type>;base64,<payload>` -> the image's bytes."""
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:"):
        raise bad_request(f"{param}: a data URL must look like data:image/png;base64,<payload>", param)
    media, *options = head[len("data:"):].split(";")
    if not media.startswith("image/"):
        raise bad_request(f"{param}: the data URL's media type must be image/*, got {media or 'none'!r}", param)
    if "base64" not in options:
        raise bad_request(f"{param}: only base64 data URLs are supported (data:{media};base64,...)", param)
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise bad_request(f"{param}: the image is larger than {max_bytes} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data URL's payload is not valid base64", param) from None


def image_ref(part: Mapping[str, Any], param: str, config: GatewayConfig) -> bytes | RemoteImage:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, Mapping) else spec
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}.image_url.url must be a non-empty string", f"{param}.image_url.url")
    param = f"{param}.image_url.url"
    if url.startswith("data:"):
        return parse_data_url(url, param, config.max_image_bytes)
    if url.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise bad_request(f"{param}: http(s) image URLs are disabled on this gateway; send the image as a "
                              "data URL (data:image/png;base64,...)", param, "remote_images_disabled")
        return RemoteImage(url, param)
    raise bad_request(f"{param}: expected a data: URL (or http(s) where allowed), got {url[:40]!r}", param)


# ---- messages ---------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """The card's chat arguments: question, history [(question, answer)], images in placeholder order."""

    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    images: list[bytes | RemoteImage] = field(default_factory=list)


def placeholders(num_images: int) -> str:
    if num_images == 0:
        return ""
    if num_images == 1:
        return "<image>\n"
    return "".join(f"Image-{i}: <image>\n" for i in range(1, num_images + 1))


def _content(message: Mapping[str, Any], param: str, config: GatewayConfig, *, images_allowed: bool
             ) -> tuple[str, list[bytes | RemoteImage]]:
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise bad_request(f"{param}.content must be a string or a non-empty list of content parts", f"{param}.content")
    texts: list[str] = []
    images: list[bytes | RemoteImage] = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and images_allowed:
            images.append(image_ref(part, where, config))
        elif kind == "image_url":
            raise bad_request(f"{where}: images are accepted in user messages only", where)
        else:
            raise bad_request(f"{where}: unsupported content part {kind!r} (supported: text"
                              f"{', image_url' if images_allowed else ''})", where)
    return "\n".join(texts), images


def parse_messages(messages: Any, config: GatewayConfig) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    turns: list[tuple[str, str, list]] = []  # (role, text, images)
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role") if isinstance(message, Mapping) else None
        if role in ("system", "developer"):
            if config.system_messages == "ignore":
                continue
            raise bad_request(f"{param}: {role} messages are not supported: the model's chat template "
                              "(internvl_zh) has no system turn (the gateway can drop them: "
                              "--system-messages ignore)", param, "unsupported_role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{param}.role must be 'user' or 'assistant' (or 'system'), got {role!r}", f"{param}.role")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise bad_request(f"{param}: messages must alternate user and assistant, starting with user; "
                              f"expected {expected!r} here, got {role!r}", f"{param}.role")
        text, images = _content(message, param, config, images_allowed=role == "user")
        turns.append((role, text, images))
    if not turns or turns[-1][0] != "user":
        raise bad_request("the last message must be a user message", "messages")
    conversation = Conversation(question="")
    questions = []
    for role, text, images in turns:
        if role == "user":
            questions.append(placeholders(len(images)) + text)
            conversation.images.extend(images)
        else:
            conversation.history.append((questions[-1], text))
    conversation.question = questions[-1]
    return conversation


# ---- generation -------------------------------------------------------------------------------------


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad_request(f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}", key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{key}' must be an integer in [{low}, {high}], got {value!r}", key)
    return value


def _declared(body: Mapping[str, Any], key: str, g: Mapping[str, Any]) -> Any:
    value = body[key]
    if g["datatype"] == "BOOL":
        if not isinstance(value, bool):
            raise bad_request(f"'{key}' must be true or false", key)
        return value
    low = g["low"] if g["low"] is not None else -math.inf
    high = g["high"] if g["high"] is not None else math.inf
    integer = g["datatype"] in ("INT32", "UINT64")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or isinstance(value, float) and not math.isfinite(value) or not low <= value <= high \
            or g["low_open"] and value == low:
        kind = "an integer" if integer else "a number"
        bounds = f"{'(' if g['low_open'] else '['}{low}, {high}{')' if high == math.inf else ']'}"
        raise bad_request(f"'{key}' must be {kind} in {bounds}, got {value!r}", key)
    return value if integer else float(value)


# Fields whose value the server cannot honour: refused (400 unsupported_parameter) unless harmless.
COMMON_CHECKS = {
    "n": lambda v: v in (None, 1),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "logprobs": lambda v: v in (None, False),
    "logit_bias": lambda v: not v,
}
CHECKS = {
    CHAT: {**COMMON_CHECKS,
           "top_logprobs": lambda v: v in (None, 0),
           "tools": lambda v: not v,
           "tool_choice": lambda v: v in (None, "none", "auto"),  # with no tools, "auto" is "none"
           "functions": lambda v: not v,
           "function_call": lambda v: v in (None, "none", "auto"),
           "response_format": lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
           "modalities": lambda v: v in (None, ["text"]),
           "audio": lambda v: v is None,
           "prediction": lambda v: v is None},
    COMPLETIONS: {**COMMON_CHECKS,
                  "best_of": lambda v: v in (None, 1),
                  "suffix": lambda v: not v},
}
USED_FIELDS = {"model", "stream", "stream_options", *DECLARED}
ENDPOINT_FIELDS = {CHAT: {"messages", "max_completion_tokens"}, COMPLETIONS: {"prompt", "echo"}}


def check_fields(body: Mapping[str, Any], endpoint: str) -> list[str]:
    """Refuse what the server cannot honour rather than silently ignore it; returns the unknown fields
    (ignored)."""
    checks = CHECKS[endpoint]
    for key, ok in checks.items():
        if key in body and not ok(body[key]):
            raise bad_request(f"'{key}'={body[key]!r} is not supported by this server", key, "unsupported_parameter")
    known = set(checks) | IGNORED_FIELDS | USED_FIELDS | ENDPOINT_FIELDS[endpoint]
    return sorted(set(body) - known)


def generation_inputs(body: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields -> contract inputs; fields left out keep the server's defaults (greedy:
    unlike OpenAI's API, an omitted temperature is the card's do_sample=False, temperature 0)."""
    out: dict[str, Any] = {}
    max_tokens = _integer(body, "max_completion_tokens", 1, INT32_MAX)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, INT32_MAX)
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        out["temperature"] = temperature
    stop = body.get("stop")
    if stop is not None:
        words = [stop] if isinstance(stop, str) else stop
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
        if words:
            out["stop_words"] = words
    for key, g in DECLARED.items():  # the rest as declared: type and range
        if key not in OWN_RULES and body.get(key) is not None:
            out[g["name"]] = _declared(body, key, g)
    return out


# ---- the request ------------------------------------------------------------------------------------


@dataclass
class CompletionRequest:
    model: str
    stream: bool
    include_usage: bool        # stream_options.include_usage: a usage-only chunk before [DONE]
    continuous_usage: bool     # stream_options.continuous_usage_stats: usage in every chunk (vLLM's)
    conversation: Conversation
    generation: dict[str, Any]
    endpoint: str = CHAT
    ignored: list[str] = field(default_factory=list)  # unknown fields, ignored (the app logs them)

    def to_chat_request(self, images: list[bytes]) -> ChatRequest:
        """The SDK request, once remote images are fetched (`images`: bytes, in conversation order)."""
        c = self.conversation
        try:
            return ChatRequest(question=c.question, images=images, history=list(c.history),
                               generation=dict(self.generation), stream=self.stream).validate()
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None


def _model(body: Any, config: GatewayConfig) -> str:
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required", "model")
    if model not in config.served_names:
        raise GatewayError(404, f"The model {model!r} does not exist; this gateway serves {config.model_name!r}",
                           param="model", code="model_not_found")
    return model


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false", name)
    return value


def _request(body: Mapping[str, Any], model: str, endpoint: str, conversation: Conversation,
             generation: dict[str, Any], ignored: list[str]) -> CompletionRequest:
    stream = _flag(body.get("stream"), "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = _flag(options.get("include_usage"), "stream_options.include_usage")
    continuous = _flag(options.get("continuous_usage_stats"), "stream_options.continuous_usage_stats")
    return CompletionRequest(model=model, stream=stream, include_usage=stream and include_usage,
                             continuous_usage=stream and continuous, conversation=conversation,
                             generation=generation, endpoint=endpoint, ignored=ignored)


def parse_chat_completion(body: Any, config: GatewayConfig) -> CompletionRequest:
    """Validate a /v1/chat/completions body; raises GatewayError (400, or 404 for an unknown model)."""
    model = _model(body, config)
    ignored = check_fields(body, CHAT)
    return _request(body, model, CHAT, parse_messages(body.get("messages"), config), generation_inputs(body),
                    ignored)


def parse_completion(body: Any, config: GatewayConfig) -> CompletionRequest:
    """Validate a /v1/completions body: `prompt` (a string, or a list of one) is the card's question;
    `echo` puts it in front of the answer (the contract's exclude_input_in_output=false)."""
    model = _model(body, config)
    ignored = check_fields(body, COMPLETIONS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (or a list of one string; token ids and several prompts "
                          "are not supported)", "prompt")
    generation = generation_inputs(body)
    if _flag(body.get("echo"), "echo"):
        generation["exclude_input_in_output"] = False
    return _request(body, model, COMPLETIONS, Conversation(question=prompt), generation, ignored)
