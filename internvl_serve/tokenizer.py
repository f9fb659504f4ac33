"""The checkpoint's slow LlamaTokenizer, re-implemented on the `sentencepiece` library.

InternVL-Chat-V1-1 was trained and documented with transformers==4.37.2's *slow* `LlamaTokenizer`
(`use_fast=False`). transformers 5.x no longer ships that class, so this module reproduces its
behaviour token for token (checked against 4.37.2 by tests/unit/fixtures/tokenizer_ids_transformers437.json,
made by scripts/dev/make_tokenizer_fixture.py):

- encode: split the text on the added tokens (leftmost, longest first; honouring each token's
  lstrip/rstrip/single_word flags), encode every other chunk with sentencepiece, prepend BOS.
  legacy=True (4.37.2's default when the config has no `legacy`) encodes each chunk on its own, so a
  chunk after a special token gets sentencepiece's dummy-prefix "▁" again. legacy=False adds one "▁" to
  the whole text and none after special tokens.
- decode: 4.37.2's `PreTrainedTokenizer._decode` (skip the special ids, render the other added tokens
  verbatim separated by spaces, `convert_tokens_to_string` for the rest).

Every id comes from the checkpoint's files (tokenizer.model, tokenizer_config.json, special_tokens_map.json,
added_tokens.json) as 4.37.2's `from_pretrained` reads them. It does not build prompts (prompt.py), does
not batch or pad, and does not make the tests' tiny tokenizer (tiny_tokenizer.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import sentencepiece as spm

from .sentencepiece_proto import without_dummy_prefix

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
QUAD_START_TOKEN, QUAD_END_TOKEN = "<quad>", "</quad>"
REF_START_TOKEN, REF_END_TOKEN = "<ref>", "</ref>"
BOX_START_TOKEN, BOX_END_TOKEN = "<box>", "</box>"
# The tokens InternVL's fine-tuning added to the LLaMA vocabulary, in the order it added them.
INTERNVL_ADDED_TOKENS = (
    IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, QUAD_START_TOKEN, QUAD_END_TOKEN,
    REF_START_TOKEN, REF_END_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN,
)
SPIECE_UNDERLINE = "\u2581"  # "▁", sentencepiece's visible space

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_NAMED = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # LlamaTokenizer.__init__


class TokenizerError(Exception):
    """The tokenizer folder is missing a file or holds an inconsistent one."""


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before sentencepiece runs (transformers' AddedToken)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = True

    @classmethod
    def from_json(cls, value: str | dict, *, special: bool = True) -> "AddedToken":
        if isinstance(value, str):
            return cls(value, special=special)
        value = {k: v for k, v in value.items() if k != "__type"}
        value.setdefault("special", special)
        return cls(**value)


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the server needs, all read from the checkpoint."""

    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    img_start_id: int
    img_end_id: int
    img_context_id: int


class InternVLTokenizer:
    """transformers 4.37.2 `LlamaTokenizer` (slow) behaviour on a sentencepiece model.

    Build it with `load_tokenizer(folder)`. `added_tokens` maps id -> AddedToken (including the named
    special tokens that live inside the sentencepiece vocabulary, such as <s>).
    """

    def __init__(
        self,
        sp_model_proto: bytes,
        *,
        added_tokens: dict[int, AddedToken],
        named_special_tokens: dict[str, str],
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = True,
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = False,
    ):
        self.legacy = legacy
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.split_special_tokens = split_special_tokens
        # legacy=False: 4.37.2 turns sentencepiece's add_dummy_prefix off and adds the "▁" itself.
        try:
            proto = sp_model_proto if legacy else without_dummy_prefix(sp_model_proto)
        except ValueError as e:
            raise TokenizerError(str(e)) from None
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.LoadFromSerializedProto(proto)

        self._added_decoder: dict[int, AddedToken] = dict(sorted(added_tokens.items()))
        self._added_encoder: dict[str, int] = {t.content: i for i, t in self._added_decoder.items()}
        self._named = dict(named_special_tokens)  # e.g. {"bos_token": "<s>", ...}; pad may be absent
        self.all_special_tokens: list[str] = []
        for tok in list(self._named.values()) + list(additional_special_tokens):
            if tok not in self.all_special_tokens:
                self.all_special_tokens.append(tok)
        self.all_special_ids: set[int] = {self.convert_tokens_to_ids(t) for t in self.all_special_tokens}
        self._special_set = set(self.all_special_tokens)
        self._split_re = _leftmost_longest_regex(self._added_encoder)
        # 4.37.2 _decode: added tokens that are not special (plus special ones above the sp vocabulary)
        # are rendered verbatim, as separate pieces joined by spaces.
        self._verbatim_added = (set(self._added_encoder) - self._special_set) | {
            t for t in additional_special_tokens if self.convert_tokens_to_ids(t) >= self.vocab_size
        }
        self._unk_token_length = len(self.sp_model.encode(self._named["unk_token"]))

    # ---- sizes and ids ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the sentencepiece vocabulary, without added tokens (4.37.2 semantics)."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        # 4.37.2: len(set(get_vocab().keys())): sp pieces plus added tokens that are not sp pieces
        extra = sum(1 for t in self._added_encoder if self.sp_model.piece_to_id(t) == self.sp_model.unk_id()
                    and t != self.sp_model.id_to_piece(self.sp_model.unk_id()))
        return self.vocab_size + extra

    def _named_id(self, name: str) -> int | None:
        tok = self._named.get(name)
        return None if tok is None else self.convert_tokens_to_ids(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def eos_token(self) -> str:
        return self._named["eos_token"]

    @property
    def special_tokens(self) -> SpecialTokens:
        img = [self._added_id(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)]
        return SpecialTokens(self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id, *img)

    def _added_id(self, token: str) -> int:
        if token not in self._added_encoder:
            raise TokenizerError(f"the tokenizer has no added token {token!r} (added_tokens.json / "
                                 f"tokenizer_config.json added_tokens_decoder)")
        return self._added_encoder[token]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            if tokens in self._added_encoder:
                return self._added_encoder[tokens]
            return self.sp_model.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        ids = [int(i) for i in ids]
        table, special = self._piece_table(), self.all_special_ids
        if not ids or (min(ids) >= 0 and max(ids) < len(table)):
            # the fast path: one list lookup per id (the engine decodes every answer at every token)
            return [table[i] for i in ids if not (skip_special_tokens and i in special)]
        return [self._id_to_token(i) for i in ids if not (skip_special_tokens and i in special)]

    def _piece_table(self) -> list[str]:
        """Every id's token (sentencepiece pieces, added tokens over them), built on first use."""
        table = getattr(self, "_pieces", None)
        if table is None:
            table = [self.sp_model.id_to_piece(i) for i in range(self.vocab_size)]
            top = max(self._added_decoder, default=-1)
            if top >= len(table):
                table.extend([None] * (top + 1 - len(table)))
            for index, token in self._added_decoder.items():
                table[index] = token.content
            if any(t is None for t in table):  # holes between the vocabulary and an added id: slow path
                table = table[:self.vocab_size]
            self._pieces = table
        return table

    def _id_to_token(self, index: int) -> str:
        if index in self._added_decoder:
            return self._added_decoder[index].content
        if not 0 <= index < self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary (size {len(self)})")
        return self.sp_model.id_to_piece(index)

    # ---- encode ----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings (no BOS/EOS), as 4.37.2 `LlamaTokenizer.tokenize`."""
        if self.legacy or not text:
            return self._tokenize_with_added(text)
        tokens = self._tokenize_with_added(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special_set:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; with add_special_tokens, BOS (and EOS) as add_bos_token / add_eos_token say."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_token_id]
        return ids

    def _split_on_added(self, text: str) -> list[str]:
        if self.split_special_tokens or self._split_re is None:
            return [text]
        return [piece for piece in self._split_re.split(text) if piece]

    def _tokenize_with_added(self, text: str) -> list[str]:
        # 4.37.2 PreTrainedTokenizer.tokenize: split on added tokens, apply their strip flags, then
        # sentencepiece on every remaining chunk.
        chunks = self._split_on_added(text)
        for i, chunk in enumerate(chunks):
            tok = self._added_decoder.get(self._added_encoder[chunk]) if chunk in self._added_encoder else None
            if tok is None:
                continue
            left = chunks[i - 1] if i > 0 else None
            right = chunks[i + 1] if i < len(chunks) - 1 else None
            if tok.rstrip and right:
                chunks[i + 1] = right.lstrip()
            if tok.lstrip and left:
                chunks[i - 1] = left.rstrip()
            if tok.single_word and left and left[-1] != " ":
                chunks[i - 1] += chunk
                chunks[i] = ""
            elif tok.single_word and right and right[0] != " ":
                chunks[i + 1] = chunk + chunks[i + 1]
                chunks[i] = ""
        tokens: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._added_encoder and not self.split_special_tokens:
                tokens.append(chunk)
            else:
                tokens.extend(self._sp_tokenize(chunk))
        return tokens

    def _sp_tokenize(self, text: str) -> list[str]:
        tokens = self.sp_model.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return tokens
        # without the dummy prefix sentencepiece drops a leading "▁": encode "<unk>" + text, cut the unk
        tokens = self.sp_model.encode(self._named["unk_token"] + text, out_type=str)
        return tokens[self._unk_token_length:] if len(tokens) >= self._unk_token_length else tokens

    # ---- decode ----------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text, as 4.37.2 `decode` / `batch_decode(...)[i]` (spaces_between_special_tokens=True)."""
        tokens = self.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in self._verbatim_added:
                if current:
                    text = self._convert_tokens_to_string(current)
                    if text:
                        sub_texts.append(text)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self._convert_tokens_to_string(current))
        text = " ".join(sub_texts)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_continuation(self, ids: Iterable[int]) -> str | None:
        """The text `ids` add after a decode that already has text, without decoding what came before:
        `decode(prefix + ids) == decode(prefix) + decode_continuation(ids)` (skip_special_tokens=True) for
        every prefix whose decode is not empty, whose every token was plain (this returned a string for
        it), and that does not end inside a character (its decode does not end with '\ufffd').

        Plain: a sentencepiece piece, or a special id (skipped by the decode as if absent). None when ids
        hold an added token that the decode renders (verbatim, or the special-token spacing of
        convert_tokens_to_string) or clean-up is on: those depend on their neighbours, so decode the whole.
        Why the rest is local: sentencepiece strips a leading space only at the start of a decode, and
        decodes byte pieces character by character; here the pieces follow a fixed anchor piece, so none
        of them is at the start, and the prefix ends on a whole character."""
        if self.clean_up_tokenization_spaces:
            return None
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=True)
        if any(t in self._added_encoder or t in self._special_set for t in tokens):
            return None
        if not tokens:
            return ""
        anchor = self._continuation_anchor()
        if anchor is None:
            return None
        return self.sp_model.decode([anchor, *tokens])[len(anchor):]

    def _continuation_anchor(self) -> str | None:
        """A piece that decodes to itself, also before others (no leading "▁", not a byte, control or
        unknown piece, no added token): found once, None if the vocabulary has none."""
        if not hasattr(self, "_anchor"):
            self._anchor = None
            sp = self.sp_model
            for i in range(self.vocab_size):
                piece = sp.id_to_piece(i)
                if (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                        or piece.startswith(SPIECE_UNDERLINE) or piece in self._added_encoder):
                    continue
                if sp.decode([piece]) == piece and sp.decode([piece, piece]) == piece * 2:
                    self._anchor = piece
                    break
        return self._anchor

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def _convert_tokens_to_string(self, tokens: list[str]) -> str:
        # 4.37.2 LlamaTokenizer.convert_tokens_to_string
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, current, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self._special_set:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special, current = True, []
            else:
                current.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(current)


def _leftmost_longest_regex(tokens: Iterable[str]) -> re.Pattern | None:
    """A splitting regex equivalent to transformers' Trie.split: leftmost match, longest at that position."""
    tokens = sorted(set(tokens), key=lambda t: (-len(t), t))
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


def _clean_up_tokenization(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ---- loading ---------------------------------------------------------------------------------------
def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e


def load_tokenizer(folder: str | os.PathLike) -> InternVLTokenizer:
    """Load the checkpoint folder's tokenizer the way 4.37.2 `LlamaTokenizer.from_pretrained` does.

    With `added_tokens_decoder` in tokenizer_config.json (written by transformers >= 4.34) that is the
    source of the added tokens and tokenizer_config.json names the special tokens; otherwise (older
    folders) special_tokens_map.json overrides tokenizer_config.json and added_tokens.json lists the
    added tokens. Raises TokenizerError when tokenizer.model is missing.
    """
    folder = os.fspath(folder)
    model_path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(model_path):
        raise TokenizerError(f"{folder}: no tokenizer.model (a slow LLaMA sentencepiece tokenizer is expected)")
    with open(model_path, "rb") as f:
        proto = f.read()
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    map_path = os.path.join(folder, "special_tokens_map.json")
    added_path = os.path.join(folder, "added_tokens.json")

    added: dict[int, AddedToken] = {}
    specials: dict[str, str | dict | None] = {k: config[k] for k in _NAMED_SPECIALS if k in config}
    additional: list[str | dict] = list(config.get("additional_special_tokens") or [])
    from_decoder = "added_tokens_decoder" in config
    if from_decoder:
        for idx, tok in config["added_tokens_decoder"].items():
            added[int(idx)] = AddedToken.from_json(tok)
    else:
        if os.path.isfile(map_path):
            for key, value in _read_json(map_path).items():
                if key == "additional_special_tokens" and isinstance(value, list):
                    for tok in value:
                        if _content(tok) not in [_content(t) for t in additional]:
                            additional.append(tok)
                elif key in _NAMED_SPECIALS:
                    specials[key] = value
        if os.path.isfile(added_path):
            special_strings = {_content(v) for v in specials.values() if v is not None}
            special_strings |= {_content(t) for t in additional}
            for content, idx in _read_json(added_path).items():
                is_special = content in special_strings
                added[int(idx)] = AddedToken(content, normalized=not is_special, special=is_special)
    by_content = {t.content: t for t in added.values()}

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    next_id = sp.get_piece_size() + sum(1 for t in by_content if sp.piece_to_id(t) == sp.unk_id()
                                        and t != sp.id_to_piece(sp.unk_id()))

    named: dict[str, str] = {}
    for key in _NAMED_SPECIALS:
        value = specials.get(key, _DEFAULT_NAMED.get(key))
        if value is None:
            continue
        content = _content(value)
        named[key] = content
        # PreTrainedTokenizer.__init__ registers every special token as an added token (in the sp vocab
        # or appended). Its flags: the added_tokens_decoder entry when there is one, else its definition.
        if from_decoder and content in by_content:
            token = by_content[content]
        else:
            token = AddedToken.from_json(value)
        idx = _token_id(content, added, sp)
        if idx is None:
            idx, next_id = next_id, next_id + 1
        added[idx] = token
        by_content[content] = token
    additional_strings: list[str] = []
    for value in additional:
        content = _content(value)
        additional_strings.append(content)
        idx = _token_id(content, added, sp)
        if idx is None:
            idx, next_id = next_id, next_id + 1
        if isinstance(value, dict) or idx not in added:
            added[idx] = AddedToken.from_json(value)

    return InternVLTokenizer(
        proto,
        added_tokens=added,
        named_special_tokens=named,
        additional_special_tokens=additional_strings,
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        legacy=True if config.get("legacy") is None else bool(config["legacy"]),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
    )


def _content(value: str | dict) -> str:
    return value if isinstance(value, str) else value["content"]


def _token_id(content: str, added: dict[int, AddedToken], sp: spm.SentencePieceProcessor) -> int | None:
    for idx, tok in added.items():
        if tok.content == content:
            return idx
    idx = sp.piece_to_id(content)
    if idx != sp.unk_id() or content == sp.id_to_piece(sp.unk_id()):
        return idx
    return None
