"""internvl_serve.tokenizer against transformers 4.37.2's slow LlamaTokenizer (recorded in a fixture).

The fixture (scripts/dev/make_tokenizer_fixture.py, run with transformers==4.37.2) holds 4.37.2's ids
and decodes for the tiny tokenizer in several folder layouts; CI has no 4.37.2, so we replay them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from internvl_serve.tiny_tokenizer import make_tiny_tokenizer
from internvl_serve.tokenizer import (
    IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, INTERNVL_ADDED_TOKENS, TokenizerError, load_tokenizer,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_ids_transformers437.json"
TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def recorded() -> dict:
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


def variant_folder(base: Path, tmp: Path, name: str, files: dict) -> Path:
    folder = tmp / name
    folder.mkdir()
    shutil.copy(base / "tokenizer.model", folder / "tokenizer.model")
    for file_name, content in files.items():
        (folder / file_name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def test_fixture_was_made_from_this_tiny_tokenizer(recorded, tiny_tokenizer_dir):
    assert recorded["transformers_version"] == "4.37.2"
    model = (tiny_tokenizer_dir / "tokenizer.model").read_bytes()
    assert hashlib.sha256(model).hexdigest() == recorded["tokenizer_model_sha256"], \
        "make_tiny_tokenizer's model changed: rerun scripts/dev/make_tokenizer_fixture.py"
    assert len(recorded["strings"]) > 150
    assert {"tiny", "legacy_false", "no_decoder", "not_special", "strip_flags"} <= set(recorded["variants"])


@pytest.mark.parametrize("variant", ["tiny", "legacy_false", "legacy_absent", "no_decoder", "not_special",
                                     "strip_flags", "eos_cleanup"])
def test_matches_transformers_437(recorded, tiny_tokenizer_dir, tmp_path, variant):
    want = recorded["variants"][variant]
    tok = load_tokenizer(variant_folder(tiny_tokenizer_dir, tmp_path, variant, want["files"]))

    assert len(tok) == want["len"]
    assert tok.vocab_size == want["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        want["bos_token_id"], want["eos_token_id"], want["unk_token_id"], want["pad_token_id"])
    assert {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_ADDED_TOKENS} == want["added_token_ids"]

    wrong = [(s, tok.encode(s), ids) for s, ids in zip(recorded["strings"], want["encode"]) if tok.encode(s) != ids]
    assert not wrong, f"{len(wrong)} encodings differ from 4.37.2, first: {wrong[0]}"

    sequences = want["encode"] + recorded["random_ids"]
    assert len(sequences) == len(want["decode_skip_special"]) == len(want["decode_keep_special"])
    for ids, skip, keep in zip(sequences, want["decode_skip_special"], want["decode_keep_special"]):
        assert tok.decode(ids, skip_special_tokens=True) == skip, ids
        assert tok.decode(ids, skip_special_tokens=False) == keep, ids
    assert tok.batch_decode(sequences[:5]) == want["decode_skip_special"][:5]


@pytest.mark.parametrize("variant", ["tiny", "legacy_false", "not_special", "eos_cleanup"])
def test_decode_continuation_gives_the_recorded_decodes(recorded, tiny_tokenizer_dir, tmp_path, variant):
    """decode(prefix + rest) == decode(prefix) + decode_continuation(rest) at every split of every recorded
    sequence where the prefix qualifies (every token plain, text not empty, a whole last character), against
    4.37.2's own decodes; a rendered added token, or clean-up, declines (None)."""
    want = recorded["variants"][variant]
    tok = load_tokenizer(variant_folder(tiny_tokenizer_dir, tmp_path, variant, want["files"]))
    sequences = want["encode"] + recorded["random_ids"]
    checked = declined = 0
    for ids, full in zip(sequences, want["decode_skip_special"]):
        for k in range(1, len(ids)):
            prefix_text = tok.decode(ids[:k])
            if tok.decode_continuation(ids[:k]) is None or not prefix_text or prefix_text.endswith("\ufffd"):
                continue
            rest = tok.decode_continuation(ids[k:])
            if rest is None:
                declined += 1
                continue
            assert prefix_text + rest == full, (ids, k)
            checked += 1
    if tok.clean_up_tokenization_spaces:  # its replacements reach across the split
        assert checked == 0 and tok.decode_continuation([5]) is None
    else:
        assert checked > 500, checked
    if variant == "not_special":  # added tokens rendered verbatim, joined by spaces: decode the whole
        assert declined > 0 and tok.decode_continuation([tok.convert_tokens_to_ids(IMG_START_TOKEN)]) is None


def test_make_tiny_tokenizer_is_deterministic(tmp_path):
    n1 = make_tiny_tokenizer(tmp_path / "a")
    n2 = make_tiny_tokenizer(tmp_path / "b")
    assert n1 == n2 == len(load_tokenizer(tmp_path / "a"))
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_tiny_tokenizer_folder_is_a_llama_slow_tokenizer(tiny_tokenizer_dir, tiny_tokenizer):
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["legacy"] is True
    added = json.loads((tiny_tokenizer_dir / "added_tokens.json").read_text())
    base = tiny_tokenizer.vocab_size
    assert added == {t: base + i for i, t in enumerate(INTERNVL_ADDED_TOKENS)}  # consecutive after the sp vocab
    assert len(tiny_tokenizer) == base + 9
    sp = tiny_tokenizer.sp_model
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.encode("12", out_type=str) == ["▁", "1", "2"]          # split_digits
    assert sp.encode("😀", out_type=str)[1:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte_fallback


def test_ids_come_from_the_files(tiny_tokenizer_dir, tmp_path):
    """Ids are read, never assumed: renumber the added tokens (older layout) and they follow."""
    folder = tmp_path / "renumbered"
    folder.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    base = 1000
    order = list(reversed(INTERNVL_ADDED_TOKENS))
    (folder / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(order)}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
         "additional_special_tokens": order}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = load_tokenizer(folder)
    assert tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) == base + order.index(IMG_CONTEXT_TOKEN)
    st = tok.special_tokens
    assert (st.img_start_id, st.img_end_id, st.img_context_id) == (
        base + order.index(IMG_START_TOKEN), base + order.index(IMG_END_TOKEN), base + order.index(IMG_CONTEXT_TOKEN))
    assert (st.bos_id, st.eos_id, st.unk_id, st.pad_id) == (1, 2, 0, 0)
    ids = tok.encode("<img><IMG_CONTEXT></img>")
    assert ids == [1, st.img_start_id, st.img_context_id, st.img_end_id]


def test_special_tokens_and_decode_of_an_answer(tiny_tokenizer):
    st = tiny_tokenizer.special_tokens
    assert (st.bos_id, st.eos_id, st.unk_id, st.pad_id) == (1, 2, 0, None)
    assert (st.img_start_id, st.img_end_id, st.img_context_id) == (1000, 1001, 1002)
    ids = tiny_tokenizer.encode("A cat on a mat.", add_special_tokens=False)
    assert ids[0] != st.bos_id
    assert tiny_tokenizer.decode(ids + [st.eos_id]) == "A cat on a mat."
    # 4.37.2's legacy convert_tokens_to_string puts the space it adds before a special token in front
    assert tiny_tokenizer.decode(ids + [st.eos_id], skip_special_tokens=False) == " A cat on a mat.</s>"
    assert tiny_tokenizer.convert_ids_to_tokens(st.img_context_id) == IMG_CONTEXT_TOKEN
    with pytest.raises(IndexError):
        tiny_tokenizer.decode([len(tiny_tokenizer) + 5])


def test_missing_or_broken_files(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    folder = tmp_path / "broken"
    shutil.copytree(tiny_tokenizer_dir, folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(folder)
