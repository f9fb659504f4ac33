"""The Triton-free services behind the model repository's adapters, on the tiny checkpoint:
Preprocessor, VisionService, LLMService (with a recording sink in place of a response sender)."""
from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_serve.prompt import PromptError
from internvl_serve.serving.contract import ChatRequest, InvalidInput, LLMRequest, ServingLimits
from internvl_serve.serving.parsing import parse_generation_request
from internvl_serve.tokenizer import IMG_CONTEXT_TOKEN

WAIT_S = 60


def png(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def preprocessor(tiny_checkpoint):
    from internvl_serve.serving.preprocess import Preprocessor

    return Preprocessor(tiny_checkpoint)


@pytest.fixture(scope="module")
def vision(tiny_checkpoint):
    from internvl_serve.serving.vision import VisionService

    return VisionService(tiny_checkpoint, device="cpu", max_images_per_forward=2)


@pytest.fixture(scope="module")
def full_model(tiny_checkpoint):
    from internvl_serve.checkpoint import load_model

    return load_model(tiny_checkpoint, dtype=torch.float32, parts=("vision", "language"), progress=False)


# ---- preprocess -------------------------------------------------------------------------------------


def count_context(preprocessor, ids) -> int:
    return int((ids == preprocessor.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)).sum())


def test_text_only(preprocessor):
    out = preprocessor(ChatRequest(question="Hello, who are you?"))
    assert out.input_ids.dtype == np.int32 and out.input_ids.ndim == 1
    assert out.input_ids[0] == preprocessor.tokenizer.bos_token_id
    assert out.pixel_values.shape == (0, 3, 448, 448) and out.pixel_values.dtype == np.float32
    assert count_context(preprocessor, out.input_ids) == 0


def test_images_expand_to_their_tokens(preprocessor):
    n_tok = preprocessor.config.num_image_token
    out = preprocessor(ChatRequest(question="Describe.", images=[png(1), png(2)]))  # combined: one block
    assert out.pixel_values.shape == (2, 3, 448, 448)
    assert count_context(preprocessor, out.input_ids) == 2 * n_tok
    separate = preprocessor(ChatRequest(question="Image-1: <image>\nImage-2: <image>\nCompare.",
                                        images=[png(1), png(2)], num_patches_list=[1, 1]))
    assert count_context(preprocessor, separate.input_ids) == 2 * n_tok
    assert len(separate.input_ids) > len(out.input_ids)  # two <img></img> blocks and the labels


def test_output_slots_reuse_their_buffer_until_the_next_call_with_the_slot(preprocessor):
    """output_slot (the adapter: each request's index in its execute) writes the pixel values into that
    slot's reused buffer: the same values as a call without one, kept until the slot is used again, by
    another slot's calls too; a call without a slot gets an array of its own."""
    def call(seeds, slot=None):
        return preprocessor(ChatRequest(question="Describe.", images=[png(s) for s in seeds]),
                            output_slot=slot).pixel_values

    owned = {seeds: call(seeds) for seeds in [(1,), (2, 3), (4,)]}
    first, second = call((1,), slot=0), call((2, 3), slot=1)
    assert np.array_equal(first, owned[(1,)]) and np.array_equal(second, owned[(2, 3)])
    assert not np.shares_memory(first, second)
    call((2, 3))                                               # a call without a slot leaves both
    assert np.array_equal(first, owned[(1,)]) and np.array_equal(second, owned[(2, 3)])
    third = call((4,), slot=0)                                 # slot 0 again: its buffer, the new values
    assert np.shares_memory(first, third) and np.array_equal(third, owned[(4,)])
    assert np.array_equal(second, owned[(2, 3)])
    grown = call((2, 3), slot=0)                               # larger than slot 0's buffer: it grows
    assert np.array_equal(grown, owned[(2, 3)]) and np.array_equal(third, owned[(4,)])  # the old one lives on
    assert not any(np.shares_memory(mine, slot) for mine in owned.values() for slot in (first, second, grown))


def test_the_preprocess_service_runs_without_torch(tiny_checkpoint):
    """The preprocess stubs run without torch (its config.pbtxt: "no torch here"): the service, its
    reused buffers (hostbuf.py) included, must not import it."""
    from fault_probe import run_probe

    probe = """
import sys
from internvl_serve.serving.contract import ChatRequest
from internvl_serve.serving.preprocess import Preprocessor
import io
from PIL import Image

image = io.BytesIO()
Image.new("RGB", (64, 48), (1, 2, 3)).save(image, "PNG")
Preprocessor(sys.argv[1])(ChatRequest(question="Describe.", images=[image.getvalue()]), output_slot=0)
print("torch" in sys.modules)
"""
    assert run_probe(probe, tiny_checkpoint).strip() == "False"


def test_video_frames(preprocessor, tiny_video_bytes):
    out = preprocessor(ChatRequest(question="What happens?", video=tiny_video_bytes, num_segments=4))
    assert out.pixel_values.shape == (4, 3, 448, 448)
    assert count_context(preprocessor, out.input_ids) == 4 * preprocessor.config.num_image_token
    text = preprocessor.tokenizer.decode(out.input_ids.tolist(), skip_special_tokens=True)
    assert "Frame4:" in text and "Frame5:" not in text


def test_video_later_round_keeps_the_history_frames(preprocessor, tiny_video_bytes):
    first = "".join(f"Frame{i}: <image>\n" for i in range(1, 5)) + "What happens?"
    out = preprocessor(ChatRequest(question="And then?", video=tiny_video_bytes, num_segments=4,
                                   history=[(first, "A cat.")]))
    assert count_context(preprocessor, out.input_ids) == 4 * preprocessor.config.num_image_token


def test_bad_images_name_the_element(preprocessor):
    with pytest.raises(InvalidInput, match=r"^input 'images\[1\]': image data is not a supported image"):
        preprocessor(ChatRequest(question="Describe.", images=[png(1), b"not an image"]))
    with pytest.raises(InvalidInput, match=r"^input 'video': video data could not be decoded"):
        preprocessor(ChatRequest(question="Describe.", video=b"not a video"))


def test_placeholder_mismatch_is_a_prompt_error(preprocessor):
    with pytest.raises(PromptError, match="placeholders"):
        preprocessor(ChatRequest(question="<image>\n<image>\nTwo?", images=[png(1), png(2), png(3)]))
    with pytest.raises(PromptError, match="no images were sent"):
        preprocessor(ChatRequest(question="<image>\nWhat?"))


def test_prompt_longer_than_the_context_window(preprocessor):
    history = [("word " * 3000, "answer")]
    with pytest.raises(InvalidInput, match=r"the prompt is \d+ tokens .* the context window is 4096"):
        preprocessor(ChatRequest(question="And?", history=history))


def test_image_pixel_limit(tiny_checkpoint):
    from internvl_serve.serving.preprocess import Preprocessor

    small = Preprocessor(tiny_checkpoint, ServingLimits(max_image_pixels=1000))
    with pytest.raises(InvalidInput, match=r"^input 'images\[0\]': image is 64x48 = 3072 pixels"):
        small(ChatRequest(question="Describe.", images=[png(1)]))


def one_bit_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_request_pixel_budget_is_checked_from_the_headers_before_decoding(preprocessor, monkeypatch):
    """Twelve 6000x6000 1-bit PNGs (a few KiB each, each within the per-image limit) cost 1.8 GiB and 8 s
    when they were all decoded; their 432 M pixels are now refused from the headers."""
    from PIL import ImageFile

    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real(self))
    bomb = one_bit_png(6000, 6000)
    with pytest.raises(InvalidInput, match=r"^input 'images': the request's 12 images are 432000000 pixels in total "
                                           r"\(from their headers\), above the limit of 100000000 pixels per request "
                                           r"\(nothing was decoded\)$"):
        preprocessor(ChatRequest(question="<image>\n" * 12 + "?", images=[bomb] * 12))
    assert decoded == []
    small = png(1)  # under the budget the same request shape runs, one decoded image at a time
    out = preprocessor(ChatRequest(question="<image>\n" * 12 + "?", images=[small] * 12))
    assert out.pixel_values.shape[0] == 12 and decoded  # (load runs more than once per image)


def test_a_video_above_the_request_pixel_budget_is_refused_from_its_header(tiny_checkpoint, tiny_video_bytes):
    from internvl_serve.serving.preprocess import Preprocessor

    tight = Preprocessor(tiny_checkpoint, ServingLimits(max_request_pixels=64 * 48 * 8 - 1))
    with pytest.raises(InvalidInput, match=r"^input 'video': 8 video frames of 64x48 are 24576 pixels, above the "
                                           r"request's limit of 24575 pixels \(from the header; nothing was decoded\)$"):
        tight(ChatRequest(question="?", video=tiny_video_bytes, num_segments=8))
    assert tight(ChatRequest(question="?", video=tiny_video_bytes, num_segments=7)).pixel_values.shape[0] == 7


# ---- vision -----------------------------------------------------------------------------------------


def test_vision_batches_requests_and_splits_them_back(vision, full_model, preprocessor):
    requests = [preprocessor(ChatRequest(question="q", images=[png(s) for s in seeds])).pixel_values
                for seeds in ((1, 2), (), (3,), (4, 5))]
    embeds = vision.embed(requests)  # 5 images in chunks of 2
    n_tok, hidden = vision.num_image_token, vision.hidden_size
    assert [e.shape for e in embeds] == [(2 * n_tok, hidden), (0, hidden), (n_tok, hidden), (2 * n_tok, hidden)]
    assert all(e.dtype == np.float32 for e in embeds)
    with torch.inference_mode():
        for pixels, got in zip(requests, embeds):
            if len(pixels):
                want = full_model.extract_feature(torch.from_numpy(pixels)).reshape(-1, hidden)
                torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_vision_device_choice():
    from internvl_serve.serving.device import default_dtype, resolve_device

    assert resolve_device("cpu").type == "cpu" and default_dtype(torch.device("cpu")) == torch.float32
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        resolve_device("tpu")


# ---- llm --------------------------------------------------------------------------------------------


class RecordingSink:
    """What a Triton response sender sees."""

    def __init__(self, fail_send: bool = False):
        self.responses: list[tuple[dict, bool]] = []
        self.errors: list[str] = []
        self.calls_after_final: list[str] = []
        self.fail_send = fail_send
        self.done = threading.Event()

    def _check_open(self, what: str) -> None:
        if self.done.is_set():
            self.calls_after_final.append(what)

    def send(self, response, final):
        self._check_open("send")
        if self.fail_send:
            raise RuntimeError("client went away")
        self.responses.append((response, final))
        if final:
            self.done.set()

    def fail(self, message):
        self._check_open("fail")
        self.errors.append(message)
        self.done.set()

    def wait(self):
        assert self.done.wait(WAIT_S), "no final response"

    @property
    def texts(self):
        return [r["text_output"][0].decode() for r, _ in self.responses]

    @property
    def reasons(self):
        return [r["finish_reason"][0].decode() for r, _ in self.responses]


def test_the_engine_gets_a_process_of_its_own_by_default_on_one_gpu_only():
    from internvl_serve.serving.llm_engine import EngineOptions, engine_in_own_process

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    default = EngineOptions.from_parameters({"engine_process": ""})
    assert default.engine_process is None
    assert engine_in_own_process(default, cuda) and not engine_in_own_process(default, cpu)
    assert not engine_in_own_process(EngineOptions.from_parameters({"tensor_parallel_size": "2"}), cuda)
    assert not engine_in_own_process(EngineOptions.from_parameters({"engine_process": "false"}), cuda)
    assert engine_in_own_process(EngineOptions.from_parameters({"engine_process": "true"}), cpu)
    with pytest.raises(ValueError, match="engine_process"):
        EngineOptions.from_parameters({"engine_process": "yes"})


@pytest.fixture(scope="module", params=["engine thread", "engine process"])
def llm(tiny_checkpoint, request):
    """The service as the llm model runs it: its engine in a thread of this process (the default on the
    CPU), or in a process of its own (the default on one GPU) (engine_process: serving/engine_process.py). Every llm test runs on both."""
    from internvl_serve.serving.llm import LLMService

    options = {"max_num_seqs": "8", "engine_process": str(request.param == "engine process").lower()}
    service = LLMService(tiny_checkpoint, device="cpu", engine_options=options)
    yield service
    service.shutdown()


def llm_request(preprocessor, question: str, **generation) -> LLMRequest:
    out = preprocessor(ChatRequest(question=question))
    arrays = {k: np.array([v], dtype={int: np.int32, bool: np.bool_, float: np.float32}[type(v)])
              for k, v in generation.items()}
    return LLMRequest(out.input_ids, None, question, parse_generation_request(arrays))


def reference_answer(full_model, tokenizer, question, max_tokens):
    from internvl_serve import reference

    with torch.inference_mode():
        return reference.chat(full_model, tokenizer, None, question, dict(max_new_tokens=max_tokens, do_sample=False))


def test_llm_streams_the_reference_answer(llm, preprocessor, full_model):
    sink = RecordingSink()
    llm.submit(llm_request(preprocessor, "Hello, who are you?", max_tokens=10, stream=True), sink, client_id="t1")
    sink.wait()
    assert "".join(sink.texts) == reference_answer(full_model, preprocessor.tokenizer, "Hello, who are you?", 10)
    assert [final for _, final in sink.responses] == [False] * (len(sink.responses) - 1) + [True]
    assert sink.reasons[-1] in ("stop", "length") and not any(sink.reasons[:-1])
    assert not sink.errors and not sink.calls_after_final


def test_llm_single_response_with_echo(llm, preprocessor, full_model):
    sink = RecordingSink()
    request = llm_request(preprocessor, "Say it.", max_tokens=6, exclude_input_in_output=False)
    llm.submit(request, sink)
    sink.wait()
    assert len(sink.responses) == 1 and sink.responses[0][1] is True
    assert sink.texts[0] == "Say it." + reference_answer(full_model, preprocessor.tokenizer, "Say it.", 6)
    assert int(sink.responses[0][0]["num_output_tokens"][0]) <= 6


def test_llm_requests_end_on_the_template_stop_token(llm, preprocessor, full_model):
    """The service gives every request its template's end of answer (V1-1's internvl_zh: '</s>', id 2) and
    the engine ends on that token, whichever it is: with another stop token the answer ends there."""
    from internvl_serve import reference

    assert (llm.stop, llm.stop_token_ids) == (("</s>",), (2,))
    tok = preprocessor.tokenizer
    *_, input_ids, mask = reference.prepare_chat(full_model, tok, None, "Hello, who are you?", None, None)
    with torch.inference_mode():
        greedy = reference.generate(full_model, input_ids, mask, None, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
                                    max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
    k = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i] and greedy[i] != 2)
    saved, llm.stop_token_ids = llm.stop_token_ids, (greedy[k],)  # as if the template's stop token were it
    try:
        sink = RecordingSink()
        llm.submit(llm_request(preprocessor, "Hello, who are you?", max_tokens=8), sink)
        sink.wait()
    finally:
        llm.stop_token_ids = saved
    assert sink.reasons == ["stop"] and int(sink.responses[0][0]["num_output_tokens"][0]) == k + 1
    assert sink.texts == [tok.decode(greedy[:k], skip_special_tokens=True).split("</s>")[0].strip()]


KEY, OTHER_KEY = "k" * 32, "x" * 32


def test_llm_cancel_needs_the_request_id_and_its_key(llm, preprocessor):
    sinks = {name: RecordingSink() for name in ("mine", "other", "keyless")}
    llm.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True), sinks["mine"],
               client_id="mine", cancel_key=KEY)
    llm.submit(llm_request(preprocessor, "Hi.", max_tokens=8), sinks["other"], client_id="other", cancel_key=KEY)
    llm.submit(llm_request(preprocessor, "Hi.", max_tokens=8), sinks["keyless"], client_id="keyless")
    assert llm.cancel("", KEY) == 0 and llm.cancel("min", KEY) == 0  # no id, or another id's prefix: nothing
    assert llm.cancel("mine", OTHER_KEY) == 0 and llm.cancel("mine", "") == 0  # the id without its key: nothing
    assert llm.cancel("keyless", "") == 0  # sent without a key: not cancellable by name
    assert llm.cancel("mine", KEY) == 1
    for sink in sinks.values():
        sink.wait()
    assert sinks["mine"].reasons[-1] == "cancelled" and sinks["mine"].responses[-1][1] is True
    assert int(sinks["mine"].responses[-1][0]["num_output_tokens"][0]) < 3000
    assert sinks["other"].reasons[-1] in ("stop", "length") and sinks["keyless"].reasons[-1] in ("stop", "length")
    assert not any(sink.calls_after_final for sink in sinks.values())
    assert llm.cancel("mine", KEY) == 0 and llm.num_active == 0  # finished: not found


def test_llm_a_second_client_with_the_same_request_id_cannot_cancel_the_first(llm, preprocessor, full_model):
    """Finding (issue #14): cancellation crossed clients. Two clients send the same request id; the
    second cancels "its" request: only its own (its key) is aborted, the first's answer is the card's."""
    victim, canceller = RecordingSink(), RecordingSink()
    question = "Hello, who are you?"
    llm.submit(llm_request(preprocessor, question, max_tokens=12, stream=True), victim, client_id="same",
               cancel_key=KEY)
    llm.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True), canceller, client_id="same",
               cancel_key=OTHER_KEY)
    assert llm.cancel("same", OTHER_KEY) == 1
    victim.wait()
    canceller.wait()
    assert canceller.reasons[-1] == "cancelled"
    assert victim.reasons[-1] in ("stop", "length")
    assert "".join(victim.texts) == reference_answer(full_model, preprocessor.tokenizer, question, 12)
    assert llm.num_active == 0


def test_llm_a_failing_sender_ends_the_request(llm, preprocessor):
    sink = RecordingSink(fail_send=True)
    llm.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True), sink)
    sink.wait()
    assert len(sink.errors) == 1 and "client went away" in sink.errors[0]
    assert not sink.calls_after_final
    assert llm.num_active == 0


def test_llm_refuses_what_the_engine_refuses(llm, preprocessor):
    from internvl_serve.engine import InvalidRequest

    request = llm_request(preprocessor, "Hi")
    bad = LLMRequest(request.input_ids, np.zeros((3, llm.config.llm_config.hidden_size), np.float32), "Hi",
                     request.generation)
    with pytest.raises(InvalidRequest, match="image_embeds has 3 rows"):
        llm.submit(bad, RecordingSink())
    assert llm.num_active == 0


def test_llm_answers_an_image_question_as_the_card(llm, preprocessor, vision, full_model):
    """Image rows from the vision service (float32) through the service, in the engine thread's process or
    sent to the engine process: the card's answer to the same image and question, token for token."""
    from internvl_serve import reference

    question = "<image>\nWhat is in the picture?"
    pre = preprocessor(ChatRequest(question=question, images=[png(7)]))
    (rows,) = vision.embed([pre.pixel_values])
    generation = llm_request(preprocessor, "x", max_tokens=10, stream=True).generation
    sink = RecordingSink()
    llm.submit(LLMRequest(pre.input_ids, rows, question, generation), sink)
    sink.wait()
    with torch.inference_mode():
        want = reference.chat(full_model, preprocessor.tokenizer, torch.from_numpy(pre.pixel_values), question,
                              dict(max_new_tokens=10, do_sample=False))
    assert want and "".join(sink.texts) == want and not sink.errors


def test_image_rows_go_to_the_engine_process_in_its_dtype_where_narrower():
    """What EngineProcess.submit sends and the engine process receives, through a real pipe: float32 rows
    for a bfloat16 engine (on a GPU) as bfloat16, half the bytes, through one reused staging buffer; for a
    float32 engine (the CPU) the rows themselves."""
    from multiprocessing import Pipe

    from internvl_serve.hostbuf import HostBuffers
    from internvl_serve.serving.engine_process import as_bytes, rows_to_send

    rows, staging = torch.randn(512, 64), HostBuffers()
    sent = rows_to_send(rows, torch.bfloat16, staging)
    assert sent.dtype == torch.bfloat16 and torch.equal(sent, rows.to(torch.bfloat16))
    assert as_bytes(sent).nbytes == rows.nbytes // 2
    ours, theirs = Pipe()
    ours.send_bytes(as_bytes(sent))
    received = torch.empty(sent.shape, dtype=sent.dtype)
    theirs.recv_bytes_into(as_bytes(received))
    assert torch.equal(received, rows.to(torch.bfloat16))
    again = rows_to_send(torch.randn(256, 64), torch.bfloat16, staging)  # (sent is only valid until then)
    assert again.data_ptr() == sent.data_ptr()  # the staging buffer, reused
    assert rows_to_send(rows, torch.float32, staging).data_ptr() == rows.data_ptr()  # no copy
    assert as_bytes(torch.zeros(0, 64, dtype=torch.bfloat16)).nbytes == 0  # (0 rows)


def test_the_stub_writes_one_v1_1_image_s_rows_in_one_go():
    """The stub's end of the socket pair to the engine process gets a send buffer that holds one V1-1 image's
    rows in bfloat16 (256 x 5120, 2.6 MB) whole: its write completes with nothing read yet on the other end
    (the kernel's default, ~208 KB, would make it wait for the engine process a dozen times)."""
    import socket
    from multiprocessing.connection import Connection

    from internvl_serve.serving.engine_process import SEND_BUFFER_BYTES, as_bytes, widen_send_buffer

    stub_end, engine_end = socket.socketpair()
    granted = widen_send_buffer(stub_end)
    cap = 2 * int(Path("/proc/sys/net/core/wmem_max").read_text())  # the kernel doubles what it grants
    assert granted >= min(2 * SEND_BUFFER_BYTES, cap)  # past the system's cap where the process may, else up to it
    rows = torch.randn(256, 5120).to(torch.bfloat16)
    if granted < 2 * rows.nbytes:
        pytest.skip(f"this system caps send buffers at {cap} bytes, below one image's rows with the kernel's overhead")
    stub_end.setblocking(False)  # a write the buffer cannot take fails here instead of waiting for a reader
    stub, engine = Connection(stub_end.detach()), Connection(engine_end.detach())
    stub.send_bytes(as_bytes(rows))
    received = torch.empty_like(rows)
    engine.recv_bytes_into(as_bytes(received))
    assert torch.equal(received, rows)
    stub.close()
    engine.close()


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine thread", "engine process"])
def test_a_bfloat16_engine_answers_as_if_it_converted_the_image_rows_itself(tiny_checkpoint, preprocessor, vision,
                                                                          engine_process):
    """The rows now travel to a bfloat16 engine (as on a GPU) in bfloat16 (LLMService in its thread,
    EngineProcess to its process), which changes no answer: the answer to float32 rows is the one to the
    same rows rounded to bfloat16 (which convert exactly), the values the engine computes with."""
    from internvl_serve.serving.llm import LLMService

    question = "<image>\nWhat is in the picture?"
    pre = preprocessor(ChatRequest(question=question, images=[png(7)]))
    (rows,) = vision.embed([pre.pixel_values])
    exact = torch.from_numpy(rows).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(exact, rows)  # the conversion does round them
    generation = llm_request(preprocessor, "x", max_tokens=10, stream=True).generation
    service = LLMService(tiny_checkpoint, device="cpu", dtype=torch.bfloat16,
                         engine_options={"engine_process": str(engine_process).lower()})
    try:
        texts = []
        for image_rows in (rows, exact):
            sink = RecordingSink()
            service.submit(LLMRequest(pre.input_ids, image_rows, question, generation), sink)
            sink.wait()
            assert not sink.errors and sink.texts
            texts.append("".join(sink.texts))
        assert texts[0] == texts[1]
    finally:
        service.shutdown()


def test_llm_takes_zero_image_rows_with_a_text_prompt(llm, preprocessor, full_model):
    """No image, but an image_embeds tensor of 0 rows (a direct client may send one): the text answer."""
    request = llm_request(preprocessor, "Hello, who are you?", max_tokens=6, stream=True)
    empty = np.zeros((0, llm.config.llm_config.hidden_size), np.float32)
    sink = RecordingSink()
    llm.submit(LLMRequest(request.input_ids, empty, request.text_input, request.generation), sink)
    sink.wait()
    assert "".join(sink.texts) == reference_answer(full_model, preprocessor.tokenizer, "Hello, who are you?", 6)
    assert not sink.errors


def test_llm_requests_run_concurrently(llm, preprocessor, full_model):
    questions = [f"Question number {i}?" for i in range(5)]
    sinks = [RecordingSink() for _ in questions]
    for q, sink in zip(questions, sinks):
        llm.submit(llm_request(preprocessor, q, max_tokens=8, stream=True), sink)
    for q, sink in zip(questions, sinks):
        sink.wait()
        assert "".join(sink.texts) == reference_answer(full_model, preprocessor.tokenizer, q, 8)


def test_the_engine_process_ends_its_requests_and_reports_its_state_at_shutdown(tiny_checkpoint, preprocessor):
    from internvl_serve.serving.llm import LLMService

    service = LLMService(tiny_checkpoint, device="cpu", engine_options={"engine_process": "true"})
    done, running = RecordingSink(), RecordingSink()
    service.submit(llm_request(preprocessor, "Hi.", max_tokens=4), done)
    done.wait()
    service.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True), running)
    service.shutdown()
    running.wait()
    assert done.reasons[-1] in ("stop", "length") and not done.errors
    assert len(running.errors) == 1 and "shut down" in running.errors[0] and not running.calls_after_final
    assert service.thread.process.returncode == 0 and service.num_active == 0
    state = service.engine  # the engine process's last report (what the metrics read)
    assert state.num_steps >= 4 and state.allocator.num_free == state.allocator.num_blocks > 0
    assert state.scheduler.num_running == state.scheduler.num_waiting == 0 and service.thread.busy_s > 0
    assert state.stats()["num_free_blocks"] == state.stats()["num_blocks"]  # (bench/engine_alone.py reads it)


def test_when_the_engine_process_dies_its_requests_fail_and_new_ones_are_refused(tiny_checkpoint, preprocessor):
    from internvl_serve.serving.llm import LLMService

    service = LLMService(tiny_checkpoint, device="cpu", engine_options={"engine_process": "true"})
    try:
        running = RecordingSink()
        service.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True), running)
        service.thread.process.kill()
        running.wait()
        assert len(running.errors) == 1 and "engine process exited" in running.errors[0]
        assert not running.calls_after_final and service.num_active == 0
        with pytest.raises(RuntimeError, match="cannot continue, restart the server"):
            service.submit(llm_request(preprocessor, "Hi.", max_tokens=4), RecordingSink())
    finally:
        service.shutdown()


def test_engine_options_from_parameters():
    from internvl_serve.serving.llm_engine import EngineOptions

    options = EngineOptions.from_parameters({"max_num_seqs": "4", "num_blocks": "", "enable_prefix_caching": "False",
                                             "gpu_memory_utilization": "0.5", "device": "cpu"})
    assert (options.max_num_seqs, options.num_blocks, options.enable_prefix_caching) == (4, None, False)
    assert options.gpu_memory_utilization == 0.5
    assert options.encoder_priority_ms == 0  # off unless asked for
    assert EngineOptions.from_parameters({"encoder_priority_ms": "0"}).encoder_priority_ms == 0
    assert EngineOptions.from_parameters({"encoder_priority_ms": "12.5"}).encoder_priority_ms == 12.5
    assert options.encoder_priority_linger_ms == 0
    assert EngineOptions.from_parameters({"encoder_priority_linger_ms": "5"}).encoder_priority_linger_ms == 5
    assert EngineOptions.from_parameters({"host_threads": "2"}).host_threads == 2
    assert EngineOptions().host_threads is None  # torch's default
    for key, bad in (("max_num_seqs", "0"), ("block_size", "x"), ("enable_prefix_caching", "yes"),
                     ("gpu_memory_utilization", "1.5"), ("encoder_priority_ms", "-1"), ("host_threads", "0"),
                     ("encoder_priority_ms", "soon"), ("encoder_priority_linger_ms", "-2")):
        with pytest.raises(ValueError, match=f"parameter '{key}'"):
            EngineOptions.from_parameters({key: bad})


def test_the_kv_sizing_is_told_in_the_load_log():
    from internvl_serve.serving.llm_engine import kv_sizing_text

    assert kv_sizing_text({}) == ""  # the CPU, or num_blocks given
    gib = 2**30
    text = kv_sizing_text({"total": 80 * gib, "device_in_use": 42 * gib, "own": 27 * gib, "reserved": 13 * gib,
                           "activations": gib // 4})
    assert text == "sized with 42.0 of 80.0 GiB in use on the device (own 27.0 + vision reserve 13.0; activations 0.25)"


def test_the_engine_waits_for_the_vision_forwards_of_its_device(tiny_checkpoint, tmp_path, monkeypatch):
    # the two services as the server runs them, joined by the launcher's record (here in one process)
    from internvl_serve.serving.encoder_activity import EncoderActivity, create_record
    from internvl_serve.serving.llm import LLMService
    from internvl_serve.serving.vision import VisionService

    monkeypatch.setenv("INTERNVL_ENCODER_ACTIVITY", str(create_record(tmp_path / "activity")))
    vision = VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0,
                           activity=EncoderActivity.from_environment())
    default = LLMService(tiny_checkpoint, device="cpu")
    held = LLMService(tiny_checkpoint, device="cpu", engine_options={"encoder_priority_ms": "20"})
    lingering = LLMService(tiny_checkpoint, device="cpu",  # busy for 10 s after each forward
                           engine_options={"encoder_priority_ms": "20", "encoder_priority_linger_ms": "10000"})
    try:
        assert default.built.encoder_activity is None and default.thread.encoder_priority_s == 0  # off by default
        assert held.thread.encoder_priority_s == 0.02
        busy, busy_after = held.thread._encoder_busy, lingering.thread._encoder_busy
        assert not busy() and not busy_after()
        seen = []
        vision.encoder.register_forward_hook(lambda *_: seen.append(busy()))
        vision.embed([np.zeros((2, 3, 448, 448), np.float32)])
        assert seen == [True] and not busy() and vision.encoder_slot.forwards == 1
        assert busy_after()  # the forward ended less than 10 s ago
    finally:
        default.shutdown()
        held.shutdown()
        lingering.shutdown()
        vision.encoder_slot.release()


def test_history_json_round_trip_matches_the_card_history(preprocessor):
    # what a client sends as `history` is json.dumps of the card's [(question, answer), ...]
    from internvl_serve.serving.parsing import parse_chat_request

    history = [("<image>\nWhat is it?", "A cat.")]
    request = parse_chat_request({"text_input": np.array([b"And?"], dtype=object),
                                  "history": np.array([json.dumps(history).encode()], dtype=object),
                                  "images": np.array([png(1)], dtype=object)})
    out = preprocessor(request)
    assert count_context(preprocessor, out.input_ids) == preprocessor.config.num_image_token


def test_the_engine_process_ends_when_the_stub_that_started_it_dies(tiny_checkpoint, tmp_path):
    """A stub killed outright (SIGKILL: no finalize) must not leave its engine process holding the device:
    the engine process reads the end of the connection and exits (waited for on a pidfd: no clock)."""
    import os
    import select
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import internvl_serve

    script = tmp_path / "stub.py"
    script.write_text(
        "import sys\n"
        "from internvl_serve.serving.llm import LLMService\n"
        f"s = LLMService({str(tiny_checkpoint)!r}, device='cpu', engine_options={{'engine_process': 'true'}})\n"
        "print(s.thread.process.pid, flush=True)\n"
        "sys.stdin.read()\n")  # blocks until killed
    root = Path(internvl_serve.__file__).resolve().parents[1]
    stub = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    engine_pid = int(stub.stdout.readline())
    engine = os.pidfd_open(engine_pid)
    try:
        assert engine_pid != stub.pid and not select.select([engine], [], [], 0)[0]  # it runs
        stub.send_signal(signal.SIGKILL)
        stub.wait()
        assert select.select([engine], [], [])[0] == [engine]  # readable once the engine process has exited
    finally:
        os.close(engine)
        stub.stdin.close()
        stub.stdout.close()


def test_host_threads_empty_is_one_on_a_gpu_and_torchs_default_on_the_cpu():
    from internvl_serve.serving.device import host_threads_for

    assert host_threads_for(None, "cuda:1") == 1 and host_threads_for(None, torch.device("cuda")) == 1
    assert host_threads_for(None, "cpu") is None  # the CPU forwards use every core
    assert host_threads_for(3, "cuda") == 3 and host_threads_for(3, "cpu") == 3
    with pytest.raises(ValueError, match="host_threads must be >= 1, got 0"):
        host_threads_for(0, "cpu")


def test_host_threads_set_torchs_threads_in_each_process_of_the_model(tiny_checkpoint, tmp_path):
    """host_threads: torch's CPU threads in the vision model's process, the llm stub and its engine
    process (in a child process here: the setting is per process). Empty: torch's default there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import internvl_serve

    script = tmp_path / "threads.py"
    script.write_text(
        "import torch\n"
        "from internvl_serve.serving.llm import LLMService\n"
        "from internvl_serve.serving.vision import VisionService\n"
        "default = torch.get_num_threads()\n"
        f"llm = LLMService({str(tiny_checkpoint)!r}, device='cpu', engine_options={{'engine_process': 'true'}})\n"
        "print(default, torch.get_num_threads(), llm.engine_info['host_threads'], flush=True)\n"
        "llm.shutdown()\n"
        f"llm = LLMService({str(tiny_checkpoint)!r}, device='cpu', engine_options={{'engine_process': 'true', "
        "'host_threads': '1'})\n"
        "print(torch.get_num_threads(), llm.engine_info['host_threads'], flush=True)\n"
        "llm.shutdown()\n"
        "torch.set_num_threads(default)\n"
        f"VisionService({str(tiny_checkpoint)!r}, device='cpu', host_threads=1)\n"
        "print(torch.get_num_threads(), flush=True)\n")
    root = Path(internvl_serve.__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [[int(n) for n in line.split()] for line in run.stdout.splitlines()]
    assert lines == [[2, 2, 2], [1, 1], [1]], run.stdout
