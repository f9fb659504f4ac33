"""The client SDK, the CLI, the Node.js client and the documented HTTP call against a REAL tritonserver
(the nvidia-pytriton wheel's) serving model_repository/ on the tiny checkpoint.

The oracle is `internvl_serve.reference.chat` (the model card's chat on transformers' generate), run
in this process on the same checkpoint: every answer the deployment gives through a client must be the
one the card's code gives, round by round. No part of Triton is faked. Waits on server state poll it
with a deadline and fail with the server log's tail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from internvl_client import (
    AsyncClient,
    ChatSession,
    Client,
    InvalidInputError,
    RequestTimeoutError,
    ServerUnavailableError,
    separate_images_question,
)
from servermetrics import REQUESTS_RUNNING, parse_metric, read_metrics  # loadtest/ (tests/conftest.py)

torch = pytest.importorskip("torch")
launcher = pytest.importorskip("internvl_serve.serving.launcher")
reference = pytest.importorskip("internvl_serve.reference")

GEN = dict(max_new_tokens=24, do_sample=False)
# Greedy "Count to a million." on the tiny checkpoint runs past 1500 tokens: ~7 s on 2 CPU cores.
LONG_QUESTION = "Count to a million."
LONG = dict(max_new_tokens=1500, do_sample=False)
CANCEL_LOG = "cancelled by the client"


# ---- fixtures ---------------------------------------------------------------------------------------
def _start_server(checkpoint, log_file):
    return launcher.TritonServer(checkpoint, log_file=log_file, exit_timeout_s=5, ready_timeout_s=300)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    # Leaving the with-block (also on errors and interrupts) stops the server and its process group.
    with _start_server(tiny_checkpoint, tmp_path_factory.mktemp("triton") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server.grpc_url, timeout=120) as c:
        yield c


class Oracle:
    """The card's chat on the same checkpoint, in this process (float32 on CPU, like the server)."""

    def __init__(self, checkpoint: Path):
        from internvl_serve.checkpoint import load_model
        from internvl_serve.tokenizer import load_tokenizer

        self.model = load_model(checkpoint, dtype=torch.float32, device="cpu", progress=False)
        self.tokenizer = load_tokenizer(checkpoint)

    def pixel_values(self, images: list[bytes]):
        if not images:
            return None
        return torch.cat([reference.load_image(data) for data in images])

    def chat(self, question, images=(), history=None, generation_config=GEN, num_patches_list=None, pixel_values=None):
        pv = pixel_values if pixel_values is not None else self.pixel_values(list(images))
        return reference.chat(self.model, self.tokenizer, pv, question, dict(generation_config), history=history,
                              return_history=True, num_patches_list=num_patches_list)


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint) -> Oracle:
    return Oracle(tiny_checkpoint)


def _log_count(server, needle: str) -> int:
    return server.log_file.read_text(errors="replace").count(needle)


def wait_for(server, what: str, condition, timeout_s: float = 30.0) -> None:
    """Poll a condition on the server's observable state until it holds (or fail with the log's tail)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not server.is_running():
            pytest.fail(f"tritonserver died while waiting for {what}; log:\n{server.log_tail(60)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen within {timeout_s}s; server log:\n{server.log_tail(60)}")
        time.sleep(0.1)  # polling interval of an external state, not a synchronisation


def _running(server) -> float | None:
    """internvl_requests_running from the server's metrics (the llm model pushes it every 0.5 s)."""
    return parse_metric(read_metrics(server.metrics_url), REQUESTS_RUNNING)


def _abort_seen(server, request_id: str | None) -> bool:
    """The llm model logs `request <id>#n cancelled by the client; aborting it` when it aborts a request
    in the engine (the ensemble passes the client's request id down to it). No metric exposes it."""
    text = server.log_file.read_text(errors="replace")
    if request_id is None:
        return CANCEL_LOG in text
    return re.search(rf"request {re.escape(request_id)}#\d+ {CANCEL_LOG}", text) is not None


SERVER_ABORT_GAP = (
    "Triton 2.51's ensemble passes a client's cancellation only to steps scheduled after it, so the SDK "
    "sends the llm model a cancel_request_id request with the request's cancel_key after stopping a stream "
    "(internvl_client/cancel.py); "
    "that side channel did not abort the generation"
)


def expect_server_abort(server, request_id: str | None = None, *, before: int = 0, timeout_s: float = 10.0) -> None:
    """After the client-side checks passed: the server must abort the request. While the server cannot
    (SERVER_ABORT_GAP), the test is marked xfail with that reason instead of failing."""
    deadline = time.monotonic() + timeout_s
    while not (_abort_seen(server, request_id) if request_id else _log_count(server, CANCEL_LOG) > before):
        if not server.is_running():
            pytest.fail(f"tritonserver died after a cancellation; log:\n{server.log_tail(60)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not abort the request within {timeout_s}s ({SERVER_ABORT_GAP}); "
                        f"server log:\n{server.log_tail(60)}")
        time.sleep(0.1)  # polling interval of an external state, not a synchronisation


# ---- answers equal the card's, round by round ----------------------------------------------------------
def test_session_with_combined_images_matches_the_card_round_by_round(client, oracle, images):
    imgs = images[:2]
    session = ChatSession(client, images=imgs, generation_config=GEN)
    ref_history = None
    questions = ["What is in the images?", "Describe the colours.", "Anything else?"]
    for i, question in enumerate(questions):
        if i == 1:
            answer = "".join(session.ask_stream(question))  # streamed rounds give the same text
        else:
            answer = session.ask(question)
        expected, ref_history = oracle.chat(question, imgs, ref_history)
        assert answer == expected, f"round {i + 1}"
        assert session.history == [tuple(p) for p in ref_history]
    assert session.history[0][0] == "<image>\nWhat is in the images?"
    assert session.last_response.finish_reason in ("stop", "length")


def test_session_with_separate_images_matches_the_card(client, oracle, images):
    session = ChatSession(client, images=images[:2], separate_images=True, generation_config=GEN)
    ref_history = None
    for question in ["Compare the two images.", "Which is brighter?"]:
        answer = session.ask(question)
        card_question = question if ref_history else separate_images_question(question, 2)
        expected, ref_history = oracle.chat(card_question, images[:2], ref_history, num_patches_list=[1, 1])
        assert answer == expected
    assert session.history == [tuple(p) for p in ref_history]


def test_video_session_matches_the_card(client, oracle, video):
    session = ChatSession(client, video=video, num_segments=4, generation_config=GEN)
    pixel_values, num_patches_list = reference.load_video(video, num_segments=4)
    ref_history = None
    for question in ["What happens in the video?", "And then?"]:
        answer = session.ask(question)
        card_question = question if ref_history else reference.video_chat_question(question, num_patches_list)
        expected, ref_history = oracle.chat(card_question, history=ref_history, pixel_values=pixel_values,
                                            num_patches_list=num_patches_list)
        assert answer == expected
    assert session.history == [tuple(p) for p in ref_history]


def test_text_chat_with_explicit_history(client, oracle):
    expected1, history = oracle.chat("Hello, who are you?")
    assert client.chat("Hello, who are you?", generation_config=GEN) == expected1
    expected2, _ = oracle.chat("Tell me more.", history=history)
    assert client.chat("Tell me more.", history=history, generation_config=GEN) == expected2


def test_generate_returns_the_final_metadata(client, images):
    response = client.generate(LONG_QUESTION, generation_config=dict(max_new_tokens=5))
    assert response.finish_reason == "length"
    assert response.num_output_tokens == 5
    response = client.generate("Describe it.", images=images[:1], generation_config=GEN)
    assert response.num_input_tokens > 256  # one image is 256 tokens
    assert response.finish_reason in ("stop", "length") and 0 < response.num_output_tokens <= 24
    chunks = list(client.stream_chunks("Describe it.", images=images[:1], generation_config=GEN))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].final and chunks[-1].finish_reason in ("stop", "length")


def test_pil_images_and_paths_give_the_same_answer(client, images, image_files):
    from PIL import Image

    from_bytes = client.chat("What is it?", images=images[:1], generation_config=GEN)
    from_path = client.chat("What is it?", images=[image_files[0]], generation_config=GEN)
    from_pil = client.chat("What is it?", images=Image.open(image_files[0]), generation_config=GEN)
    assert from_bytes == from_path == from_pil


def test_async_client_runs_concurrent_streams_over_one_channel(server, client, images):
    expected = [client.chat("What is in the image?", images=[img], generation_config=GEN) for img in images]

    async def main():
        async with AsyncClient(server.grpc_url, timeout=120) as aclient:
            async def one(img):
                parts = []
                async with aclient.stream("What is in the image?", images=[img], generation_config=GEN) as s:
                    async for delta in s:
                        parts.append(delta)
                return "".join(parts), s.response

            results = await asyncio.gather(*(one(img) for img in images))
            again = await aclient.chat("What is in the image?", images=[images[0]], generation_config=GEN)
            return results, again

    results, again = asyncio.run(main())
    assert [text for text, _ in results] == expected
    assert all(r.finish_reason in ("stop", "length") for _, r in results)
    assert again == expected[0]


# ---- errors --------------------------------------------------------------------------------------------
def test_invalid_requests_raise_invalid_input_with_the_servers_message(client, images):
    with pytest.raises(InvalidInputError) as exc:
        client.chat("Image-1: <image>\nImage-2: <image>\nCompare.", images=images, generation_config=GEN)
    assert exc.value.status == "INVALID_ARGUMENT"
    assert "placeholder" in exc.value.server_message
    with pytest.raises(InvalidInputError, match=r"images\[0\]"):
        client.chat("What is it?", images=[b"definitely not an image"], generation_config=GEN)
    # the client is still usable afterwards
    assert client.chat("Hi", generation_config=dict(max_new_tokens=2)) is not None


# ---- cancellation ----------------------------------------------------------------------------------------
def test_leaving_a_stream_cancels_the_request_on_the_server(server, client, images):
    stream = client.stream(LONG_QUESTION, generation_config=LONG)
    first = next(iter(stream))
    assert first
    stream.close()
    expect_server_abort(server, stream.request_id)
    assert stream.response is None
    # the slot is free, long before max_tokens: no request runs in the engine
    wait_for(server, "internvl_requests_running 0", lambda: _running(server) == 0, timeout_s=120)
    # and the next request is answered
    assert client.chat("Hi", generation_config=dict(max_new_tokens=3)) is not None


def test_breaking_out_of_a_for_loop_and_dropping_the_stream_cancels(server, client):
    stream = client.stream(LONG_QUESTION, generation_config=LONG)
    request_id = stream.request_id
    for n, _ in enumerate(stream):
        if n == 2:
            break
    del stream  # the last reference: the stream is closed, the request cancelled
    expect_server_abort(server, request_id)


def test_cancelling_an_asyncio_task_cancels_the_request(server):
    async def main():
        async with AsyncClient(server.grpc_url, timeout=120) as aclient:
            stream = aclient.stream(LONG_QUESTION, generation_config=LONG)
            first_delta = asyncio.Event()

            async def consume():
                async for _ in stream:
                    first_delta.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first_delta.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return stream.request_id

    request_id = asyncio.run(main())
    expect_server_abort(server, request_id)


def test_a_deadline_raises_timeout_and_cancels(server, images):
    with Client(server.grpc_url, timeout=2.0) as short:
        stream = short.stream(LONG_QUESTION, generation_config=LONG)
        with pytest.raises(RequestTimeoutError):  # the deadline ended it, not the answer's end
            for _ in stream:
                pass
    expect_server_abort(server, stream.request_id)


# ---- HTTP generate_stream as docs/http.md shows it ----------------------------------------------------
def _sse_events(body: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]


def test_http_generate_stream_with_a_data_url_image(server, oracle, images):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    data_url = "data:image/png;base64," + base64.b64encode(images[0]).decode()
    body = json.dumps({"text_input": "What is in the image?", "images": [data_url], "max_tokens": 24,
                       "stream": True})
    out = subprocess.run([curl, "-sS", "-N", "-X", "POST", f"{server.http_url}/v2/models/internvl_chat/generate_stream",
                          "-H", "Content-Type: application/json", "-d", "@-"],
                         input=body, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = _sse_events(out.stdout)
    assert events and "error" not in events[-1], out.stdout
    expected, _ = oracle.chat("What is in the image?", images[:1])
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] in ("stop", "length")
    # an invalid request: the error is an SSE event too
    bad = subprocess.run([curl, "-sS", "-N", "-X", "POST", f"{server.http_url}/v2/models/internvl_chat/generate_stream",
                          "-d", json.dumps({"text_input": "hi", "images": ["data:image/png;base64,@@@"]})],
                         capture_output=True, text=True, timeout=60)
    assert "base64" in bad.stdout


# ---- the CLI in a real terminal ----------------------------------------------------------------------------
def _cli_argv() -> list[str]:
    script = Path(sys.executable).parent / "internvl-chat"
    return [str(script)] if script.exists() else [sys.executable, "-m", "internvl_client.cli"]


class Terminal:
    """A program on a pseudo-terminal that is its controlling terminal (so Ctrl-C is SIGINT)."""

    def __init__(self, argv: list[str], *, sigint_ignored: bool = False):
        import pty

        self.master, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")

        def controlling_tty():  # runs in the child: new session, the pty as its terminal
            import fcntl
            import termios

            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if sigint_ignored:  # as a background job of a non-interactive shell starts it
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     preexec_fn=controlling_tty, close_fds=True)
        os.close(slave)
        self.output = ""

    def read_until(self, pattern: str, timeout_s: float = 60.0) -> str:
        """Everything up to and including the first match of `pattern` (a regex) after what was consumed."""
        deadline = time.monotonic() + timeout_s
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.output)
            if match:
                consumed, self.output = self.output[: match.end()], self.output[match.end():]
                return consumed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} not seen within {timeout_s}s; terminal shows:\n{self.output}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the program exited and closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"program exited before {pattern!r}; terminal shows:\n{self.output}")
                self.output += data.decode("utf-8", "replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_cli_one_shot_in_a_terminal(server, oracle, image_files, images):
    expected, _ = oracle.chat("What is in the image?", images[:1])
    term = Terminal(_cli_argv() + ["--url", server.grpc_url, "-q", "What is in the image?",
                                   "--image", str(image_files[0]), "--max-new-tokens", "24"])
    try:
        shown = term.read_until(re.escape(expected) + r"\n")
        assert term.wait() == 0
    finally:
        term.kill()
    assert shown.endswith(expected + "\n")


def test_cli_reads_the_question_from_stdin(server, oracle):
    expected, _ = oracle.chat("Hello there")
    out = subprocess.run(_cli_argv() + ["--url", server.grpc_url, "-q", "-", "--max-new-tokens", "24"],
                         input="Hello there\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_cli_interactive_session(server, oracle, image_files, images, tmp_path):
    term = Terminal(_cli_argv() + ["--url", server.grpc_url, "--image", str(image_files[0]),
                                   "--max-new-tokens", "24"])
    saved = tmp_path / "conversation.json"
    try:
        term.read_until(r"User: ")
        expected1, history = oracle.chat("What is in the image?", images[:1])
        term.send("What is in the image?\n")
        assert term.read_until(r"User: ").endswith(f"Assistant: {expected1}\nUser: ")
        expected2, history = oracle.chat("And the colours?", images[:1], history)
        term.send("And the colours?\n")
        assert term.read_until(r"User: ").endswith(f"Assistant: {expected2}\nUser: ")
        term.send(f"/save {saved}\n")
        term.read_until(r"\[saved to .*\]\nUser: ")
        term.send("/reset\n")
        term.read_until(r"\[conversation reset\]\nUser: ")
        # after /reset the next question is a first round again
        term.send("What is in the image?\n")
        assert term.read_until(r"Assistant: .*\nUser: ").endswith(f"Assistant: {expected1}\nUser: ")
        term.send("/quit\n")
        assert term.wait() == 0
    finally:
        term.kill()
    data = json.loads(saved.read_text())
    assert data["history"] == [list(p) for p in history]
    # a saved conversation continues where it stopped
    expected3, _ = oracle.chat("Anything else?", images[:1], history)
    out = subprocess.run(_cli_argv() + ["--url", server.grpc_url, "--load", str(saved), "-q", "Anything else?",
                                        "--max-new-tokens", "24"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected3 + "\n"


def test_cli_ctrl_c_cancels_the_answer_and_keeps_the_session(server):
    """Also when the CLI inherits SIGINT ignored (so the test does not depend on how it is run: under a
    CI job started in the background, Ctrl-C did nothing before the CLI set its own handler)."""
    term = Terminal(_cli_argv() + ["--url", server.grpc_url, "--max-new-tokens", "1500"], sigint_ignored=True)
    try:
        term.read_until(r"User: ")
        aborted_before = _log_count(server, CANCEL_LOG)
        term.send(LONG_QUESTION + "\n")
        term.read_until(r"Assistant: \S")  # the answer is streaming
        term.send("\x03")  # Ctrl-C
        term.read_until(r"\[cancelled\]")
        term.read_until(r"User: ")
        term.send("\x04")  # Ctrl-D at the prompt quits
        assert term.wait() == 0
    finally:
        term.kill()
    expect_server_abort(server, before=aborted_before)



# ---- the Node.js client ------------------------------------------------------------------------------------
def test_node_client_streams_a_chat_with_an_image(server, oracle, node_client, image_files, images):
    expected, _ = oracle.chat("What is in the image?", images[:1])
    out = subprocess.run(["node", str(node_client / "chat.js"), "--url", server.grpc_url, "--image",
                          str(image_files[0]), "-q", "What is in the image?", "--max-tokens", "24", "--metadata"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    metadata = json.loads(out.stderr.strip().splitlines()[-1])
    assert metadata["finish_reason"] in ("stop", "length") and metadata["num_input_tokens"] > 256
    bad = subprocess.run(["node", str(node_client / "chat.js"), "--url", server.grpc_url, "-q", "<image> x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid request" in bad.stderr and "placeholder" in bad.stderr


# ---- a server that dies ------------------------------------------------------------------------------------
def test_a_killed_server_gives_a_clear_error_quickly_not_a_hang(tiny_checkpoint, tmp_path):
    """Own server: this test kills it (SIGKILL of its process group, as a crash or OOM kill would)."""
    with _start_server(tiny_checkpoint, tmp_path / "doomed.log") as doomed:
        with Client(doomed.grpc_url, timeout=120) as c:
            stream = c.stream(LONG_QUESTION, generation_config=LONG)
            next(iter(stream))
            os.killpg(doomed.pid, signal.SIGKILL)
            # not a hang: a wait for the 120 s deadline would raise RequestTimeoutError instead
            with pytest.raises(ServerUnavailableError, match="server unavailable"):
                for _ in stream:
                    pass
            # a new request to the dead address fails as unavailable too (after its connection retries)
            with pytest.raises(ServerUnavailableError):
                c.chat("Hi")


def test_async_stream_chunks_end_with_the_metadata(server):
    async def main():
        async with AsyncClient(server.grpc_url, timeout=120) as aclient:
            return [c async for c in aclient.stream_chunks(LONG_QUESTION, generation_config=dict(max_new_tokens=4))]

    chunks = asyncio.run(main())
    assert chunks[-1].final and chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 4
    assert not any(c.final for c in chunks[:-1])


def test_node_client_ctrl_c_cancels_the_generation_on_the_server(server, node_client):
    aborted_before = _log_count(server, CANCEL_LOG)
    proc = subprocess.Popen(["node", str(node_client / "chat.js"), "--url", server.grpc_url, "-q", LONG_QUESTION,
                             "--max-tokens", "1500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "[cancelled]" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    expect_server_abort(server, before=aborted_before)
