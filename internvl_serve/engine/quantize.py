"""The engine's `quantization` option: int8 or fp8 weights for the LLaMA's projections (opt-in).

Owns: the option ("int8", "fp8" or none) and what it does to a loaded Llama (engine/llama.py): the four
projections of every layer (the merged qkv_proj, o_proj, the merged gate_up_proj, down_proj) are
swapped in place for
- "int8" (gpt-fast's quantize.py, for our model): `Int8Linear`, weight-only int8 with one float32 scale
  per output channel; a Triton kernel on CUDA for decode batch sizes, a plain dequantize-and-matmul in
  PyTorch on the CPU and for prefill-sized inputs (so prefill pays a dequantization per call);
- "fp8": `Fp8Linear`, e4m3 weights with one float32 scale per output channel (half the weight bytes of
  bf16). The activations are quantized per token at each call and multiplied on the FP8 tensor cores
  (torch._scaled_mm, compute capability 8.9+: H100), except in a step of one row (a single sequence's
  decode), which multiplies them unquantized by the e4m3 weight (int8_linear's weight-only GEMV: faster
  there, kernels/fp8_linear.py says by how much). On the CPU the same rule, in float32.
lm_head, the embeddings and the norms stay in the model dtype. Swapping modules keeps every call site
(`attn.qkv_proj(x)` in llama.py, the one forward the decode graphs capture), so the captured CUDA-graph
decode replays the quantized kernels once the swap happened before capture. Quantizing a merged weight
equals quantizing its parts: the weight scales are per output channel (row), and one activation row's
scale is the same for every part.

Does not own: the kernels and the Linear stand-ins (kernels/int8_linear.py, kernels/fp8_linear.py),
loading weights (llama.py), or when to quantize (ModelRunner applies it after load_llama, before sizing
the KV cache, so the cache gets the memory the bf16 weights leave: 13.1 of LLaMA2-13B's 26 GB).
"""
from __future__ import annotations

from typing import MutableMapping

from torch import nn

from internvl_serve.kernels.fp8_linear import Fp8Linear, quantize_linears_fp8_
from internvl_serve.kernels.int8_linear import Int8Linear, quantize_llama_linears

QUANTIZATIONS = ("int8", "fp8")
# our Llama's projections (q/k/v and gate/up merged at load: llama.merge_projections), where each sits in
# a decoder layer (the dotted names quantize_linears_fp8_ takes), and their names (quantize_llama_linears')
ENGINE_PROJECTION_PATHS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
ENGINE_PROJECTIONS = tuple(path.rpartition(".")[2] for path in ENGINE_PROJECTION_PATHS)


def validate_quantization(quantization: str | None, allowed: tuple[str, ...] = QUANTIZATIONS) -> str | None:
    """None or "" -> None; one of `allowed` (the engine's: "int8"; case and spaces ignored) -> itself;
    anything else raises ValueError."""
    if quantization is None or not str(quantization).strip():
        return None
    q = str(quantization).strip().lower()
    if q not in allowed:
        raise ValueError(f"quantization must be one of {', '.join(allowed)} or empty (none), "
                         f"got {quantization!r}")
    return q


def _check_replaced(quantization: str, replaced: int, layers: nn.ModuleList) -> None:
    if replaced != len(ENGINE_PROJECTIONS) * len(layers):
        raise ValueError(f"{quantization}: replaced {replaced} linears, expected {len(ENGINE_PROJECTIONS)} per "
                         f"layer x {len(layers)} layers (already quantized, or not our Llama?)")


def quantize_llama_int8_(model: nn.Module) -> nn.Module:
    """Replace, in place, the qkv/o/gate_up/down projections of every decoder layer with Int8Linear
    (symmetric per-output-channel scales). Returns the model. Each bf16 weight is freed as soon as its
    module is replaced, provided nothing else holds it (see quantize_model_ for the loader's dict)."""
    layers = model.model.layers
    _check_replaced("int8", quantize_llama_linears(layers, names=ENGINE_PROJECTIONS, include_lm_head=False), layers)
    return model


def quantize_llama_fp8_(model: nn.Module, fast_accum: bool = False, triton_max_rows: int = 0) -> nn.Module:
    """The same projections as quantize_llama_int8_, as Fp8Linear (e4m3, per-output-channel weight scales,
    per-token activation scales; fast_accum, triton_max_rows: Fp8Linear's). Returns the model; each bf16
    weight is freed as its module is replaced."""
    layers = model.model.layers
    _check_replaced("fp8", quantize_linears_fp8_(layers, ENGINE_PROJECTION_PATHS, fast_accum, triton_max_rows),
                    layers)
    return model


def quantize_model_(model: nn.Module, quantization: str | None,
                    state_dict: MutableMapping | None = None, *, fp8_fast_accum: bool = False,
                    fp8_triton_max_rows: int = 0) -> nn.Module:
    """Apply the engine option `quantization` ("int8", "fp8" or None) to a loaded Llama, in place
    (fp8_fast_accum: the fp8 products accumulate without periodic promotion; fp8_triton_max_rows: products
    of up to that many rows in the Triton W8A8 kernel on CUDA; the options of those names).

    state_dict: the dict the model was loaded from. load_llama uses its tensors without a copy when
    they already have the device and dtype, so while the caller's dict holds them the bf16 weights
    cannot be freed; it is emptied here first (quantizing only) and must not be used afterwards."""
    quantization = validate_quantization(quantization)
    if quantization is None:
        return model
    if isinstance(state_dict, dict):
        state_dict.clear()
    if quantization == "fp8":
        return quantize_llama_fp8_(model, fp8_fast_accum, fp8_triton_max_rows)
    return quantize_llama_int8_(model)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Fp8Linear)) for m in model.modules())
