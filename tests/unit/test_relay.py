"""relay (serving/relay.py), the BLS model's response path, without Triton: the last response carries
the final flag; a client that leaves gets its final at once (never held up by the llm), cancel() is
tried until the llm has found the request, nothing more is sent, the rest is drained; exactly one
final whatever fails, and is_cancelled() is never asked after it."""
from __future__ import annotations

import threading

import pytest

from internvl_serve.serving.relay import ERROR_PREFIX, client_error, relay


class Client:
    """The BLS model's view of its client's sender, and of the llm's side channel."""

    def __init__(self, found_after: int = 1):
        self.sent, self.finished, self.cancels = [], 0, 0
        self.found_after = found_after  # the llm finds the request at this cancel() call
        self.gone = threading.Event()
        self.answered = threading.Event()  # the client's final went out
        self.found = threading.Event()
        self.asked_after_final = []

    def send(self, response, final):
        self._after_final("send")
        self.sent.append((response, final))
        if final:
            self.answered.set()

    def finish(self):
        self._after_final("finish")
        self.finished += 1
        self.answered.set()

    def is_cancelled(self):
        self._after_final("is_cancelled")
        return self.gone.is_set()

    def cancel(self):
        self.cancels += 1
        if self.cancels >= self.found_after:
            self.found.set()
            return True
        return False

    def _after_final(self, what):
        if self.answered.is_set():
            self.asked_after_final.append(what)


def run(responses, client):
    return relay(responses, send=client.send, finish=client.finish, is_cancelled=client.is_cancelled,
                 cancel=client.cancel, poll_s=0.01)


def test_every_response_is_forwarded_and_the_last_one_is_final():
    client = Client()
    assert run(iter(["a", "b", "c"]), client) == "done"
    assert client.sent == [("a", False), ("b", False), ("c", True)]
    assert client.finished == 0 and client.cancels == 0 and not client.asked_after_final


def test_no_response_finishes_with_an_empty_final():
    client = Client()
    assert run(iter([]), client) == "done"
    assert client.sent == [] and client.finished == 1


def test_a_client_that_leaves_is_answered_before_the_llm_stops_and_the_generation_is_aborted_once():
    """Finding (issue #14): a stream left early on internvl_chat_bls once hung its client. The client's
    final no longer waits for the llm: here the llm goes on sending until the relay has both ended the
    client's request and found the generation to abort."""
    client = Client()
    drained = []

    def generation():
        yield "a"
        yield "b"
        client.gone.set()                       # the client leaves while the llm generates
        assert client.answered.wait(10)         # ... and gets its final while the llm still runs
        assert client.found.wait(10)            # ... and the relay asks the llm to abort
        for r in ("c", "d", "cancelled"):       # what the llm still sends before it ends
            drained.append(r)
            yield r

    assert run(generation(), client) == "cancelled"
    assert drained == ["c", "d", "cancelled"]
    assert client.cancels == 1 and client.finished == 1
    assert all(r in ("a", "b") for r, _ in client.sent) and not any(final for _, final in client.sent)
    assert not client.asked_after_final


def test_cancel_is_tried_again_until_the_llm_has_the_request():
    """The client may leave before the llm registered the request: a cancel() that finds nothing is
    repeated while the llm's stream goes on."""
    client = Client(found_after=3)

    def generation():
        client.gone.set()
        assert client.found.wait(10)
        yield "cancelled"

    assert run(generation(), client) == "cancelled"
    assert client.cancels == 3 and client.finished == 1 and client.sent == []


def test_an_llm_error_after_the_client_left_does_not_reach_it():
    client = Client()

    def generation():
        client.gone.set()
        assert client.found.wait(10)
        raise RuntimeError("llm: aborted")
        yield  # a generator

    assert run(generation(), client) == "cancelled"
    assert client.finished == 1


def test_an_llm_error_while_the_client_waits_is_raised_and_the_generation_stopped():
    client = Client()

    def generation():
        yield "a"
        raise RuntimeError("llm: generation failed")

    with pytest.raises(RuntimeError, match="generation failed"):
        run(generation(), client)
    assert client.sent == [] and client.finished == 0  # the caller sends the error as the final
    assert client.cancels == 1  # nobody reads the llm's stream any more


def test_a_sender_that_cannot_be_asked_counts_as_gone():
    client = Client()

    def broken():
        raise RuntimeError("stub gone")

    def generation():
        assert client.found.wait(10)
        yield "cancelled"

    assert relay(generation(), send=client.send, finish=client.finish, is_cancelled=broken,
                 cancel=client.cancel, poll_s=0.01) == "cancelled"
    assert client.finished == 1 and client.sent == []


def test_errors_read_like_the_ensembles():
    assert client_error("input 'max_tokens': must be >= 1") == \
        "in ensemble 'internvl_chat_bls', input 'max_tokens': must be >= 1"
    assert ERROR_PREFIX.startswith("in ensemble ")
