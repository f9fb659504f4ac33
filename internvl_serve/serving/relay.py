"""Relaying the llm model's responses to a client of `internvl_chat_bls`, and cancelling the
generation, and only it, when that client leaves.

The `internvl_chat_bls` model runs preprocess -> vision -> llm itself (Triton BLS) instead of as an
ensemble, so its own request sees the client's cancellation or disconnection (`is_cancelled()`), which
Triton 2.51's ensemble never passes to a running step. It owns its llm request: it sends it with a
cancel key of its own, and `cancel` presents that key on the llm's side channel (python_backend r24.10
has no cancel() on a BLS response iterator), so a leaving client aborts its own generation and no other.

`relay` forwards the llm's responses, holding one back so that the last one carries the final flag (as
the ensemble's do). A watcher polls `is_cancelled` while the generation runs; once the client is gone
it ends the client's request at once (its final is never held up by the llm), then calls `cancel`
until the llm has found the request (it may not have registered it yet) or its stream has ended; the
rest of the llm's responses are drained. Exactly one final goes to the client, whatever fails, and
is_cancelled() is never asked after it (Triton 2.51 frees the response factory with the final).

Triton-free: the adapter passes callables over pb_utils objects; tests pass fakes.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, TypeVar

from internvl_serve.serving.contract import ENSEMBLE_BLS

R = TypeVar("R")

# internvl_chat_bls's errors read like the ensemble's ("in ensemble 'internvl_chat', <the step's
# message>"), so that every client maps them to the same typed errors (client/internvl_client/errors.py).
ERROR_PREFIX = f"in ensemble '{ENSEMBLE_BLS}', "


def client_error(message: str) -> str:
    """A step's (or the request's own) error as internvl_chat_bls's client sees it."""
    return ERROR_PREFIX + message


def relay(responses: Iterable[R], *, send: Callable[[R, bool], None], finish: Callable[[], None],
          is_cancelled: Callable[[], bool], cancel: Callable[[], bool], poll_s: float = 0.05) -> str:
    """Forward `responses` (data responses only; an error raised by the iterator is re-raised unless
    the client has already been answered) with send(response, final); finish() ends the client's
    request without data. cancel() returns True once the llm found the request to abort.
    Returns "done", or "cancelled" when the client left."""
    lock = threading.Lock()  # serialises the client's sender: sends, is_cancelled(), the final
    state = {"closed": False}  # the client's final was sent
    gone = threading.Event()
    ended = threading.Event()  # the llm's stream has ended

    def close_without_data() -> bool:
        with lock:
            if state["closed"]:
                return False
            state["closed"] = True
            finish()
            return True

    def watch():
        while not ended.wait(poll_s):
            with lock:
                if state["closed"]:
                    return
                try:
                    left = is_cancelled()
                except Exception:  # noqa: BLE001 - a sender that cannot be asked is gone
                    left = True
            if left:
                break
        else:
            return
        gone.set()
        try:
            close_without_data()  # the client is answered now, not after the llm has stopped
        except Exception:  # noqa: BLE001 - the client is gone; its sender may refuse
            pass
        while not ended.is_set():
            try:
                if cancel():
                    return
            except Exception:  # noqa: BLE001 - try again while the generation runs
                pass
            ended.wait(poll_s)

    watcher = threading.Thread(target=watch, name="relay-cancel-watch", daemon=True)
    watcher.start()
    held = None
    try:
        for response in responses:
            if gone.is_set():
                continue  # drain: the llm ends the aborted request shortly
            with lock:
                if held is not None and not state["closed"]:
                    send(held, False)
            held = response
    except BaseException:
        ended.set()
        watcher.join()
        if gone.is_set():
            return "cancelled"  # the client was answered; the llm's end does not concern it
        try:
            cancel()  # nobody reads the llm's stream any more: stop it (not found if it had ended)
        except Exception:  # noqa: BLE001
            pass
        raise
    ended.set()
    watcher.join()
    if gone.is_set():
        return "cancelled"
    with lock:
        if state["closed"]:
            return "cancelled"
        state["closed"] = True
        if held is not None:
            send(held, True)
        else:
            finish()
    return "done"
