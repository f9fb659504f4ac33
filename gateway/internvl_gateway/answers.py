"""The OpenAI answer objects: whole answers, stream chunks and usage, for chat and text completions.
No web framework, no network.

Owns: the JSON shapes of `chat.completion` / `chat.completion.chunk` (choices with `message` / `delta`)
and `text_completion` (choices with `text`, also the chunks' object name), ids, finish reasons and
`usage`. Does not own: parsing requests (translate.py) or sending them (app.py).
"""

from __future__ import annotations

import time
import uuid

from .translate import CHAT

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}  # OpenAI knows no "cancelled"


def new_id(endpoint: str) -> str:
    return f"chatcmpl-{uuid.uuid4().hex}" if endpoint == CHAT else f"cmpl-{uuid.uuid4().hex}"


def usage(num_input_tokens: int | None, num_output_tokens: int | None) -> dict:
    prompt, completion = int(num_input_tokens or 0), int(num_output_tokens or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "", "stop")


def completion(endpoint: str, completion_id: str, model: str, text: str, reason: str | None,
               num_input_tokens: int | None, num_output_tokens: int | None, created: int | None = None) -> dict:
    """The whole answer (stream=false)."""
    if endpoint == CHAT:
        obj, choice = "chat.completion", {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        obj, choice = "text_completion", {"index": 0, "text": text}
    choice.update(finish_reason=finish_reason(reason), logprobs=None)
    return {"id": completion_id, "object": obj, "created": created or int(time.time()), "model": model,
            "choices": [choice], "usage": usage(num_input_tokens, num_output_tokens)}


def chunk(endpoint: str, completion_id: str, model: str, created: int, *, text: str | None = None,
          role: bool = False, reason: str | None = None, usage_: dict | None = None,
          choices: bool = True) -> dict:
    """One stream chunk: a text delta (chat: `role` for the first chunk), or the finish reason; with
    usage_ it also carries `usage` (continuous_usage_stats); choices=False: the usage-only last chunk."""
    chat = endpoint == CHAT
    body = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": []}
    if choices:
        reason_ = None if reason is None else finish_reason(reason)
        if chat:
            delta = {"role": "assistant", "content": text or ""} if role else \
                {} if text is None else {"content": text}
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason_}]
        else:
            body["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason_}]
    if usage_ is not None:
        body["usage"] = usage_
    return body
