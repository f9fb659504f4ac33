"""internvl_serve.prompt: the internvl_zh template, <image> expansion and the placeholder rule.

Expected prompts are written out literally (2 image tokens per image to keep them readable); their
token ids are checked against transformers 4.37.2's, recorded in the tokenizer fixture (whose script
writes the card's prompts out by hand, with 256 / 4 tokens per image).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_serve.prompt import (
    HERMES_2, INTERNVL_ZH, PromptError, build_prompt, clean_response, count_image_placeholders, get_template,
    resolve_num_patches_list, separate_images_question, video_question,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_ids_transformers437.json"
C2 = "<IMG_CONTEXT><IMG_CONTEXT>"  # one image at num_image_token=2
IMG = "<img>" + C2 + "</img>"


def serve_prompt(question, history, num_images, num_image_token=2, num_patches_list=None):
    question, patches = resolve_num_patches_list(question, history, num_images, num_patches_list)
    return build_prompt(question, history, patches, num_image_token, "internvl_zh"), patches


# ---- the card's scenarios --------------------------------------------------------------------------------
def test_pure_text():
    assert serve_prompt("Hello, who are you?", None, 0) == (" <human>: Hello, who are you? <bot>:", [])
    assert serve_prompt("Hello", [], 0) == (" <human>: Hello <bot>:", [])


def test_one_image_one_round():
    question, patches = resolve_num_patches_list("Please describe the image shortly.", None, 1)
    assert (question, patches) == ("<image>\nPlease describe the image shortly.", [1])
    assert build_prompt(question, None, patches, 2) == (
        " <human>: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nPlease describe the image shortly. <bot>:")


def test_multi_round_with_history():
    history = [("<image>\nPlease describe the image in detail.", "The image shows a cat.")]
    prompt, patches = serve_prompt("Please write a poem according to the image.", history, 1)
    assert patches == [1]
    assert prompt == (" <human>: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nPlease describe the image in detail."
                      " <bot>: The image shows a cat.</s><human>: Please write a poem according to the image. <bot>:")
    history3 = history + [("Please write a poem according to the image.", "A cat sat.")]
    prompt3, _ = serve_prompt("Why?", history3, 1)
    assert prompt3 == (" <human>: " + IMG + "\nPlease describe the image in detail. <bot>: The image shows a cat.</s>"
                       "<human>: Please write a poem according to the image. <bot>: A cat sat.</s>"
                       "<human>: Why? <bot>:")


def test_two_images_combined():
    prompt, patches = serve_prompt("Describe the two images in detail.", None, 2)
    assert patches == [2]
    assert prompt == (" <human>: <img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\n"
                      "Describe the two images in detail. <bot>:")


def test_two_images_separate():
    question = separate_images_question("What are the similarities and differences between these two images.", 2)
    assert question == ("Image-1: <image>\nImage-2: <image>\n"
                        "What are the similarities and differences between these two images.")
    prompt, patches = serve_prompt(question, None, 2)
    assert patches == [1, 1]
    assert prompt == (" <human>: Image-1: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nImage-2: "
                      "<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
                      "What are the similarities and differences between these two images. <bot>:")
    # the same with the card's explicit num_patches_list
    assert serve_prompt(question, None, 2, num_patches_list=[1, 1]) == (prompt, [1, 1])


def test_batch_prompts():
    # batch_chat: one prompt per question, each with its own image
    prompts = [serve_prompt(q, None, 1)[0] for q in ("Describe the image in detail.", "Describe the image shortly.")]
    assert prompts == [" <human>: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image in detail. <bot>:",
                       " <human>: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image shortly. <bot>:"]


def test_video_eight_frames():
    question = video_question("What is the red panda doing?", 8)
    assert question == ("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\n"
                        "Frame5: <image>\nFrame6: <image>\nFrame7: <image>\nFrame8: <image>\n"
                        "What is the red panda doing?")
    prompt, patches = serve_prompt(question, None, 8, num_image_token=1)
    assert patches == [1] * 8
    one = "<img><IMG_CONTEXT></img>"
    assert prompt == (f" <human>: Frame1: {one}\nFrame2: {one}\nFrame3: {one}\nFrame4: {one}\nFrame5: {one}\n"
                      f"Frame6: {one}\nFrame7: {one}\nFrame8: {one}\nWhat is the red panda doing? <bot>:")


def test_scenario_token_ids_match_transformers_437(tiny_tokenizer):
    recorded = json.loads(FIXTURE.read_text(encoding="utf-8"))
    strings, ids = recorded["strings"], recorded["variants"]["tiny"]["encode"]
    history = [("<image>\nPlease describe the image in detail.", "The image shows a cat.")]
    zh_history = [("请详细描述这张图片。", "这是一张图片，图片中有一只猫。")]
    built = [
        serve_prompt("Hello, who are you?", None, 0)[0],
        serve_prompt("Please describe the image shortly.", None, 1, num_image_token=256)[0],
        serve_prompt("Please write a poem according to the image.", history, 1, num_image_token=4)[0],
        serve_prompt("Describe the two images in detail.", None, 2, num_image_token=4)[0],
        serve_prompt(separate_images_question("What are the similarities and differences between these two "
                                              "images.", 2), None, 2, num_image_token=4)[0],
        serve_prompt(video_question("What is the red panda doing?", 8), None, 8, num_image_token=4)[0],
        serve_prompt("图片中有什么？", zh_history, 0)[0],
    ]
    for prompt in built:
        assert prompt in strings, prompt[:120]
        got = tiny_tokenizer.encode(prompt)
        assert got == ids[strings.index(prompt)]
        assert got[0] == tiny_tokenizer.bos_token_id
    single = tiny_tokenizer.encode(built[1])
    st = tiny_tokenizer.special_tokens
    assert single.count(st.img_context_id) == 256
    assert single.count(st.img_start_id) == single.count(st.img_end_id) == 1


# ---- the placeholder rule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("question, history, n, given, want", [
    ("Q", None, 1, None, ("<image>\nQ", [1])),
    ("Q", None, 3, None, ("<image>\nQ", [3])),                        # combined
    ("<image> and <image> Q", None, 2, None, ("<image> and <image> Q", [1, 1])),  # one each
    ("<image>\nQ", None, 3, None, ("<image>\nQ", [3])),
    ("<image> <image> Q", None, 3, [2, 1], ("<image> <image> Q", [2, 1])),
    ("Q", [("<image>\nA", "B")], 1, None, ("Q", [1])),               # history holds the placeholder
    ("<image> Q", [("<image>\nA", "B")], 2, None, ("<image> Q", [1, 1])),
    ("Q", [("A", "B")], 0, None, ("Q", [])),
    ("Q", None, 0, [], ("Q", [])),
])
def test_resolve(question, history, n, given, want):
    assert resolve_num_patches_list(question, history, n, given) == want


@pytest.mark.parametrize("question, history, n, given, message", [
    ("<image> <image> <image> Q", None, 2, None, "2 image\\(s\\) were sent but .* hold 3"),
    ("Q", [("A", "B")], 1, None, "hold 0"),                           # history given: no prepend
    ("<image> Q", None, 0, None, "no images were sent"),
    ("<image> <image> Q", None, 3, [1, 1, 1], "3 entries but .* hold 2"),
    ("<image> <image> Q", None, 3, [1, 1], "sums to 2 but 3 image"),
    ("<image> <image> Q", None, 2, [2, 0], "must be >= 1"),
    ("look <IMG_CONTEXT>", None, 0, None, "reserved token '<IMG_CONTEXT>'"),
    ("Q", [("<img>", "B")], 0, None, "history\\[0\\]'s question contains the reserved token '<img>'"),
    ("Q", [("A", "<image>")], 0, None, "answer contains '<image>'"),
    ("Q", [("A",)], 0, None, "history\\[0\\] must be a \\[question, answer\\] pair"),
    ("Q", "not a list", 0, None, "history must be a list"),
])
def test_resolve_errors(question, history, n, given, message):
    with pytest.raises(PromptError, match=message):
        resolve_num_patches_list(question, history, n, given)


def test_count_image_placeholders():
    assert count_image_placeholders("Q") == 0
    assert count_image_placeholders("<image><image>", [("<image>", "<image> in an answer is not counted")]) == 3


def test_build_prompt_refuses_unmatched_placeholders():
    with pytest.raises(PromptError, match="hold 2 <image> placeholders but num_patches_list has 1"):
        build_prompt("<image> <image> Q", None, [2], 256)
    with pytest.raises(PromptError, match="unknown conversation template 'vicuna'"):
        build_prompt("Q", None, [], 256, "vicuna")


def test_question_helpers_refuse_zero():
    with pytest.raises(PromptError, match="at least one frame"):
        video_question("Q", 0)
    with pytest.raises(PromptError, match="at least one image"):
        separate_images_question("Q", 0)


def test_template_details():
    assert INTERNVL_ZH.stop_str == "</s>"
    assert (INTERNVL_ZH.roles, INTERNVL_ZH.sep, INTERNVL_ZH.sep2) == (("<human>", "<bot>"), "</s>", " ")
    # config.json's system_message goes before the first sep; an empty answer renders as 'role:'
    assert build_prompt("Q", [("A", "")], [], 2, system_message="SYS") == "SYS <human>: A <bot>:<human>: Q <bot>:"
    assert get_template("internvl_zh", "x").system_message == "x"
    assert clean_response("  The answer. </s> junk") == "The answer."
    assert clean_response("\nno stop  ") == "no stop"


# ---- the end of an answer, and a second template ---------------------------------------------------------
def test_internvl_zh_declares_its_end_of_answer(tiny_tokenizer):
    """The card: stop string template.sep.strip(), stop token convert_tokens_to_ids of it ('</s>', 2)."""
    assert INTERNVL_ZH.end_of_answer(tiny_tokenizer) == (("</s>",), (2,))


def test_hermes_2_builds_the_chatml_prompt():
    """InternVL's conversation.py 'Hermes-2' (sep_style MPT): role + message + '<|im_end|>' per turn, the
    assistant role alone at the end; config.json's system_message replaces the template's."""
    question, patches = resolve_num_patches_list("Q2", [("<image>\nQ1", "A1")], 1)
    prompt = build_prompt(question, [("<image>\nQ1", "A1")], patches, 2, "Hermes-2", system_message="SYS")
    assert prompt == ("<|im_start|>system\nSYS<|im_end|>"
                      "<|im_start|>user\n" + IMG + "\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
                      "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")
    assert build_prompt("Q", None, [], 2, HERMES_2).startswith("<|im_start|>system\n你是由上海人工智能实验室")
    assert HERMES_2.stop_str == "<|im_end|>" and HERMES_2.stop_strings == ("<|im_end|>",)
    assert HERMES_2.clean("\n A cat.<|im_end|><|im_start|>user") == "A cat."


def test_a_stop_string_that_is_not_one_token_is_refused(tiny_tokenizer):
    """V1-1's tokenizer has no '<|im_end|>': the card would stop on <unk>; we name the problem instead."""
    with pytest.raises(PromptError, match="template 'Hermes-2' stops on '<\\|im_end\\|>', which is not a token"):
        HERMES_2.stop_token_ids(tiny_tokenizer)


def test_a_config_without_system_message_keeps_the_template_default(v1_1_config_dict):
    """The card: `config.system_message if hasattr(config, 'system_message') else the template's`; a ChatML
    checkpoint's config.json without the key keeps Hermes-2's system message, and writing it back keeps it absent."""
    from internvl_serve.config import InternVLChatConfig

    d = {k: v for k, v in v1_1_config_dict.items() if k != "system_message"}
    config = InternVLChatConfig.from_dict({**d, "template": "Hermes-2"})
    assert config.system_message is None and "system_message" not in config.to_dict()
    prompt = build_prompt("Q", None, [], 2, config.template, system_message=config.system_message)
    assert prompt.startswith("<|im_start|>system\n" + HERMES_2.system_message + "<|im_end|>")
    with_key = InternVLChatConfig.from_dict({**d, "template": "Hermes-2", "system_message": "SYS"})
    assert build_prompt("Q", None, [], 2, with_key.template, system_message=with_key.system_message).startswith(
        "<|im_start|>system\nSYS<|im_end|>")
