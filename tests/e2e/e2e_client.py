"""Wire-level helpers for the end-to-end tests: one gRPC stream per request (tritonclient), and HTTP
generate_stream (server-sent events) with plain `requests`. Every wait has a deadline and notices a
server that died (failing with the server log's tail) instead of hanging."""
from __future__ import annotations

import io
import json
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from internvl_serve.serving.contract import ENSEMBLE, SPECS

_NUMPY = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}


def make_inputs(**values) -> list[grpcclient.InferInput]:
    """Contract tensors from Python values: str/bytes/list for BYTES, numbers/bools otherwise.
    A `(value, "DATATYPE")` tuple sends the value with another datatype (to test refusals)."""
    inputs = []
    for name, value in values.items():
        datatype = SPECS[name].datatype
        if isinstance(value, tuple):
            value, datatype = value
        items = value if isinstance(value, list) else [value]
        if datatype == "BYTES":
            array = np.array([v.encode() if isinstance(v, str) else v for v in items], dtype=object)
        else:
            array = np.array(items, dtype=_NUMPY[datatype])
        array = array.reshape([len(items)])
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class Answer:
    deltas: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    finals: int = 0  # responses flagged final
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def add(self, result) -> bool:
        """Take one data response (a tritonclient InferResult); True when it is the final one."""
        text = result.as_numpy("text_output")
        if text is not None:
            self.deltas.append(text[0].decode("utf-8"))
            self.finish_reasons.append(result.as_numpy("finish_reason")[0].decode())
            self.num_input_tokens = int(result.as_numpy("num_input_tokens")[0])
            self.num_output_tokens = int(result.as_numpy("num_output_tokens")[0])
        if result.get_response().parameters["triton_final_response"].bool_param:
            self.finals += 1
            return True
        return False


def metric(server, name: str) -> float | None:
    """Metric `name` summed over its label sets on the server's /metrics; None when it is absent."""
    # loadtest/servermetrics.py, on sys.path under pytest (tests/conftest.py); imported here so that
    # the client scripts some tests run with only tests/e2e on their path import this module
    from servermetrics import parse_metric, read_metrics

    return parse_metric(read_metrics(server.metrics_url), name)


ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """
import os
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        if not os.path.isdir(os.environ["INTERNVL_CHECKPOINT"]):
            raise RuntimeError("INTERNVL_CHECKPOINT is not a folder")
        {initialize}

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""


def make_echo_repository(root, initialize: str = "pass"):
    """(model repository, checkpoint folder) under root: a Python model "echo" (y = x) that loads in a
    second, for tests of the launcher itself; `initialize` is a line run at its load."""
    model = root / "repo" / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL.replace("{initialize}", initialize))
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    return root / "repo", checkpoint


def _fail_if_dead(server, what: str) -> None:
    if not server.is_running():
        pytest.fail(f"tritonserver died while {what}; last log lines:\n{server.log_tail(60)}")


def wait_for(server, condition, *, timeout_s: float, what: str) -> None:
    """Poll `condition` (state only visible from outside, such as the server log) until it holds."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while not condition():
        _fail_if_dead(server, f"waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}; log tail:\n{server.log_tail(40)}")
        tick.wait(0.1)


def stream_chat(server, inputs, *, timeout_s: float = 120.0, request_id: str = "") -> Answer:
    """One request on its own gRPC stream; returns when the final response (or an error) arrives."""
    return stream_chat_to(server, ENSEMBLE, inputs, timeout_s=timeout_s, request_id=request_id)


def stream_chat_to(server, model: str, inputs, *, timeout_s: float = 120.0, request_id: str = "") -> Answer:
    """stream_chat to any model of the repository."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        return read_stream(server, responses, Answer(), request_id=request_id, timeout_s=timeout_s)
    finally:
        client.stop_stream()
        client.close()


def read_stream(server, responses: queue.Queue, answer: Answer, *, request_id: str = "", timeout_s: float = 120.0,
                poll_s: float = 1.0, server_may_exit: bool = False, on_response=None) -> Answer:
    """Take a gRPC stream's (result, error) pairs, as its callback put them in `responses`, into `answer`
    until the final response or an error (then `answer.error`). A server that dies (unless
    server_may_exit), or no end within timeout_s, fails the test. `on_response(error)` sees each response,
    data or error, before it is taken. The caller owns the stream (and stops it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result, error = responses.get(timeout=poll_s)
        except queue.Empty:
            if not server_may_exit:
                _fail_if_dead(server, f"answering request {request_id!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"no final response for {request_id!r} after {timeout_s}s; got {answer}")
            continue
        if on_response is not None:
            on_response(error)
        if error is not None:
            answer.error = str(error)
            return answer
        if answer.add(result):
            return answer


def sse_chat(server, payload: dict, *, timeout_s: float = 120.0, stream: bool = True) -> tuple[int, list[dict]]:
    """POST /v2/models/internvl_chat/generate_stream (or /generate); the events' JSON objects."""
    endpoint = "generate_stream" if stream else "generate"
    url = f"{server.http_url}/v2/models/{ENSEMBLE}/{endpoint}"
    with requests.post(url, data=json.dumps(payload), stream=stream, timeout=timeout_s,
                       headers={"Content-Type": "application/json"}) as r:
        if not stream:
            return r.status_code, [r.json()]
        events = []
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                events.append(json.loads(line[len("data:"):]))
        return r.status_code, events


def mjpeg_avi(frames, fps: int = 8) -> bytes:
    """A minimal Motion-JPEG AVI (RIFF) of PIL frames of one size: a real video that decord reads."""
    import io
    import struct

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def riff_list(kind: bytes, data: bytes) -> bytes:
        return chunk(b"LIST", kind + data)

    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.convert("RGB").save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    (w, h), n, biggest = frames[0].size, len(jpegs), max(len(j) for j in jpegs)
    avih = struct.pack("<IIIIIIIIII16x", 1_000_000 // fps, biggest * fps, 0, 0x10, n, 0, 1, biggest, w, h)
    strh = struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, n, biggest,
                       0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    hdrl = riff_list(b"hdrl", chunk(b"avih", avih) + riff_list(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    chunks = [chunk(b"00dc", j) for j in jpegs]
    index, offset = [], 4  # idx1 offsets count from the 'movi' fourcc
    for j, c in zip(jpegs, chunks):
        index.append(struct.pack("<4sIII", b"00dc", 0x10, offset, len(j)))
        offset += len(c)
    body = b"AVI " + hdrl + riff_list(b"movi", b"".join(chunks)) + chunk(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def image_bytes(seed: int, size=(96, 80), fmt="PNG") -> bytes:
    """A distinct random image per seed (noise survives the resize to 448, so answers differ)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def in_parallel(calls) -> list:
    """Each zero-argument call on its own thread, all started at once; their results in order. The first
    exception (pytest.fail's included, which are BaseExceptions) is raised here."""
    calls = list(calls)
    results = [None] * len(calls)
    errors = []

    def one(i):
        try:
            results[i] = calls[i]()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
