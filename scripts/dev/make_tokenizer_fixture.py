"""Regenerate tests/unit/fixtures/tokenizer_ids_transformers437.json with transformers==4.37.2.

The fixture holds what transformers 4.37.2's slow LlamaTokenizer (the version the model card asks for)
returns on the tiny tokenizer, so CI can check internvl_serve.tokenizer without that old transformers.
Run it with a throw-away venv OUTSIDE the repository (it needs no torch):

    python3 -m venv /tmp/tf437
    /tmp/tf437/bin/pip install transformers==4.37.2 sentencepiece "numpy<2" protobuf
    /tmp/tf437/bin/python scripts/dev/make_tokenizer_fixture.py

The ids come from `LlamaTokenizer.from_pretrained(folder)` and are checked equal to
`AutoTokenizer.from_pretrained(folder, use_fast=False)`; our tokenizer is not used here. Only the tiny
tokenizer's files come from internvl_serve.tiny_tokenizer.make_tiny_tokenizer (it needs just sentencepiece).
Variants cover the layouts a real checkpoint folder may have (legacy true/false, added_tokens_decoder or
the older added_tokens.json + special_tokens_map.json, the added tokens special or not, strip flags).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import transformers  # noqa: E402
from transformers import AutoTokenizer, LlamaTokenizer  # noqa: E402

from internvl_serve.tokenizer import INTERNVL_ADDED_TOKENS  # noqa: E402
from internvl_serve.tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

OUT = os.path.join(ROOT, "tests", "unit", "fixtures", "tokenizer_ids_transformers437.json")
JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

CTX = "<IMG_CONTEXT>"


def img(n: int) -> str:
    return "<img>" + CTX * n + "</img>"


# The card's scenarios, written out by hand (256 tokens per image as V1-1; 4 where length does not matter).
SCENARIO_PROMPTS = [
    " <human>: Hello, who are you? <bot>:",
    " <human>: " + img(256) + "\nPlease describe the image shortly. <bot>:",
    " <human>: " + img(4) + "\nPlease describe the image in detail. <bot>: The image shows a cat.</s>"
    "<human>: Please write a poem according to the image. <bot>:",
    " <human>: " + img(8) + "\nDescribe the two images in detail. <bot>:",
    " <human>: Image-1: " + img(4) + "\nImage-2: " + img(4) + "\nWhat are the similarities and differences"
    " between these two images. <bot>:",
    "".join(f"Frame{i + 1}: " + img(2) + "\n" for i in range(8)),
    " <human>: " + "".join(f"Frame{i + 1}: " + img(4) + "\n" for i in range(8))
    + "What is the red panda doing? <bot>:",
    " <human>: 请详细描述这张图片。 <bot>: 这是一张图片，图片中有一只猫。</s><human>: 图片中有什么？ <bot>:",
]

STRINGS = [
    "", " ", "  ", "\n", "\n\n", "\t", " \n ", "a", " a", "a ", "  leading and trailing  ",
    "Hello world", "Hello, who are you?", "The quick brown fox jumps over the lazy dog.",
    "Describe this image in detail.", "What is the red panda doing?",
    "这是一张图片", "请描述这张图片。", "你好，我们在哪里？", "中文 and English mixed 混合",
    "emoji 😀👍🏽 and 🐼", "🐼", "naïve café résumé", "Ελληνικά кириллица العربية",
    "12345", "3.14159", "2024-01-25", "1 2 3", "a1b2c3", "１２３ fullwidth",
    "line one\nline two\n\nline four", "trailing newline\n", "\nleading newline", "tabs\tand\tspaces",
    "▁", "▁hello", "hello▁world", " ▁ ", "<unk>", "<s>", "</s>", "a</s>b", "text</s>", "</s>text",
    "<s> hello </s>", "<s>\n", "<pad>", "<img", "img>", "<IMG_CONTEXT", "<<img>>", "<img></img>",
    "<image>", "<image>\nDescribe", "Image-1: <image>\nImage-2: <image>\n",
    "<human>: hi <bot>:", " <human>: hi <bot>:", "<bot>: answer</s><human>:",
]
for tok in INTERNVL_ADDED_TOKENS:
    STRINGS += [tok, " " + tok, tok + " ", "a" + tok + "b", "a " + tok + " b", tok + "\n", "\n" + tok,
                tok + "\nText", "Text\n" + tok, tok + tok, tok + "你好", "你好" + tok, tok + "123",
                "  " + tok + "  x"]
STRINGS += ["<ref>the cat</ref><box>[[10, 20, 300, 400]]</box>", "<quad>1,2,3,4</quad>",
            "<img><IMG_CONTEXT><IMG_CONTEXT></img>\n", "</img>\n\nx", "<img> </img>", "</s><img>", "<s><img>"]
STRINGS += SCENARIO_PROMPTS


def variants(base_files: dict) -> dict:
    """Folder layouts to compare on (file name -> JSON content); the base is make_tiny_tokenizer's."""
    out = {"tiny": base_files}

    v = copy.deepcopy(base_files)
    v["tokenizer_config.json"]["legacy"] = False
    out["legacy_false"] = v

    v = copy.deepcopy(base_files)
    del v["tokenizer_config.json"]["legacy"]  # 4.37.2 defaults to legacy=True with a warning
    out["legacy_absent"] = v

    # older layout: no added_tokens_decoder; added_tokens.json + special_tokens_map.json are read
    v = copy.deepcopy(base_files)
    for key in ("added_tokens_decoder", "additional_special_tokens"):
        del v["tokenizer_config.json"][key]
    out["no_decoder"] = v

    # older layout and the 9 tokens NOT special: skip_special_tokens keeps them, decode spaces them out
    v = copy.deepcopy(out["no_decoder"])
    del v["special_tokens_map.json"]["additional_special_tokens"]
    out["not_special"] = v

    # strip flags on some added tokens, and a pad token
    v = copy.deepcopy(base_files)
    dec = v["tokenizer_config.json"]["added_tokens_decoder"]
    for entry in dec.values():
        if entry["content"] in ("<img>", "<ref>"):
            entry["lstrip"] = True
        if entry["content"] in ("</img>", "<box>"):
            entry["rstrip"] = True
        if entry["content"] == "<quad>":
            entry["single_word"] = True
    v["tokenizer_config.json"]["pad_token"] = "<unk>"
    out["strip_flags"] = v

    v = copy.deepcopy(base_files)
    v["tokenizer_config.json"]["add_bos_token"] = False
    v["tokenizer_config.json"]["add_eos_token"] = True
    v["tokenizer_config.json"]["clean_up_tokenization_spaces"] = True
    out["eos_cleanup"] = v
    return out


def random_sequences(n_vocab: int) -> list[list[int]]:
    """Id sequences like generated ones: ordinary ids mixed with <unk>, <s>, </s> and the added tokens."""
    r = random.Random(1234)
    specials = [0, 1, 2] + list(range(n_vocab - len(INTERNVL_ADDED_TOKENS), n_vocab))
    seqs = []
    for _ in range(150):
        length = r.randint(1, 24)
        seqs.append([r.choice(specials) if r.random() < 0.2 else r.randrange(3, n_vocab - 9)
                     for _ in range(length)])
    return seqs


def main() -> None:
    assert transformers.__version__ == "4.37.2", f"needs transformers==4.37.2, found {transformers.__version__}"
    result = {"transformers_version": transformers.__version__, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = os.path.join(tmp, "made")
        length = make_tiny_tokenizer(base_dir)
        with open(os.path.join(base_dir, "tokenizer.model"), "rb") as f:
            result["tokenizer_model_sha256"] = hashlib.sha256(f.read()).hexdigest()
        result["tokenizer_len"] = length
        base_files = {}
        for name in JSON_FILES:
            with open(os.path.join(base_dir, name), encoding="utf-8") as f:
                base_files[name] = json.load(f)
        result["strings"] = STRINGS
        result["random_ids"] = random_sequences(length)

        for vname, files in variants(base_files).items():
            folder = os.path.join(tmp, vname)
            os.makedirs(folder)
            os.link(os.path.join(base_dir, "tokenizer.model"), os.path.join(folder, "tokenizer.model"))
            for name, content in files.items():
                with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                    json.dump(content, f, indent=2, ensure_ascii=False)
            slow = LlamaTokenizer.from_pretrained(folder)
            auto = AutoTokenizer.from_pretrained(folder, use_fast=False)
            assert type(auto).__name__ == "LlamaTokenizer", type(auto)

            encoded = []
            for s in STRINGS:
                ids = slow(s).input_ids
                assert auto(s).input_ids == ids, (vname, s)
                assert slow.encode(s) == ids, (vname, s)
                encoded.append(ids)
            # decoded: every encoded string (with its BOS), then the random sequences
            assert len(slow) == length, (vname, len(slow))
            seqs = encoded + result["random_ids"]
            decoded_skip = [slow.batch_decode([ids], skip_special_tokens=True)[0] for ids in seqs]
            decoded_keep = [slow.decode(ids, skip_special_tokens=False) for ids in seqs]
            for ids, a, b in zip(seqs, decoded_skip, decoded_keep):
                assert auto.decode(ids, skip_special_tokens=True) == a
                assert auto.decode(ids, skip_special_tokens=False) == b
            result["variants"][vname] = {
                "files": files,
                "len": len(slow),
                "vocab_size": slow.vocab_size,
                "bos_token_id": slow.bos_token_id,
                "eos_token_id": slow.eos_token_id,
                "unk_token_id": slow.unk_token_id,
                "pad_token_id": slow.pad_token_id,
                "added_token_ids": {t: slow.convert_tokens_to_ids(t) for t in INTERNVL_ADDED_TOKENS},
                "encode": encoded,
                "decode_skip_special": decoded_skip,  # encode[i] for i < len(strings), then random_ids
                "decode_keep_special": decoded_keep,
            }
            print(f"{vname}: {len(STRINGS)} strings, {len(seqs)} decodes", file=sys.stderr)

    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
