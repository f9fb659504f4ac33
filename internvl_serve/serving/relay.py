"""Relaying the llm model's responses to a client, aborting the generation when the client leaves.

The `internvl_chat_bls` model runs preprocess -> vision -> llm itself (Triton BLS) instead of as an
ensemble, so its own request sees the client's cancellation or disconnection (`is_cancelled()`), which
Triton 2.51's ensemble never passes to a running step. `relay` forwards the llm's responses, holding
one back so that the last one carries the final flag (as the ensemble's do); a watcher polls
`is_cancelled` while the generation runs and, once it is true, calls `cancel` (the llm model's
cancel_request_id side channel) and stops forwarding; the rest of the llm's responses are drained.

Triton-free: the adapter passes callables over pb_utils objects; tests pass fakes.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, TypeVar

R = TypeVar("R")


def relay(responses: Iterable[R], *, send: Callable[[R, bool], None], is_cancelled: Callable[[], bool],
          cancel: Callable[[], None], finish: Callable[[], None], poll_s: float = 0.05) -> str:
    """Forward `responses` (data responses only; errors are the caller's) with send(response, final);
    finish() ends the client's request without data when none is left to carry the flag.
    Returns "done", or "cancelled" when the client left (cancel() was called once)."""
    cancelled = threading.Event()
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_s):
            try:
                gone = is_cancelled()
            except Exception:  # noqa: BLE001 - a sender that cannot be asked is gone
                gone = True
            if gone:
                cancelled.set()
                try:
                    cancel()
                finally:
                    return

    watcher = threading.Thread(target=watch, name="relay-cancel-watch", daemon=True)
    watcher.start()
    held = None
    try:
        for response in responses:
            if cancelled.is_set():
                continue  # drain: the llm ends the aborted request shortly
            if held is not None:
                send(held, False)
            held = response
    finally:
        stop.set()
        watcher.join()
    if cancelled.is_set():
        finish()
        return "cancelled"
    if held is not None:
        send(held, True)
    else:
        finish()
    return "done"
