"""internvl_serve.reference (the model card's chat / batch_chat / stream_chat) on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_serve import reference as R
from internvl_serve.checkpoint import load_model
from internvl_serve.imageproc import load_preprocessor_config
from internvl_serve.prompt import build_prompt, resolve_num_patches_list, separate_images_question, video_question
from internvl_serve.tokenizer import load_tokenizer

GEN = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def card(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32, device="cpu", progress=False)
    tokenizer = load_tokenizer(tiny_checkpoint)
    preprocessor = load_preprocessor_config(tiny_checkpoint)
    r = np.random.RandomState(0)
    images = [Image.fromarray(r.randint(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(3)]
    pixel_values = torch.cat([R.load_image(img, preprocessor) for img in images])   # (3, 3, 448, 448)
    return model, tokenizer, pixel_values


def twice(fn):
    first, second = fn(), fn()
    assert first == second, "not deterministic"
    return first


def test_pure_text(card):
    model, tok, _ = card
    answer = twice(lambda: R.chat(model, tok, None, "Hello, who are you?", GEN))
    assert isinstance(answer, str) and answer
    assert answer != R.chat(model, tok, None, "请详细描述这张图片。", GEN)   # the question matters


def test_one_image_one_round(card):
    model, tok, pv = card
    answer = twice(lambda: R.chat(model, tok, pv[:1], "Please describe the image shortly.", GEN))
    assert answer
    # the image matters, and so does its content
    assert answer != R.chat(model, tok, None, "Please describe the image shortly.", GEN)
    assert answer != R.chat(model, tok, pv[1:2], "Please describe the image shortly.", GEN)
    # bf16 pixel values are cast to the model's dtype, as the card's users cast them to the model's
    assert R.chat(model, tok, pv[:1].to(torch.bfloat16), "Please describe the image shortly.", GEN)


def test_multi_round_with_history(card):
    model, tok, pv = card
    q1 = "Please describe the image in detail."
    a1, history = R.chat(model, tok, pv[:1], q1, GEN, history=None, return_history=True)
    assert history == [("<image>\n" + q1, a1)]
    q2 = "Please write a poem according to the image."
    a2, history2 = twice(lambda: R.chat(model, tok, pv[:1], q2, GEN, history=history, return_history=True))
    assert a2 and history2 == [("<image>\n" + q1, a1), (q2, a2)]
    assert history == [("<image>\n" + q1, a1)]  # the caller's list is left alone


def test_two_images_combined_and_separate(card):
    model, tok, pv = card
    combined = twice(lambda: R.chat(model, tok, pv[:2], "Describe the two images in detail.", GEN))
    question = separate_images_question("What are the similarities and differences between these two images.", 2)
    separate = twice(lambda: R.chat(model, tok, pv[:2], question, GEN, num_patches_list=[1, 1]))
    assert combined and separate
    with pytest.raises(ValueError, match="does not sum"):
        R.chat(model, tok, pv[:2], question, GEN, num_patches_list=[1])


def test_batch_chat_equals_individual_chats(card):
    model, tok, pv = card
    questions = ["Describe the image in detail.", "Describe the image shortly.", "What is in the picture?"]
    batch = twice(lambda: R.batch_chat(model, tok, pv, questions, GEN, num_patches_list=[1, 1, 1]))
    single = [R.chat(model, tok, pv[i:i + 1], q, GEN) for i, q in enumerate(questions)]
    assert batch == single and all(batch)
    # two images for the first question, one for the second (the card's image_counts)
    batch2 = R.batch_chat(model, tok, pv, questions[:2], GEN, num_patches_list=[2, 1])
    assert batch2 == [R.chat(model, tok, pv[:2], questions[0], GEN), R.chat(model, tok, pv[2:], questions[1], GEN)]
    texts = ["Hello, who are you?", "你好"]
    assert R.batch_chat(model, tok, None, texts, GEN) == [R.chat(model, tok, None, q, GEN) for q in texts]
    with pytest.raises(NotImplementedError):
        R.batch_chat(model, tok, pv, questions, GEN, num_patches_list=[1, 1, 1], history=[])


def test_video_eight_frames(card, tiny_checkpoint, tiny_video_bytes):
    model, tok, _ = card
    pixel_values, num_patches_list = R.load_video(tiny_video_bytes, num_segments=8,
                                                  preprocessor=load_preprocessor_config(tiny_checkpoint))
    assert pixel_values.shape == (8, 3, 448, 448) and num_patches_list == [1] * 8
    question = video_question("What is the red panda doing?", len(num_patches_list))
    answer = twice(lambda: R.chat(model, tok, pixel_values, question, GEN, num_patches_list=num_patches_list))
    assert answer


@pytest.mark.parametrize("scenario", ["text", "image", "history", "video"])
def test_stream_deltas_concatenate_to_the_answer(card, tiny_video_bytes, scenario):
    model, tok, pv = card
    gen = dict(max_new_tokens=24, do_sample=False)
    kwargs: dict = {}
    if scenario == "text":
        args = (None, "Hello, who are you?")
    elif scenario == "image":
        args = (pv[:1], "Please describe the image shortly.")
    elif scenario == "history":
        _, history = R.chat(model, tok, pv[:1], "Describe.", gen, return_history=True)
        args, kwargs = (pv[:1], "And then?"), {"history": history}
    else:
        frames, patches = R.load_video(tiny_video_bytes, num_segments=4)
        args, kwargs = (frames, video_question("What happens?", 4)), {"num_patches_list": patches}
    deltas = list(R.stream_chat(model, tok, *args, gen, **kwargs))
    answer = R.chat(model, tok, *args, gen, **kwargs)
    assert "".join(deltas) == answer
    assert len(deltas) > 1 and all(deltas)


def test_reference_prompt_equals_the_serving_prompt(card):
    """The card's query (reference) and prompt.py's serving rule give the same token ids."""
    model, tok, pv = card
    n_tok = model.config.num_image_token
    history = [("<image>\nDescribe.", "A cat.")]
    for question, hist, n, patches in [("Describe.", None, 1, None), ("More?", history, 1, None),
                                       ("Both?", None, 2, None),
                                       (separate_images_question("Diff?", 2), None, 2, [1, 1])]:
        q, resolved = resolve_num_patches_list(question, hist, n, patches)
        serving_ids = tok.encode(build_prompt(q, hist, resolved, n_tok))
        _, _, query, ids, mask = R.prepare_chat(model, tok, pv[:n], question, hist, patches,
                                                 "<img>", "</img>", "<IMG_CONTEXT>")
        assert ids[0].tolist() == serving_ids and bool(mask.all())
        assert serving_ids.count(tok.special_tokens.img_context_id) == n * n_tok


def test_input_embeddings_splice_images_in_order(card):
    """The card's generate(): <IMG_CONTEXT> rows, in order, become the ViT embeddings of the images."""
    model, tok, pv = card
    n_tok = model.config.num_image_token
    q, patches = resolve_num_patches_list(separate_images_question("Diff?", 2), None, 2)
    ids = torch.tensor([tok.encode(build_prompt(q, None, patches, n_tok))])
    ctx = tok.special_tokens.img_context_id
    embeds = R.input_embeddings(model, ids, pv[:2], ctx)[0]
    with torch.no_grad():
        vit = model.extract_feature(pv[:2])                              # (2, 256, C)
        tokens = model.language_model.get_input_embeddings()(ids)[0]
    positions = (ids[0] == ctx).nonzero().flatten()
    assert positions.numel() == 2 * n_tok
    assert torch.equal(embeds[positions[:n_tok]], vit[0]) and torch.equal(embeds[positions[n_tok:]], vit[1])
    others = ids[0] != ctx
    assert torch.equal(embeds[others], tokens[others])
    with pytest.raises(ValueError, match="holds 512 <IMG_CONTEXT> tokens but the images give 256"):
        R.input_embeddings(model, ids, pv[:1], ctx)
