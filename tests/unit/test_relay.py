"""relay (serving/relay.py), the BLS model's response path, without Triton: the last response carries
the final flag; a client that leaves gets cancel() once, nothing more is sent, the rest is drained."""
from __future__ import annotations

import threading

from internvl_serve.serving.relay import relay


class Client:
    def __init__(self):
        self.sent, self.finished, self.cancels = [], 0, 0
        self.gone = threading.Event()
        self.cancelled = threading.Event()

    def send(self, response, final):
        self.sent.append((response, final))

    def finish(self):
        self.finished += 1

    def cancel(self):
        self.cancels += 1
        self.cancelled.set()


def run(responses, client):
    return relay(responses, send=client.send, is_cancelled=client.gone.is_set, cancel=client.cancel,
                 finish=client.finish, poll_s=0.01)


def test_every_response_is_forwarded_and_the_last_one_is_final():
    client = Client()
    assert run(iter(["a", "b", "c"]), client) == "done"
    assert client.sent == [("a", False), ("b", False), ("c", True)]
    assert client.finished == 0 and client.cancels == 0


def test_no_response_finishes_with_an_empty_final():
    client = Client()
    assert run(iter([]), client) == "done"
    assert client.sent == [] and client.finished == 1


def test_a_client_that_leaves_aborts_the_generation_once_and_gets_nothing_more():
    client = Client()
    drained = []

    def generation():
        yield "a"
        yield "b"
        client.gone.set()                       # the client leaves while the llm generates
        assert client.cancelled.wait(10)        # ... and the relay asks the llm to abort
        for r in ("c", "d", "cancelled"):       # what the llm still sends before it ends
            drained.append(r)
            yield r

    assert run(generation(), client) == "cancelled"
    assert drained == ["c", "d", "cancelled"]
    assert client.cancels == 1 and client.finished == 1
    assert all(r in ("a", "b") for r, _ in client.sent) and not any(final for _, final in client.sent)
