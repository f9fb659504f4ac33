"""Helpers of the robustness tests: one request per gRPC stream with request parameters and raw tensors
(any datatype or shape, which the SDK would refuse client-side), healthy background traffic checked
against the card's answers, the server's Python stubs, and images made to break decoders.

Every wait has a deadline and notices a dead server (failing with its log's tail) instead of hanging.
"""
from __future__ import annotations

import io
import queue
import shutil
import struct
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_client import (Answer, image_bytes, in_parallel, make_echo_repository, make_inputs,  # noqa: E402,F401
                        mjpeg_avi, read_stream)  # (re-exported)

from internvl_serve.serving.contract import ENSEMBLE  # noqa: E402
from internvl_serve.serving.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer  # noqa: E402

MAX_TOKENS = 12  # short answers keep the modules fast on 2 cores


# ---- servers --------------------------------------------------------------------------------------------


@contextmanager
def running_server(checkpoint: Path, folder: Path, **kwargs):
    """A TritonServer logging to folder/server.log; stopped (with its stubs) whatever happens."""
    kwargs.setdefault("exit_timeout_s", 5)
    kwargs.setdefault("ready_timeout_s", 300)
    with TritonServer(checkpoint, log_file=folder / "server.log", **kwargs) as server:
        yield server


def repository_copy(folder: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """A copy of model_repository/ with text replacements {model: (old, new)} in config.pbtxt files."""
    target = folder / "model_repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, target, ignore=shutil.ignore_patterns("__pycache__"))
    for model, (old, new) in (edits or {}).items():
        config = target / model / "config.pbtxt"
        text = config.read_text()
        assert old in text, f"{model}/config.pbtxt has no {old!r}"
        config.write_text(text.replace(old, new))
    return target


def raw_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    """A tensor with exactly this datatype and shape (BYTES: an object array of bytes)."""
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class Timed(Answer):
    started: float = 0.0
    ended: float = 0.0
    responses: int = 0  # responses received, data or not


def send(server, inputs, *, parameters: dict | None = None, timeout_s: float = 120.0,
         request_id: str = "", on_first=None, server_may_exit: bool = False, model: str = ENSEMBLE,
         direct: bool | None = None) -> Timed:
    """One request on its own gRPC stream; returns at its final response or its error. A server that
    dies (unless server_may_exit: then the client's own error is awaited), or a request without an end
    within timeout_s, fails the test (the stream is cancelled)."""
    # direct: to tritonserver itself, past the launcher's gRPC guard, which serves only the chat models
    # (docs/security.md); by default the steps are called there (each defends itself as if exposed)
    direct = model != ENSEMBLE if direct is None else direct
    url = getattr(server, "triton_grpc_url", server.grpc_url) if direct else server.grpc_url
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    answer = Timed(started=time.monotonic())

    def counted(error) -> None:
        answer.responses += 1
        if on_first is not None and error is None and answer.responses == 1:
            on_first()  # the first data response: the request is streaming

    try:
        client.async_stream_infer(model, inputs, request_id=request_id, parameters=parameters,
                                  enable_empty_final_response=True)
        return read_stream(server, responses, answer, request_id=request_id, timeout_s=timeout_s, poll_s=0.5,
                           server_may_exit=server_may_exit, on_response=counted)
    finally:
        answer.ended = time.monotonic()
        client.stop_stream(cancel_requests=True)
        client.close()


def chat_inputs(question: str, images=(), **extra):
    values = {"text_input": question, "max_tokens": MAX_TOKENS, "stream": True, **extra}
    if images:
        values["images"] = list(images)
    return make_inputs(**values)


def assert_answer(answer: Answer, expected: str) -> None:
    assert answer.error is None, answer.error
    assert answer.text == expected
    assert answer.finals == 1
    assert answer.finish_reasons[-1] in ("stop", "length")


# ---- healthy background traffic ----------------------------------------------------------------------


@dataclass
class Traffic:
    """Threads that send healthy requests back to back and check every answer against its expected text.

    `requests`: (name, inputs factory, expected text). intervals: (start, end) of every request sent."""

    server: object
    requests: list
    threads: int = 3
    intervals: list = field(default_factory=list)
    latest_start: dict = field(default_factory=dict)  # worker -> start of its last answered request
    done: list = field(default_factory=list)  # names of requests answered exactly
    failures: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list = field(default_factory=list)
    _lock: threading.Condition = field(default_factory=threading.Condition)  # notified at every answer

    def start(self) -> "Traffic":
        for w in range(self.threads):
            t = threading.Thread(target=self._loop, args=(w,), name=f"healthy-{w}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _loop(self, worker: int) -> None:
        i = worker
        while not self._stop.is_set():
            name, make, expected = self.requests[i % len(self.requests)]
            i += 1
            try:
                answer = send(self.server, make(), request_id=f"healthy-{worker}-{i}")
            except BaseException as e:  # pytest.fail raises outside the test thread: keep it
                with self._lock:
                    self.failures.append(f"{name}: {type(e).__name__}: {e}")
                    self._lock.notify_all()
                return
            with self._lock:
                self.intervals.append((answer.started, answer.ended))
                self.latest_start[worker] = answer.started
                if answer.error is not None or answer.text != expected or answer.finals != 1:
                    self.failures.append(f"{name}: error={answer.error!r} text={answer.text!r} "
                                         f"expected={expected!r} finals={answer.finals}")
                else:
                    self.done.append(name)
                self._lock.notify_all()

    def overlapped(self, start: float, end: float) -> bool:
        """Whether a healthy request was in flight at some time in [start, end]. Waits, however long the
        server takes, until one such request has its answer, or until every worker has an answer to a
        request it started after `end` (then every earlier request is known), or a request fails."""
        def overlap():
            return any(s <= end and e >= start for s, e in self.intervals)

        def settled():
            return (self.failures or overlap() or len(self.latest_start) == self.threads
                    and all(s > end for s in self.latest_start.values()))

        with self._lock:
            self._lock.wait_for(settled)
            return overlap()

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout_s)
        assert not any(t.is_alive() for t in self._workers), "a healthy request never ended"


# ---- the server's Python stubs ------------------------------------------------------------------------


def stub_pid(server, instance: str) -> int:
    """The pid of model instance `instance`'s stub (e.g. 'llm_0_0') of THIS server (its child)."""
    stubs = {name: pid for pid, name in server.stub_processes().items()}
    assert instance in stubs, f"no stub {instance!r} under tritonserver {server.pid}: {stubs}"
    return stubs[instance]


# ---- images --------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a tiny IDAT (a decompression bomb's
    header: nothing may be allocated from it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"tEXt", b"c\0" + payload)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def animated(fmt: str, frames) -> bytes:
    buffer = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return buffer.getvalue()


def noise_frames(seed: int, n: int, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# ---- metrics ---------------------------------------------------------------------------------------------


def metric(server, name: str) -> float:
    """The sum over labels of metric `name` on the server's Prometheus endpoint."""
    import requests

    text = requests.get(server.metrics_url, timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    assert values, f"no metric {name} at {server.metrics_url}"
    return sum(values)


def wait_until(server, condition, *, timeout_s: float, what: str) -> float:
    """Poll `condition` (state only visible from outside: metrics, /proc) until it holds; returns the
    seconds it took. Fails with the log's tail on timeout or if the server died."""
    started = time.monotonic()
    while not condition():
        if not server.is_running():
            pytest.fail(f"tritonserver died while waiting for {what}; log:\n{server.log_tail(60)}")
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}; log:\n{server.log_tail(30)}")
        time.sleep(0.1)  # polling an external state, not synchronising
    return time.monotonic() - started
