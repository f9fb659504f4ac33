"""The vision model's embedding cache through a real tritonserver: a server whose vision cache holds only two
tiles (a copy of model_repository with `image_cache_mb` changed, and the vision model's dynamic batches capped
at two requests: the layout's vision_max_batch_size), requests that hit, miss and evict; every
answer must equal the model card's chat (internvl_serve.reference, fresh encodes) on the tiny checkpoint, and
a repeated request its first answer. Where the server exports the cache counters as Prometheus metrics,
they must count the hits and misses this sequence makes. The llm of this server holds its decode steps for
the encoder (`encoder_priority_ms`, off by default), which must leave every answer as it is, and the vision
model flags each forward in the server's encoder-activity record."""
from __future__ import annotations

import json

import pytest

from e2e_client import image_bytes, make_inputs, metric, stream_chat, wait_for
from test_ensemble import MAX_TOKENS, oracle  # noqa: F401  (oracle: the card's chat, a fixture)
from internvl_serve.serving.launcher import TritonServer
from internvl_serve.serving.layout import Layout

TILE_MIB = 256 * 128 * 4 / 2**20  # tiny checkpoint: 256 image tokens x hidden 128, float32 on the CPU
VISION_BATCH = 2  # requests per vision call at most on this server (the repository's 8)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("vision-cache")
    layout = Layout(vision_parameters={"image_cache_mb": f"{2.4 * TILE_MIB:.4f}"},
                    llm_parameters={"encoder_priority_ms": "20"}, vision_max_batch_size=VISION_BATCH)
    with TritonServer(tiny_checkpoint, layout=layout, log_file=work / "server.log", exit_timeout_s=5,
                      ready_timeout_s=300) as s:
        record = s.encoder_activity
        yield s
    assert not record.exists()  # removed with the server


def ask(server, question, images, **extra) -> str:
    answer = stream_chat(server, make_inputs(text_input=question, images=list(images), max_tokens=MAX_TOKENS,
                                             stream=True, **extra))
    assert answer.error is None, answer.error
    assert answer.finals == 1
    return answer.text


def test_hits_misses_and_evictions_give_the_cards_answers(server, oracle):
    a, b, c = image_bytes(11), image_bytes(12), image_bytes(13)
    q = "<image>\nPlease describe the image shortly."
    first = ask(server, q, [a])                               # miss: cache [a]
    assert first == oracle(q, [a])
    assert ask(server, q, [a]) == first                       # hit
    q2 = "<image>\nDescribe the two images."
    assert ask(server, q2, [b, c]) == oracle(q2, [b, c])      # two misses: a is evicted, cache [b, c]
    assert ask(server, q, [a]) == first                       # miss again (encoded anew): cache [c, a]
    history = [(q, first)]
    q3 = "Please write a poem according to the image."
    assert ask(server, q3, [a], history=json.dumps(history)) == oracle(q3, [a], history=history)   # hit
    # tiles: hits 2 (requests 2 and 5), misses 4 (a, b, c, a again)
    if metric(server, "internvl_image_cache_hits_total") is None:
        return  # this server exports no cache metrics: the answers above are the test
    wait_for(server, lambda: (metric(server, "internvl_image_cache_hits_total"),
                              metric(server, "internvl_image_cache_misses_total")) == (2, 4),
             timeout_s=20, what="the image-cache counters to read 2 hits and 4 misses")


def test_concurrent_direct_calls_each_get_their_own_tiles_embeddings(server, tiny_checkpoint):
    """The adapter answers with views of the service's reused output buffer (internvl_serve/hostbuf.py): requests
    sent at once (dynamic batching: several executes in a row, new tiles, the two-tile cache evicting)
    must each get the embeddings of their own tiles, not a later batch's. Triton's statistics show every
    call took at most VISION_BATCH requests, as the layout set (with the repository's 8 the same calls
    ran batches of 8 here)."""
    import numpy as np
    import requests as http
    import tritonclient.grpc as grpcclient

    from internvl_serve.serving.vision import VisionService
    from e2e_client import in_parallel

    fresh = VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0)
    requests = [np.random.default_rng(100 + k).standard_normal((1, 1 + k % 2, 3, 448, 448), dtype=np.float32)
                for k in range(12)]
    url = server.triton_grpc_url  # tritonserver itself: every model, the composing ones too

    def call(pixels):
        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        return client.infer("vision", [tensor]).as_numpy("image_embeds")[0]

    stats_url = f"{server.http_url}/v2/models/vision/stats"
    before = http.get(stats_url, timeout=10).json()["model_stats"][0]
    answers = in_parallel([lambda p=p: call(p) for p in requests])
    for pixels, got in zip(requests, answers):
        want = fresh.embed([pixels[0]])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    after = http.get(stats_url, timeout=10).json()["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == len(requests)
    calls = {b["batch_size"]: int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    assert calls and max(calls) <= VISION_BATCH, calls
    assert sum(size * n for size, n in calls.items()) == after["inference_count"]


def test_the_vision_model_flags_its_forwards_in_the_servers_record(server):
    from internvl_serve.serving.encoder_activity import DEVICE, FORWARDS, PID, EncoderActivity

    record = EncoderActivity(server.encoder_activity)
    vision = [pid for pid, name in server.stub_processes().items() if name.startswith("vision_")]
    assert len(vision) == 1
    slot = record.slots[record.slots[:, PID] == vision[0]]
    assert len(slot) == 1 and slot[0, DEVICE] == -1  # its device: the CPU
    before = int(slot[0, FORWARDS])
    q = "<image>\nPlease describe the image shortly."
    ask(server, q, [image_bytes(21)])                                   # a new image: one forward
    ask(server, q, [image_bytes(21)])                                   # cached: none
    assert int(record.slots[record.slots[:, PID] == vision[0]][0, FORWARDS]) == before + 1
