"""GPU kernels for the serving engine (Triton), each with a plain-torch reference and CPU fallback.

- paged_attention: flash-decoding attention of one new token per sequence over a block-paged KV
  cache of any strides, and the KV-cache write (`write_kv`).
- prefill_attention: varlen attention of a step's prefill chunks and decodes (causal by absolute
  position) read through the block tables of the paged cache (the engine's default on CUDA).
- int8_linear: weight-only int8 linears (per-output-channel scales) for the language model.
- fp8_linear: e4m3 linears (per-channel weight, per-token activation scales, torch._scaled_mm) for the
  vision encoder's compute-bound matmuls (the vision model's `quantization: fp8`; not exported here).
- fused_ops: the LLaMA layer's elementwise work fused: residual add + RMSNorm, rotary in place,
  SiLU-and-mul (engine/llama.py calls them when its fused path is on).

Every public function but paged_prefill_attention (Triton only: the engine falls back to its SDPA
reference, engine/attention.py) takes `use_triton=None` (Triton on CUDA tensors, torch elsewhere), so the
engine calls the same function on the CPU test machines and on the GPU.
"""

from internvl_serve.kernels.fused_ops import add_rmsnorm, rotary_, silu_and_mul
from internvl_serve.kernels.int8_linear import (
    Int8Linear,
    LogitError,
    compare_logits,
    int8_linear,
    logit_error,
    quantize_llama_linears,
    quantize_weight,
)
from internvl_serve.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_torch,
    write_kv,
)
from internvl_serve.kernels.prefill_attention import paged_prefill_attention, prefill_block_m, prefill_tiles

__all__ = [
    "add_rmsnorm",
    "rotary_",
    "silu_and_mul",
    "Int8Linear",
    "LogitError",
    "compare_logits",
    "int8_linear",
    "logit_error",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_decode_attention_torch",
    "paged_prefill_attention",
    "prefill_block_m",
    "prefill_tiles",
    "quantize_llama_linears",
    "quantize_weight",
    "write_kv",
]
