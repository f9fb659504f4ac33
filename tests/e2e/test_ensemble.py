"""The `internvl_chat` ensemble on a real tritonserver, against the model card's chat.

Every answer must be EXACTLY what internvl_serve.reference.chat (transformers generate, greedy) says
on the same tiny checkpoint, computed here in the test process; streamed deltas must concatenate to
it. Covers the card's scenarios, HTTP generate_stream, 16 concurrent streams, refused requests (and
the server going on), and cancellation.
"""
from __future__ import annotations

import base64
import json
import re
import threading

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from e2e_client import (image_bytes, in_parallel, make_inputs, mjpeg_avi, read_stream, sse_chat,  # noqa: F401
                        stream_chat, stream_chat_to, wait_for)  # (image_bytes: used here and by other modules)
from internvl_serve.serving.contract import ENSEMBLE

MAX_TOKENS = 12  # short answers keep the module fast on 2 cores


# ---- the oracle -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    from internvl_serve import reference
    from internvl_serve.checkpoint import load_model
    from internvl_serve.imageproc import load_preprocessor_config
    from internvl_serve.tokenizer import load_tokenizer

    model = load_model(tiny_checkpoint, dtype=torch.float32, parts=("vision", "language"), progress=False)
    tokenizer = load_tokenizer(tiny_checkpoint)
    preprocessor = load_preprocessor_config(tiny_checkpoint)
    lock = threading.Lock()

    def chat(question, images=(), *, history=None, num_patches_list=None, video=None, num_segments=8,
             max_tokens=MAX_TOKENS):
        pixel_values = None
        if video is not None:
            pixel_values, video_patches = reference.load_video(video, num_segments, preprocessor=preprocessor)
            if history is None:
                question = reference.video_chat_question(question, video_patches)
            num_patches_list = video_patches
        elif images:
            pixel_values = torch.cat([reference.load_image(b, preprocessor) for b in images])
        with lock, torch.inference_mode():
            return reference.chat(model, tokenizer, pixel_values, question,
                                  dict(max_new_tokens=max_tokens, do_sample=False),
                                  history=history, num_patches_list=num_patches_list)

    return chat


def ask(server, question, images=(), *, model=ENSEMBLE, **extra):
    values = {"text_input": question, "max_tokens": MAX_TOKENS, "stream": True, **extra}
    if images:
        values["images"] = list(images)
    return stream_chat_to(server, model, make_inputs(**values))


def assert_answer(answer, expected):
    assert answer.error is None, answer.error
    assert answer.text == expected
    assert answer.finals == 1
    assert answer.finish_reasons[-1] in ("stop", "length")
    assert all(r == "" for r in answer.finish_reasons[:-1])
    assert answer.num_output_tokens <= MAX_TOKENS and answer.num_input_tokens > 0


def assert_text_and_image_answers(server, oracle, image_seed: int, *, model=ENSEMBLE):
    """The smoke check of another way to serve the contract (BLS, tensor parallel): a pure-text answer
    and a one-image answer equal the card's. Returns the image question and its image."""
    question = "Hello, who are you?"
    assert_answer(ask(server, question, model=model), oracle(question))
    image = image_bytes(image_seed)
    question = "<image>\nWhat is in the image?"
    assert_answer(ask(server, question, [image], model=model), oracle(question, [image]))
    return question, image


def assert_concurrent_answers(server, oracle, n: int = 6):
    """n streams at once, each with its own question: each gets the card's answer to its own."""
    questions = [f"Tell me a fact number {i}." for i in range(n)]
    answers = [None] * n

    def one(i):
        answers[i] = ask(server, questions[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for question, answer in zip(questions, answers):
        assert answer is not None
        assert_answer(answer, oracle(question))


# ---- the card's scenarios ----------------------------------------------------------------------------


def test_pure_text(server, oracle):
    question = "Hello, who are you?"
    assert_answer(ask(server, question), oracle(question))


def test_one_image_one_round(server, oracle):
    image = image_bytes(1)
    question = "<image>\nPlease describe the image shortly."
    answer = ask(server, question, [image])
    assert_answer(answer, oracle(question, [image]))
    assert answer.num_input_tokens > 256  # the image's 256 context tokens are in the prompt


def test_image_placeholder_is_added_when_missing(server, oracle):
    image = image_bytes(2, fmt="JPEG")
    assert_answer(ask(server, "What is this?", [image]), oracle("What is this?", [image]))


def test_one_image_several_rounds_with_history(server, oracle):
    image = image_bytes(3)
    q1 = "<image>\nPlease describe the image in detail."
    a1 = oracle(q1, [image])
    assert_answer(ask(server, q1, [image]), a1)
    history = [(q1, a1)]
    q2 = "Please write a poem according to the image."
    answer = ask(server, q2, [image], history=json.dumps(history))
    assert_answer(answer, oracle(q2, [image], history=history))


def test_two_images_combined(server, oracle):
    images = [image_bytes(4), image_bytes(5)]
    question = "<image>\nDescribe the two images in detail."
    answer = ask(server, question, images)
    assert_answer(answer, oracle(question, images))


def test_two_images_separate(server, oracle):
    images = [image_bytes(6), image_bytes(7)]
    question = "Image-1: <image>\nImage-2: <image>\nWhat are the similarities and differences?"
    answer = ask(server, question, images, num_patches_list=[1, 1])
    assert_answer(answer, oracle(question, images, num_patches_list=[1, 1]))


def test_video_eight_frames(server, oracle):
    rng = np.random.default_rng(8)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(16)]
    video = mjpeg_avi(frames)
    question = "What is happening in the video?"
    answer = stream_chat(server, make_inputs(text_input=question, video=video, num_segments=8,
                                             max_tokens=MAX_TOKENS, stream=True))
    assert_answer(answer, oracle(question, video=video, num_segments=8))
    assert answer.num_input_tokens > 8 * 256


def run_concurrently(server, requests_: list[dict]) -> list:
    """Each request on its own thread and gRPC stream, all sent at once."""
    return in_parallel(lambda i=i, r=r: stream_chat(server, make_inputs(**r), request_id=f"r{i}")
                       for i, r in enumerate(requests_))

def test_a_batch_of_different_requests_at_once(server, oracle):
    cases = [
        ("Hello, who are you?", []),
        ("<image>\nPlease describe the image shortly.", [image_bytes(10)]),
        ("What color dominates?", [image_bytes(11, size=(300, 200))]),
        ("<image>\nCompare them.", [image_bytes(12), image_bytes(13)]),
    ]
    answers = run_concurrently(server, [dict(text_input=q, images=list(i), max_tokens=MAX_TOKENS, stream=True)
                                        if i else dict(text_input=q, max_tokens=MAX_TOKENS, stream=True)
                                        for q, i in cases])
    for (question, images), answer in zip(cases, answers):
        assert_answer(answer, oracle(question, images))


def test_sixteen_concurrent_streams_each_get_their_own_answer(server, oracle):
    stats_url = f"{server.http_url}/v2/models/vision/stats"
    before = requests.get(stats_url, timeout=10).json()["model_stats"][0]
    images = [image_bytes(100 + i) for i in range(16)]
    question = "<image>\nDescribe the image."
    answers = run_concurrently(server, [dict(text_input=question, images=[im], max_tokens=MAX_TOKENS, stream=True)
                                        for im in images])
    expected = [oracle(question, [im]) for im in images]
    assert len(set(expected)) > 1  # different images give different answers: a mix-up would show
    for answer, want in zip(answers, expected):
        assert_answer(answer, want)
    after = requests.get(stats_url, timeout=10).json()["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    cap = requests.get(f"{server.http_url}/v2/models/vision/config", timeout=10).json()["max_batch_size"]
    assert inferences == 16
    if cap > 1:  # the repository's 8 (on the CPU): the vision model batched requests together
        assert executions < inferences
    else:  # a GPU in bf16 (layout.auto_vision_max_batch_size): one request per forward
        assert executions == inferences


def test_concurrent_preprocess_calls_each_get_their_own_pixel_values(server, tiny_checkpoint):
    """The preprocess adapter answers with views of reused buffers (Preprocessor's output_slot,
    internvl_serve/hostbuf.py), valid until its next execute: requests sent at once to its two instances
    (new images, one or two each, so the buffers also grow) must each get exactly their own images' pixel
    values and prompt, as the service computes them in this process."""
    import tritonclient.grpc as grpcclient

    from internvl_serve.serving.contract import ChatRequest
    from internvl_serve.serving.preprocess import Preprocessor

    question = "<image>\nDescribe the image."
    cases = [[image_bytes(200 + k, size=(96 + 8 * k, 80))] + ([image_bytes(300 + k)] if k % 3 == 1 else [])
             for k in range(12)]
    url = server.triton_grpc_url  # tritonserver itself: the composing models too

    def call(images):
        client = grpcclient.InferenceServerClient(url)
        result = client.infer("preprocess", make_inputs(text_input=question, images=images))
        return result.as_numpy("input_ids"), result.as_numpy("pixel_values")

    answers = in_parallel([lambda images=images: call(images) for images in cases])
    preprocessor = Preprocessor(tiny_checkpoint)
    for images, (ids, pixels) in zip(cases, answers):
        want = preprocessor(ChatRequest(question=question, images=images))
        assert np.array_equal(ids, want.input_ids)
        assert pixels.shape == (1, *want.pixel_values.shape) and np.array_equal(pixels[0], want.pixel_values)


# ---- streaming and response shaping -------------------------------------------------------------------


def test_streamed_deltas_and_single_response_agree(server, oracle):
    image = image_bytes(20)
    question = "<image>\nTell me a story about this picture."
    expected = oracle(question, [image])
    streamed = ask(server, question, [image])
    assert_answer(streamed, expected)
    assert len(streamed.deltas) > 1
    single = ask(server, question, [image], stream=False)
    assert_answer(single, expected)
    assert len(single.deltas) == 1
    assert single.num_output_tokens == streamed.num_output_tokens


def test_input_is_echoed_when_asked(server, oracle):
    question = "Say something."
    answer = ask(server, question, exclude_input_in_output=False)
    assert answer.text == question + oracle(question)


def test_http_generate_stream_sse(server, oracle):
    image = image_bytes(30)
    question = "<image>\nPlease describe the image shortly."
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    status, events = sse_chat(server, {"text_input": question, "images": [url], "max_tokens": MAX_TOKENS,
                                       "stream": True})
    assert status == 200, events
    assert events and all("error" not in e for e in events), events
    assert "".join(e["text_output"] for e in events) == oracle(question, [image])
    assert [e["finish_reason"] for e in events][-1] in ("stop", "length")
    status, [body] = sse_chat(server, {"text_input": "Hello, who are you?", "max_tokens": MAX_TOKENS},
                              stream=False)
    assert status == 200 and body["text_output"] == oracle("Hello, who are you?")


# ---- refused requests ------------------------------------------------------------------------------------


def assert_served(server, oracle):
    assert_answer(ask(server, "Hello, who are you?"), oracle("Hello, who are you?"))


@pytest.mark.parametrize("values, message", [
    (dict(images=[b"this is not an image"]), "input 'images[0]': image data is not a supported image"),
    (dict(max_tokens=(16.0, "FP32")), "max_tokens"),
    (dict(text_input="   "), "input 'text_input' is empty"),
    (dict(history="[[1, 2"), "input 'history' is not valid JSON"),
    (dict(text_input="<image>\n<image>\nTwo?", images=[image_bytes(0)] * 3), "placeholders"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_requests_get_a_clear_error_and_the_next_is_served(server, oracle, values, message):
    values = {"text_input": "What is it?", "max_tokens": MAX_TOKENS, **values}
    answer = stream_chat(server, make_inputs(**values))
    assert answer.error is not None and message in answer.error, answer.error
    assert not answer.deltas
    assert_served(server, oracle)


def test_http_errors_are_reported(server):
    status, events = sse_chat(server, {"text_input": "", "max_tokens": MAX_TOKENS})
    assert status == 400 or any("error" in e for e in events), (status, events)


# ---- cancellation ---------------------------------------------------------------------------------------


KEY = "k" * 32  # the cancel_key these tests send with the requests they cancel (docs/contract.md)


def start_and_cancel(server, request_id: str, max_tokens: int, *, cancel_key: str | None = KEY,
                     direct: bool = False) -> None:
    """Start a long streamed generation, wait for its first response, then cancel the gRPC stream.
    direct: to tritonserver itself, past the launcher's gRPC guard (which cancels the generation of a
    stream that ends early on its own: docs/security.md), to see the side channel alone."""
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.triton_grpc_url if direct else server.grpc_url)
    responses: queue.Queue = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        keyed = {"cancel_key": cancel_key} if cancel_key else {}
        inputs = make_inputs(text_input="Talk for a long time.", max_tokens=max_tokens, stream=True, **keyed)
        client.async_stream_infer("internvl_chat", inputs, request_id=request_id)
        result, error = responses.get(timeout=120)  # generation has started
        assert error is None, str(error)
        client.stop_stream(cancel_requests=True)
    finally:
        client.close()


def test_the_server_goes_on_after_a_client_cancels(server, oracle):
    start_and_cancel(server, "cancelled-1", max_tokens=200)
    assert_served(server, oracle)


def test_cancelling_an_in_flight_generation_aborts_it_in_the_engine(server):
    """Triton 2.51's ensemble never tells the running llm step that its client cancelled; the launcher's
    gRPC guard sees the stream end before the final response and sends the side channel's cancel."""
    start_and_cancel(server, "cancelled-2", max_tokens=1000)
    wait_for(server, lambda: re.search(r"request cancelled-2#\d+ cancelled by the client", server.log_tail(400))
             is not None, timeout_s=120, what="the llm model to log the abort")


def cancel_on_the_side_channel(server, request_id: str, cancel_key: str | None = KEY):
    """What any client does after stopping a stream: send the llm model `cancel_request_id` with the
    request's `cancel_key` (docs/contract.md). The finish_reason of that request's one response, or the
    Answer when it was refused."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in (("cancel_request_id", request_id), ("cancel_key", cancel_key)):
        if value is not None:
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
            tensors.append(tensor)
    answer = stream_chat_to(server, "llm", tensors)
    if answer.error is not None:
        return answer
    assert answer.finals == 1 and answer.text == ""
    return answer.finish_reasons[-1]


def test_the_cancel_side_channel_aborts_an_in_flight_generation(server):
    start_and_cancel(server, "cancelled-3", max_tokens=1000, direct=True)
    assert cancel_on_the_side_channel(server, "cancelled-3", "x" * 32) == "not_found"  # not its key
    assert cancel_on_the_side_channel(server, "cancelled-3") == "cancelled"
    wait_for(server, lambda: re.search(r"request cancelled-3#\d+ cancelled by the client", server.log_tail(400))
             is not None, timeout_s=120, what="the llm model to log the abort")
    # an id that is not running (any more): nothing to abort, a clear answer
    assert cancel_on_the_side_channel(server, "cancelled-3") == "not_found"
    assert cancel_on_the_side_channel(server, "no-such-request") == "not_found"


# ---- cancellation is owned (issue #14): another client's id is not enough ---------------------------------

LONG = 200  # tokens: the victim is still generating while the other client cancels


def start_stream(server, model, request_id, question, max_tokens, **extra):
    """A streamed request whose first response has arrived: (client, responses queue, first Answer)."""
    import queue

    import tritonclient.grpc as grpcclient

    from e2e_client import Answer

    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(model, make_inputs(text_input=question, max_tokens=max_tokens, stream=True, **extra),
                              request_id=request_id, enable_empty_final_response=True)
    answer = Answer()
    result, error = responses.get(timeout=120)
    assert error is None, str(error)
    answer.add(result)
    return client, responses, answer


def finish_stream(server, client, responses, answer):
    """Read the stream to its final response (or error); the Answer."""
    try:
        return read_stream(server, responses, answer, timeout_s=300)
    finally:
        client.stop_stream()
        client.close()


def test_another_client_cannot_cancel_a_request_by_its_id(server, oracle):
    """Finding: `cancel_request_id` cancelled by the client's request id with no owner check. A second
    client that knows (or reuses) the id cannot cancel the first one's request: a cancellation without
    the key is refused, one with another key finds nothing; the first client gets the card's answer."""
    question = "Talk for a long time."
    victim = start_stream(server, ENSEMBLE, "shared-1", question, LONG)  # sent without a key: not cancellable
    refused = cancel_on_the_side_channel(server, "shared-1", None)  # the id alone
    other_key = cancel_on_the_side_channel(server, "shared-1", "x" * 32)  # the id and another key
    answer = finish_stream(server, *victim)
    assert answer.error is None and answer.finish_reasons[-1] in ("stop", "length"), answer
    assert answer.text == oracle(question, max_tokens=LONG)
    assert not isinstance(refused, str) and "needs input 'cancel_key'" in refused.error, refused
    assert other_key == "not_found"


def test_two_clients_with_the_same_request_id_each_cancel_only_their_own(server, oracle):
    question = "Talk for a long time."
    victim = start_stream(server, ENSEMBLE, "shared-2", question, LONG, cancel_key="v" * 32)
    start_and_cancel(server, "shared-2", max_tokens=1000, cancel_key="w" * 32, direct=True)  # the other leaves...
    assert cancel_on_the_side_channel(server, "shared-2", "w" * 32) == "cancelled"  # ... and cancels its own
    answer = finish_stream(server, *victim)
    assert answer.error is None and answer.finish_reasons[-1] in ("stop", "length"), answer
    assert answer.text == oracle(question, max_tokens=LONG)
