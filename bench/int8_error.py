"""What the engine's int8 weight mode costs in logits: int8 against bf16 at the real V1-1 LLaMA shapes.

On a GPU machine (random full-size weights drawn on the GPU, as bench/benchmark.py uses them):

    python bench/int8_error.py --out bench/results                 # random weights
    python bench/int8_error.py --checkpoint /models/InternVL-Chat-V1-1 --out bench/results

For each prompt, one prefill forward of our LLaMA (engine/llama.py) gives the logits of every position, first
in bf16, then with the same model quantized in place by engine/quantize.py (the q/k/v/o/gate/up/down
projections int8 with per-output-channel scales; lm_head and embeddings bf16). Prompts of <= 64 tokens run
the Triton int8 kernel, longer ones the dequantize-and-matmul path, as in the engine.
Reported over all positions: max and mean |error|, relative L2 error, max |error| / max |logit|, top-1
agreement, KL(bf16 || int8) in nats (mean and max per position); plus the weight bytes one decode step
reads. Writes int8_error.json and int8_error.md under --out.

Random weights are NOT the trained model's distribution: trained LLaMA weights have outlier channels and
their logits are peaked, random ones are Gaussian and give flat logits whose top-1 is often decided by
tiny margins. On random weights these numbers show the int8 path works at full size and bound its
numerical error; they do not say what int8 costs the real model's answers (run --checkpoint for that).
`--device cpu --checkpoint <tiny>` runs the same script on a CPU in float32 (a check of the script).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_serve.checkpoint import load_state_dict  # noqa: E402
from internvl_serve.config import InternVLChatConfig  # noqa: E402
from internvl_serve.engine.attention import build_attention_metadata  # noqa: E402
from internvl_serve.engine.llama import load_llama  # noqa: E402
from internvl_serve.engine.quantize import quantize_model_  # noqa: E402
from internvl_serve.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = (
    "Please describe this image in detail: the objects, their colours, where they are, and what is "
    "happening in the scene right now.",
    "Hello, who are you?",
    "Write a short poem about the sea at night, in four lines.",
    "What is the capital of France, and why did it become the capital?",
)
LONG_PROMPT_TOKENS = 512  # one prompt of random token ids: deeper positions, the dequantize path


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads from the layers and lm_head (parameters and int8 buffers; the
    embedding table is gathered, not read whole)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for n, t in tensors
               if "embed_tokens" not in n and not n.startswith("rope_"))


@torch.inference_mode()
def all_logits(model, token_ids: list[int], device, dtype, block_size: int = 16) -> torch.Tensor:
    """(T, vocab) fp32 logits of every position of one prompt, one prefill forward over a fresh cache."""
    a = getattr(model, "local_args", model.args)
    T = len(token_ids)
    nb = math.ceil(T / block_size)
    cache = torch.zeros(a.num_hidden_layers, 2, nb, block_size, a.num_key_value_heads, a.head_dim,
                        dtype=dtype, device=device)
    caches = [(cache[i, 0], cache[i, 1]) for i in range(a.num_hidden_layers)]
    tables = torch.arange(nb, dtype=torch.int32, device=device)[None]
    meta, positions = build_attention_metadata([T], [0], tables, block_size)
    embeds = model.embed(torch.tensor(token_ids, dtype=torch.long, device=device))
    return model(embeds, positions, caches, meta, torch.arange(T, device=device)).float().cpu()


def compare(ref: torch.Tensor, test: torch.Tensor) -> dict:
    diff = (test - ref).abs()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (T,) nats
    return {"positions": int(ref.shape[0]), "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "rel_l2": ((test - ref).norm() / ref.norm()).item(),
            "max_rel": (diff.max() / ref.abs().max()).item(),
            "top1_agreement": (test.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "ref_logit_std": ref.std().item(),
            "ref_top2_margin_median": float((lambda t: (t[:, 0] - t[:, 1]).median())(ref.topk(2, -1).values))}


def total(rows: list[dict], ref: list[torch.Tensor], test: list[torch.Tensor]) -> dict:
    out = compare(torch.cat(ref), torch.cat(test))
    out["prompts"] = len(rows)
    return out


def markdown(r: dict) -> str:
    t = r["all"]
    lines = [
        f"# int8 weight mode: logit error against {r['dtype']}",
        "",
        f"Device: {r['device']}; date {r['date']}; weights: {r['weights']}.",
        f"Weight bytes read per decode step (layers + lm_head): {r['weight_bytes_ref'] / 1e9:.2f} GB in "
        f"{r['dtype']}, {r['weight_bytes_int8'] / 1e9:.2f} GB with int8 projections "
        f"({r['weight_bytes_ref'] / r['weight_bytes_int8']:.2f}x fewer).",
        "",
        "| prompt | positions | max abs | mean abs | rel L2 | max rel | top-1 agree | KL mean / max (nats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["prompts"] + [dict(t, name="all")]:
        lines.append(f"| {row['name']} | {row['positions']} | {row['max_abs']:.3g} | {row['mean_abs']:.3g} | "
                     f"{row['rel_l2']:.3g} | {row['max_rel']:.3g} | {row['top1_agreement']:.3f} | "
                     f"{row['kl_mean']:.3g} / {row['kl_max']:.3g} |")
    lines += ["", f"Reference logits: std {t['ref_logit_std']:.3g}, median top-2 margin "
                  f"{t['ref_top2_margin_median']:.3g} (the margin a flipped top-1 had to beat)."]
    if r["random_weights"]:
        lines += ["", "Random weights (internvl_serve/random_weights.py) are not the trained model's distribution: "
                      "their logits are flat, so top-1 flips where the margin is tiny and say little about real "
                      "answers. These numbers check the int8 path at full size; rerun with --checkpoint on the real "
                      "weights for what int8 costs the model."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder (default: random V1-1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: pass --device cpu (with a small --checkpoint)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.checkpoint is None:
        from internvl_serve.random_weights import make_random_checkpoint
        from internvl_serve.tiny import make_tiny_checkpoint

        tiny = make_tiny_checkpoint(args.work / "tiny")
        ckpt = make_random_checkpoint(args.work / "v1-1-random", tokenizer_from=tiny)
    else:
        ckpt = args.checkpoint
    from internvl_serve.random_weights import is_random_checkpoint

    config = InternVLChatConfig.from_pretrained(ckpt)
    tokenizer = load_tokenizer(ckpt)
    rng = np.random.default_rng(args.seed)
    prompts = [(f"text {i}", tokenizer.encode(p)) for i, p in enumerate(PROMPTS)]
    vocab = min(len(tokenizer), config.llm_config.vocab_size)
    prompts.append((f"random ids x{LONG_PROMPT_TOKENS}", [1] + rng.integers(3, vocab, LONG_PROMPT_TOKENS - 1).tolist()))

    state_dict = load_state_dict(ckpt, prefixes=("language_model.",), dtype=dtype, device=device, progress=False)
    model = load_llama(config, state_dict, device=device, dtype=dtype)
    bytes_ref = weight_bytes(model)
    ref = [all_logits(model, ids, device, dtype) for _, ids in prompts]
    quantize_model_(model, "int8", state_dict)   # empties state_dict: the bf16 projections are freed
    del state_dict
    bytes_int8 = weight_bytes(model)
    test = [all_logits(model, ids, device, dtype) for _, ids in prompts]

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": dt.date.today().isoformat(), "dtype": str(dtype).removeprefix("torch."),
        "weights": "random full-size V1-1 (random_weights.py)" if is_random_checkpoint(ckpt) else str(ckpt),
        "random_weights": is_random_checkpoint(ckpt),
        "weight_bytes_ref": bytes_ref, "weight_bytes_int8": bytes_int8,
        "prompts": [dict(compare(r, t), name=name) for (name, _), r, t in zip(prompts, ref, test)],
    }
    results["all"] = total(results["prompts"], ref, test)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_error.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "int8_error.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
