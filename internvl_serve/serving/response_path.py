"""ResponsePath: the engine's outputs go to their clients on sender threads, never on the engine thread.

Owns: one mailbox per open request and a small pool of sender threads. The engine thread only
post()s an output into its request's mailbox (a list append under a lock: it never waits for a client).
A request with something in its mailbox is queued for the senders once; a sender takes ALL the outputs
waiting in that mailbox and hands them, in order, to the request's handler in one call, which
detokenizes them and sends one response for the lot. So when a client is slow (its sink's send()
blocks), its outputs pile up in its mailbox and are coalesced into the next response: never dropped,
never reordered (one sender at a time per request), the final response last (the handler closes the
request with it; later posts are dropped). Other requests keep being served by the other senders.

Does not own: what a response contains (serving/llm.py's handler), the text and where it ends
(engine/stopping.py's AnswerText, which the handler calls), the engine.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)

# handler(outputs in order) -> True when the request is done (its final response was sent)
Handler = Callable[[list[Any]], bool]


class _Mailbox:
    __slots__ = ("key", "handler", "items", "queued", "closed")

    def __init__(self, key: str, handler: Handler):
        self.key, self.handler = key, handler
        self.items: list[Any] = []
        self.queued = False   # in the ready queue or being handled by a sender
        self.closed = False


class ResponsePath:
    def __init__(self, *, num_senders: int = 4, name: str = "llm-sender"):
        if num_senders < 1:
            raise ValueError(f"num_senders must be >= 1, got {num_senders}")
        self._cv = threading.Condition()
        self._boxes: dict[str, _Mailbox] = {}
        self._ready: deque[_Mailbox] = deque()
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(num_senders)]
        for t in self._threads:
            t.start()

    def open(self, key: str, handler: Handler) -> None:
        with self._cv:
            if key in self._boxes:
                raise ValueError(f"{key!r} is already open")
            self._boxes[key] = _Mailbox(key, handler)

    def post(self, key: str, item: Any) -> None:
        """Queue one output for `key` (any thread; never blocks on a sink). Dropped once `key` closed."""
        with self._cv:
            box = self._boxes.get(key)
            if box is None or box.closed:
                return
            box.items.append(item)
            if not box.queued:
                box.queued = True
                self._ready.append(box)
                self._cv.notify()

    def close(self, key: str) -> None:
        """Forget `key` (its handler is not called again)."""
        with self._cv:
            box = self._boxes.pop(key, None)
            if box is not None:
                box.closed = True
                box.items.clear()

    @property
    def num_open(self) -> int:
        with self._cv:
            return len(self._boxes)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Deliver everything already posted, then stop the senders."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._ready and not self._stopping:
                    self._cv.wait()
                if not self._ready:  # stopping and nothing left to deliver
                    return
                box = self._ready.popleft()
                items, box.items = box.items, []
            done = False
            if items and not box.closed:
                try:
                    done = bool(box.handler(items))
                except Exception:
                    log.exception("response handler of %s raised", box.key)
                    done = True
            with self._cv:
                if done:
                    box.closed = True
                    box.items.clear()
                    if self._boxes.get(box.key) is box:
                        del self._boxes[box.key]
                if box.items and not box.closed:
                    self._ready.append(box)  # more arrived while it was being sent: coalesced next
                    self._cv.notify()
                else:
                    box.queued = False
