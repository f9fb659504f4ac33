"""The tiny checkpoint maker: deterministic bytes, idempotent, careful with folders it did not write; and
the properties tests rely on: well-separated greedy logits, answers that depend on the image, and little work per request."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_serve.checkpoint import load_model
from internvl_serve.config import InternVLChatConfig
from internvl_serve.tiny import MARKER, PREPROCESSOR_CONFIG, main, make_tiny_checkpoint
from internvl_serve.tokenizer import load_tokenizer


# 0.54 GFLOP today (~0.2 s on one core); twice that is still "tiny" (the real V1-1 needs ~10 TFLOP)
FLOP_BUDGET = 1.2e9


def weight_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".safetensors")}


def test_layout_and_config(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {f"pytorch_model-0000{i}-of-00004.bin" for i in (1, 2, 3, 4)} <= names
    assert {"config.json", "pytorch_model.bin.index.json", "preprocessor_config.json", "tokenizer.model",
            "tokenizer_config.json", MARKER} <= names
    assert json.loads((tiny_checkpoint / "preprocessor_config.json").read_text()) == PREPROCESSOR_CONFIG
    config = InternVLChatConfig.from_pretrained(tiny_checkpoint)
    assert config.num_image_token == 256 and config.vision_config.num_hidden_layers == 6
    assert config.llm_config.vocab_size == len(load_tokenizer(tiny_checkpoint))
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "internvl_chat" and raw["vision_config"]["model_type"] == "intern_vit_6b"


def test_deterministic_and_idempotent(tiny_checkpoint, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    assert weight_bytes(again) == weight_bytes(tiny_checkpoint)
    stamp = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    assert main([str(again)]) == 0                                     # complete: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamp
    make_tiny_checkpoint(again, seed=0, force=True)
    assert weight_bytes(again) == weight_bytes(tiny_checkpoint)
    other = make_tiny_checkpoint(tmp_path / "seed1", seed=1)
    assert weight_bytes(other).keys() == weight_bytes(tiny_checkpoint).keys()
    assert weight_bytes(other) != weight_bytes(tiny_checkpoint)


def test_format_switch_leaves_no_stale_shards(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "t", fmt="bin")
    assert main([str(folder), "--safetensors"]) == 0
    assert sorted(weight_bytes(folder)) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert json.loads((folder / MARKER).read_text())["format"] == "safetensors"


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--force"):
        make_tiny_checkpoint(tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"


def _prompt_ids(tok, question: str, n_image_tokens: int) -> list[int]:
    return tok.encode(" <human>: <img>" + "<IMG_CONTEXT>" * n_image_tokens + "</img>\n" + question + " <bot>:")


def test_logits_well_separated_and_images_matter(tiny_checkpoint):
    """Greedy 32 tokens for 4 different images: 4 different answers, and the top-1/top-2 logit gap of every
    step far above the fp32 difference between two attention implementations (sdpa vs eager)."""
    tok = load_tokenizer(tiny_checkpoint)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    sdpa = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    eager = load_model(tiny_checkpoint, dtype=torch.float32, progress=False, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    pixels = torch.stack([torch.full((3, 448, 448), -1.0), torch.full((3, 448, 448), 1.5),
                          torch.randn(3, 448, 448, generator=g), torch.randn(3, 448, 448, generator=g)])
    ids = _prompt_ids(tok, "Please describe the image in detail.", 256)
    answers, gaps, noise = set(), [], []
    with torch.no_grad():
        feats = sdpa.extract_feature(pixels)
        for f in feats:
            input_ids = torch.tensor([ids])
            embeds = sdpa.embed(input_ids, f[None], img_context_token_id=ctx)
            out = sdpa.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                               max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
            answers.add(tuple(out[0].tolist()))
            full = torch.tensor([ids + out[0].tolist()])
            embeds = sdpa.embed(full, f[None], img_context_token_id=ctx)
            a = sdpa.language_model(inputs_embeds=embeds).logits[0, -33:-1]
            b = eager.language_model(inputs_embeds=embeds).logits[0, -33:-1]
            assert torch.equal(a.argmax(-1), full[0, -32:])              # teacher forcing reproduces greedy
            top2 = a.topk(2, dim=-1).values
            gaps.append(top2[:, 0] - top2[:, 1])
            noise.append((a - b).abs().max())
    gaps, noise = torch.cat(gaps), torch.stack(noise).max()
    print(f"\nmin top1-top2 gap {gaps.min():.4f} (median {gaps.median():.3f}); max |sdpa - eager| {noise:.2e}")
    assert len(answers) == 4
    assert gaps.min() > 100 * noise


def test_small_enough_for_cpu_tests(tiny_checkpoint):
    """What keeps the tiny model fast on a CPU, as work rather than wall-clock time (which a busy machine
    stretches): the floating-point operations of one card-sized request (a 448 image, a ~300-token prompt,
    32 new tokens), counted by torch's FlopCounterMode, and the parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    tok = load_tokenizer(tiny_checkpoint)
    model = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    ids = torch.tensor([_prompt_ids(tok, "What is in the picture? Describe the color and the background and the "
                                         "scene, count the people and tell me where they are standing.", 256)])
    assert 290 <= ids.shape[1] <= 330
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        embeds = model.embed(ids, model.extract_feature(pixels),
                             img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
        out = model.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 32
    print(f"\n448 image + {ids.shape[1]}-token prompt + 32 new tokens: {flops.get_total_flops() / 1e9:.2f} GFLOP")
    assert flops.get_total_flops() < FLOP_BUDGET