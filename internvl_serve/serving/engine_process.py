"""The llm engine in a process of its own (the llm model's `engine_process`: the default when the engine is
on one GPU, serving/llm_engine.engine_in_own_process).

Why: in the llm Triton stub the engine thread shares one interpreter lock with the response senders.
On an H100 at 64 streams the senders held it 26 % of the time (two thirds of that inside Triton's Python
response API), and the engine thread, which gives the lock up at every torch call, did 16-23 ms of host
work per step against 5.5 ms with the same service outside Triton (bench/results/h100-2026-12-06/,
7077baf/ and 937e289/). In a process of its own the engine has an interpreter to itself; the stub keeps
the parsing, the response path (detokenizing, Triton's sends) and the cancellation side channel.

`EngineProcess` is the stub's side and has EngineThread's interface (submit / abort / shutdown /
num_unfinished / busy_s / encoder_wait_s) plus `engine`, an `EngineState` with the attributes the metrics
read (scheduler and allocator figures, steps, device wait), refreshed by the engine process every
STATE_INTERVAL_S. Requests are checked here, at submit, against the limits the engine process reported
when it was ready (Request.validate: the same checks, the same errors), and the bound on pending requests
is kept here, so submit() never waits for the engine process.

The engine process (`python -m internvl_serve.serving.engine_process`, started by EngineProcess) builds
the engine as LLMService does in-process (serving/llm_engine.build_engine), runs an EngineThread, and talks over
a socket pair with multiprocessing.connection framing (pickled tuples):

    stub -> engine: ("submit", Request without its rows, its image positions (checked here), rows' shape
                    and torch dtype name or None) then, with rows, their bytes as one message, in the
                    engine's dtype where it is narrower (host_copy.travel_dtype: bfloat16 on a GPU, half
                    of float32's bytes); ("abort", request id, reason); ("stop",)
    engine -> stub: ("ready", limits and load facts) once; ("outputs", [RequestOutput, ...]) as steps
                    deliver them (one message for all that piled up); ("state", figures) every
                    STATE_INTERVAL_S; ("broken", message) when a tensor-parallel worker died

The stub's end of the pair asks for a send buffer of SEND_BUFFER_BYTES (widen_send_buffer), so that a
submit writes one image's rows in one go rather than in buffer-fulls that each wait for the engine process.

When the engine process exits, or the connection breaks, every request still open gets a final error
output and further submits raise (LLMService then refuses them as after a worker's death). stop() lets the
engine process end its requests with errors, as EngineThread.shutdown does, and waits for it.

Owns: the protocol, both ends. Does not own: building the engine (serving/llm_engine.py), the response path.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from internvl_serve.engine.engine import RequestCallbacks
from internvl_serve.engine.errors import EngineError
from internvl_serve.engine.host_copy import fits_page_locked, serial_copy_, travel_dtype
from internvl_serve.engine.request import RequestOutput
from internvl_serve.engine.tp_worker import python_executable
from internvl_serve.hostbuf import HostBuffers

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_INTERVAL_S = 0.25
FD_ENV = "INTERNVL_ENGINE_FD"  # the engine process's end of the socket pair
# The stub's send buffer on the socket pair: room for a request's image rows (one V1-1 image is 2.6 MB in
# bfloat16) so that submit() writes them in one go. With the kernel's default (~208 KB) the rows cross in a
# dozen buffer-fulls, each waiting for the engine process to be scheduled and to take its interpreter lock
# (bench/rows_handoff.py --socket-buffer 0 against the default, on a loaded host).
SEND_BUFFER_BYTES = 8 << 20
SO_SNDBUFFORCE = 32  # Linux: SO_SNDBUF past net.core.wmem_max, for a process with CAP_NET_ADMIN (socket lacks the name)

log = logging.getLogger(__name__)


@dataclass
class EngineState:
    """What the metrics read of an engine (metrics.engine_gauges, llm_values), as last reported."""

    scheduler: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(
        num_waiting=0, num_running=0, num_preemptions=0))
    allocator: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(num_blocks=0, num_free=0))
    num_steps: int = 0
    device_wait_s: float = 0.0

    def stats(self) -> dict:
        """LLMEngine.stats()'s figures that the engine process reports."""
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "num_free_blocks": self.allocator.num_free, "num_blocks": self.allocator.num_blocks,
                "num_preemptions": self.scheduler.num_preemptions}

    def update(self, values: dict) -> None:
        self.scheduler = SimpleNamespace(**values["scheduler"])
        self.allocator = SimpleNamespace(**values["allocator"])
        self.num_steps, self.device_wait_s = values["num_steps"], values["device_wait_s"]


def rows_to_send(rows: torch.Tensor, engine_dtype: torch.dtype, staging: HostBuffers) -> torch.Tensor:
    """A request's image rows as they go to the engine process: contiguous, in travel_dtype, converted
    into the reused staging buffer when they are not already (no fresh host buffer per request: under the
    stubs' malloc setting each would fault in anew, serving/heap.py), on this thread alone (serial_copy_).
    Valid until the next call."""
    rows = rows.detach().cpu()
    dtype = travel_dtype(rows.dtype, engine_dtype)
    if rows.dtype == dtype and rows.is_contiguous():
        return rows
    return serial_copy_(staging.get("rows", tuple(rows.shape), dtype), rows)


def widen_send_buffer(sock: socket.socket, nbytes: int = SEND_BUFFER_BYTES) -> int:
    """Ask for a send buffer of `nbytes` on `sock`: past the system's cap (net.core.wmem_max) where the
    process may (SO_SNDBUFFORCE), else up to it (SO_SNDBUF). Returns the size the kernel granted (it
    doubles the request for its bookkeeping); a refusal leaves the buffer as it was."""
    options = ((SO_SNDBUFFORCE,) if sys.platform == "linux" else ()) + (socket.SO_SNDBUF,)
    for option in options:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, nbytes)
            break
        except OSError:
            continue
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor of any dtype (bfloat16 included), as a uint8 array (no copy;
    flat first: a tensor of 0 rows has strides no byte view takes)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def rows_header(rows: torch.Tensor) -> tuple:
    """What a submit message says of its rows: their shape and torch dtype name (receive_rows reads it)."""
    return tuple(rows.shape), str(rows.dtype).removeprefix("torch.")


def receive_rows(conn: Connection, header: tuple, pin: bool) -> torch.Tensor:
    """The rows rows_header described, straight from the socket into a fresh buffer: page-locked when `pin`
    (the engine on CUDA) and within the bound on waiting rows (host_copy.fits_page_locked)."""
    shape, dtype = header[0], getattr(torch, header[1])
    rows = torch.empty(shape, dtype=dtype, pin_memory=pin and fits_page_locked(int(np.prod(shape)) * dtype.itemsize))
    conn.recv_bytes_into(as_bytes(rows))
    return rows


def state_of(engine, thread) -> dict:
    s, a = engine.scheduler, engine.allocator
    return {"scheduler": {"num_waiting": s.num_waiting, "num_running": s.num_running,
                          "num_preemptions": s.num_preemptions},
            "allocator": {"num_blocks": a.num_blocks, "num_free": a.num_free},
            "num_steps": engine.num_steps, "device_wait_s": engine.device_wait_s,
            "busy_s": thread.busy_s, "encoder_wait_s": thread.encoder_wait_s}


class EngineProcess:
    """The stub's handle on the engine process (see the module docstring)."""

    def __init__(self, spec: dict, *, max_pending: int | None = None,
                 on_broken: Callable[[str], None] | None = None, env: dict | None = None):
        """spec: what serving/llm_engine.build_engine takes (JSON-able). on_broken(message): the engine process
        cannot go on (it exited, or reported a dead tensor-parallel worker); called once, from the
        receiver thread, after every open request got its error output."""
        self._on_broken = on_broken
        self._lock = threading.Lock()  # _broken, _stopping
        self._callbacks = RequestCallbacks(max_pending)  # accepted and not yet finished
        self._broken: str | None = None
        self._stopping = False
        self.engine = EngineState()
        self.busy_s = 0.0
        self.encoder_wait_s = 0.0
        ours, theirs = socket.socketpair()
        self.send_buffer_bytes = widen_send_buffer(ours)  # the rows of a submit in one write
        self._conn = Connection(ours.detach())
        child_env = dict(os.environ if env is None else env)
        child_env[FD_ENV] = str(theirs.fileno())
        child_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.process = subprocess.Popen([python_executable(), "-m", "internvl_serve.serving.engine_process", json.dumps(spec)],
                                        env=child_env, pass_fds=(theirs.fileno(),))
        theirs.close()
        self._send_lock = threading.Lock()
        self._rows_dtype = getattr(torch, spec["dtype"])  # the engine's: image rows travel in it where narrower
        self._staging = HostBuffers()  # rows_to_send's buffer, used under _send_lock
        try:
            kind, self.info = self._conn.recv()  # ("ready", info): the weights are loaded, the engine runs
        except (EOFError, OSError):
            self.process.wait()
            raise RuntimeError(f"the engine process exited with {self.process.returncode} before it was ready "
                               "(its log says why)") from None
        assert kind == "ready", kind
        self.limits = self.info["limits"]
        self._receiver = threading.Thread(target=self._receive, name="llm-engine-receiver", daemon=True)
        self._receiver.start()

    # -- EngineThread's interface -------------------------------------------------------------------
    def validate(self, request) -> np.ndarray:
        """Request.validate against the engine's limits (raises InvalidRequest), as the engine would; the
        prompt positions that take image rows."""
        return request.validate(**self.limits)

    def submit(self, request, callback: Callable) -> None:
        positions = self.validate(request)  # checked once, here: the engine process does not again
        rows = request.image_embeds
        with self._lock:
            if self._broken or self._stopping:
                raise EngineError(self._broken or "the engine is shut down")
        self._callbacks.admit(request.request_id, callback)
        try:
            with self._send_lock:  # the two messages of one submit stay together (and the staging buffer)
                if rows is not None:
                    rows = rows_to_send(rows, self._rows_dtype, self._staging)
                self._conn.send(("submit", replace(request, image_embeds=None), positions,
                                 None if rows is None else rows_header(rows)))
                if rows is not None:
                    self._conn.send_bytes(as_bytes(rows))
        except OSError as e:  # the engine process is gone: the receiver fails the open requests
            if self._callbacks.forget(request.request_id):
                raise EngineError(f"the engine process is gone: {e}") from None
            # else the receiver already gave this request its final error output: one final, not two

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._post(("abort", request_id, reason))

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """The engine process ends what is open with error outputs (delivered), then exits."""
        with self._lock:
            self._stopping = True
        self._post(("stop",))
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._receiver.join(timeout)
        self._conn.close()

    @property
    def num_unfinished(self) -> int:
        return len(self._callbacks)

    # -- the receiver thread ------------------------------------------------------------------------
    def _post(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            pass  # gone: the receiver has failed (or will fail) everything open

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "outputs":
                self._callbacks.deliver(message[1])
            elif kind == "state":
                self.engine.update(message[1])
                self.busy_s, self.encoder_wait_s = message[1]["busy_s"], message[1]["encoder_wait_s"]
            elif kind == "broken":  # a tensor-parallel worker died; the process runs on until stopped
                self._break(message[1])
        code = self.process.wait()  # the connection ended: the engine process is ending
        if self._stopping:
            self._callbacks.fail_all("EngineError: the engine shut down")
        else:
            self._break(f"the engine process exited with {code}")

    def _break(self, reason: str) -> None:
        """The engine cannot go on: fail what is open, refuse what comes, tell the owner (once)."""
        with self._lock:
            first, self._broken = self._broken is None, self._broken or reason
        self._callbacks.fail_all(f"EngineError: {reason}")
        if first and self._on_broken is not None:
            self._on_broken(reason)


# -- the engine process ---------------------------------------------------------------------------------

class _Outbox:
    """The engine process's one writer: outputs as they come (one message for all that piled up), and
    the engine's state every STATE_INTERVAL_S."""

    def __init__(self, conn: Connection, state: Callable[[], dict]):
        self._conn, self._state = conn, state
        self._cv = threading.Condition()
        self._items: deque = deque()
        self._extra: list[tuple] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-outbox", daemon=True)
        self._thread.start()

    def put(self, output) -> None:
        with self._cv:
            self._items.append(output)
            self._cv.notify()

    def send(self, message: tuple) -> None:
        with self._cv:
            self._extra.append(message)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        next_state = time.monotonic()
        while True:
            with self._cv:
                while not (self._items or self._extra or self._closed):
                    if not self._cv.wait(max(0.0, next_state - time.monotonic())):
                        break
                items, self._items = list(self._items), deque()
                extra, self._extra = self._extra, []
                closed = self._closed
            try:
                if items:
                    self._conn.send(("outputs", items))
                if time.monotonic() >= next_state or closed:
                    self._conn.send(("state", self._state()))
                    next_state = time.monotonic() + STATE_INTERVAL_S
                for message in extra:
                    self._conn.send(message)
            except OSError:
                return  # the stub is gone
            if closed and not items:
                return


def serve(conn: Connection, engine, thread, outbox: _Outbox) -> None:
    """Run commands from the stub until ("stop",) or the connection ends; then end what is open with
    errors (EngineThread.shutdown), deliver everything, and return."""
    pin = torch.device(engine.runner.device).type == "cuda"
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        kind = message[0]
        if kind == "submit":
            request, positions, rows = message[1:]
            try:
                if rows is not None:
                    request.image_embeds = receive_rows(conn, rows, pin)
                thread.submit(request, outbox.put, positions)
            except (EOFError, OSError):
                break
            except Exception as e:  # the stub checked it; anything left ends the request here
                outbox.put(RequestOutput(request.request_id, [], "", True, "abort", len(request.prompt_token_ids),
                                         0, 0, f"{type(e).__name__}: {e}"))
        elif kind == "abort":
            thread.abort(message[1], message[2])
        elif kind == "stop":
            break
    thread.shutdown()
    outbox.close()


def main(argv: list[str] | None = None) -> int:
    from internvl_serve.serving.llm_engine import build_engine

    parser = argparse.ArgumentParser(description="the llm engine in a process of its own (started by EngineProcess)")
    parser.add_argument("spec", help="JSON: serving/llm_engine.build_engine's arguments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="engine process: %(message)s")
    conn = Connection(int(os.environ.pop(FD_ENV)))
    outbox: list[_Outbox] = []
    broken: list[str] = []

    def on_worker_failure(message: str) -> None:  # a watchdog thread; the stub hears it through the outbox
        broken.append(message)
        if outbox:
            outbox[0].send(("broken", message))

    built = build_engine(**json.loads(args.spec), log=lambda m: log.info("%s", m), on_worker_failure=on_worker_failure)
    conn.send(("ready", built.info()))
    outbox.append(_Outbox(conn, lambda: state_of(built.engine, built.thread)))
    if broken:
        outbox[0].send(("broken", broken[0]))
    try:
        serve(conn, built.engine, built.thread, outbox[0])
    finally:
        built.close(broken=bool(broken))
    return 0


if __name__ == "__main__":
    sys.exit(main())
