"""The tiny LLaMA-style slow tokenizer the tests and the tiny checkpoint use: a BPE sentencepiece model
trained on a fixed English / Chinese / digits corpus, and the files transformers 4.37.2 writes for it with
InternVL's added tokens. The same bytes on every run. Does not load tokenizers (tokenizer.py).
"""
from __future__ import annotations

import io
import json
import os
import random
from typing import Iterator

import sentencepiece as spm

from .tokenizer import INTERNVL_ADDED_TOKENS

_TINY_EN = (
    "the a an image picture photo video frame shows describe what is in this please detail answer question "
    "man woman child dog cat car tree house street city sky water river mountain red green blue white black "
    "small large two three many people standing sitting walking running on under near with and of to from "
    "there are it looks like color left right top bottom background foreground scene text number count "
    "first second combined separate difference between similar both images frames happening"
).split()
_TINY_ZH_CHARS = (
    "这是一张图片请描述中的内容详细回答问题男人女人孩子狗猫汽车树房子街道城市天空水河山红绿蓝白黑小大两三很多"
    "人站坐走跑在上下旁边和从有看起来像颜色左右顶部底部背景前景场景文字数量视频帧什么哪里为谁你好我们他她它"
)
_TINY_ZH_PHRASES = ("这是一张图片", "请描述这张图片", "图片中有什么", "视频中发生了什么", "你好", "详细描述")


def _tiny_corpus() -> Iterator[str]:
    """A fixed corpus: English, Chinese and digits (random.Random(0): the same on every Python 3)."""
    r = random.Random(0)
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            words = [r.choice(_TINY_EN) for _ in range(r.randint(3, 14))]
            yield " ".join(words).capitalize() + r.choice([".", "?", "!", ","])
        elif kind == 1:
            yield "".join(r.choice(_TINY_ZH_CHARS) for _ in range(r.randint(4, 20))) + r.choice("。？，！")
        elif kind == 2:
            yield r.choice(_TINY_ZH_PHRASES) + r.choice(["。", "？", ""]) + r.choice(_TINY_ZH_PHRASES)
        else:
            yield (f"{r.choice(_TINY_EN)} {r.randint(0, 99999)} {r.choice(_TINY_ZH_CHARS)}"
                   f"{r.choice(_TINY_ZH_CHARS)} {r.randint(0, 9)}.{r.randint(0, 99)}")


def train_tiny_sentencepiece(vocab_size: int = 1000) -> bytes:
    """Train the tiny LLaMA-style BPE sentencepiece model; the same bytes on every call."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_tiny_corpus(), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=4192,
        minloglevel=2,
    )
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    # the layout transformers' save_pretrained writes
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def make_tiny_tokenizer(out_folder: str | os.PathLike, vocab_size: int = 1000,
                        extra_special_tokens: tuple[str, ...] = ()) -> int:
    """Write a tiny LLaMA slow-tokenizer folder (with InternVL's 9 added tokens); return its length.

    The files mirror what transformers 4.37.2 `LlamaTokenizer.save_pretrained` writes after InternVL's
    `tokenizer.add_tokens(token_list, special_tokens=True)`. extra_special_tokens are added after them
    the same way (e.g. ChatML's '<|im_start|>', '<|im_end|>' for a second conversation template's tests).
    Deterministic bytes for the same arguments.
    """
    os.makedirs(out_folder, exist_ok=True)
    proto = train_tiny_sentencepiece(vocab_size)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    base = sp.get_piece_size()
    added_tokens = tuple(dict.fromkeys(tuple(INTERNVL_ADDED_TOKENS) + tuple(extra_special_tokens)))
    added_ids = {tok: base + i for i, tok in enumerate(added_tokens)}

    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    decoder = {str(sp.unk_id()): entry("<unk>"), str(sp.bos_id()): entry("<s>"), str(sp.eos_id()): entry("</s>")}
    decoder.update({str(i): entry(t) for t, i in added_ids.items()})
    for value in decoder.values():
        value["special"] = True
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(added_tokens),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {
        "additional_special_tokens": [entry(t) for t in added_tokens],
        "bos_token": entry("<s>"),
        "eos_token": entry("</s>"),
        "unk_token": entry("<unk>"),
    }
    files = {
        "tokenizer.model": proto,
        "added_tokens.json": _json_bytes(added_ids),
        "special_tokens_map.json": _json_bytes(special_map),
        "tokenizer_config.json": _json_bytes(config),
    }
    for name, data in files.items():
        with open(os.path.join(out_folder, name), "wb") as f:
            f.write(data)
    return base + len(added_tokens)
