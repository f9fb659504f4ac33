"""What the kernel tests share: test_kernels.py, test_prefill_attention.py and test_fused_ops.py.

Owns: whether triton / CUDA are here (and the skip marks that follow), the relative error the checks
compare by, the NaN-filled paged KV cache both attention tests build their cases in, and the
Triton-interpreter subprocess each of those files runs itself in (TRITON_INTERPRET=1 must be set before
triton is imported, so the interpreted tier is a child process running the test file as a script).
Does not own: the cases, the checks or their tolerances (each test file keeps its own).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton==3.7.1)")
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf in out (an element not written, or a NaN slot read)
    fails at once."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written or a bad slot was read"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def nan_paged_cache(num_blocks: int, block_size: int, Hkv: int, D: int, dtype: torch.dtype,
                    device: str = "cpu", layout: str = "bthd"):
    """A paged K/V cache of num_blocks blocks, every slot NaN, and a random permutation of the block ids
    (the caller hands blocks out in that order, so a sequence's blocks are not contiguous).

    layout 'bthd' stores (num_blocks, block_size, Hkv, D); 'bhtd' stores (num_blocks, Hkv, block_size, D)
    and hands over the permuted view, so both caches index as (block, slot, head, dim).
    Returns perm, k_cache, v_cache.
    """
    perm = torch.randperm(num_blocks, device=device)
    shape = (num_blocks, block_size, Hkv, D) if layout == "bthd" else (num_blocks, Hkv, block_size, D)
    # filled in float32 and cast: the NaN of any cache dtype, e4m3 included
    k_store = torch.full(shape, float("nan"), device=device).to(dtype)
    v_store = torch.full(shape, float("nan"), device=device).to(dtype)
    k_cache = k_store if layout == "bthd" else k_store.permute(0, 2, 1, 3)
    v_cache = v_store if layout == "bthd" else v_store.permute(0, 2, 1, 3)
    return perm, k_cache, v_cache


def run_interpreted(script: str, which: str, timeout: int = 600) -> str:
    """Run `python script which` under the Triton CPU interpreter (no GPU visible), with the repository
    and tests/unit importable; fails with the child's output unless it exits 0. Returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(script), which], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreted {which} checks failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout
