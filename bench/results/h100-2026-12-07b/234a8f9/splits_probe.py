"""Decode attention over the engine-wide table (256 blocks): programs per (sequence, head) swept."""
import sys
sys.path.insert(0, "bench")
import torch
import kernels_bench as kb
from internvl_serve.kernels.paged_attention import paged_decode_attention

kb.cache_dtype = kb.KV_DTYPES[sys.argv[1]]
scale = kb.D ** -0.5
for ctx in (512, 2048):
    for B in (8, 16, 32, 48, 64):
        nbytes = 2 * B * ctx * kb.H * kb.D * torch.empty((), dtype=kb.cache_dtype).element_size()
        sets = [kb.paged_inputs(B, ctx, kb.ENGINE_BLOCKS) for _ in range(max(1, min(16, kb.ROTATE_BYTES // nbytes)))]
        res = []
        for splits in (1, 2, 4, 8, 32):
            t = kb.graph_us([(lambda s=s: paged_decode_attention(s[0], s[1], s[2], s[3], s[4], scale, splits=splits)) for s in sets])
            res.append(f"s{splits}:{t:.1f}")
        print(f"B={B} ctx={ctx} " + " ".join(res), flush=True)
        del sets
