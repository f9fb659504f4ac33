"""engine/host_copy.py's bound on the page-locked memory that waiting requests' image rows hold, and the
dtype the rows go to the engine in (the CPU part: the rules; test_engine_gpu.py checks the copies on a
GPU)."""
from __future__ import annotations

import torch

from internvl_serve.engine import host_copy


def test_rows_are_page_locked_only_within_the_bound(monkeypatch):
    budget = host_copy.PAGE_LOCKED_WAITING_BYTES
    stats = {}
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: stats)
    assert host_copy.fits_page_locked(budget + 1)  # a torch that reports nothing: pinned, as before
    stats["allocated_bytes.current"] = budget - 100  # only the pool reported: the pool counts
    assert host_copy.fits_page_locked(100) and not host_copy.fits_page_locked(101)
    stats["active_bytes.current"] = 0  # the blocks handed out, where reported, count instead
    assert host_copy.fits_page_locked(budget) and not host_copy.fits_page_locked(budget + 1)


def test_on_the_cpu_rows_stay_as_they_are():
    rows = torch.randn(4, 8)
    assert host_copy.page_locked(rows, "cpu") is rows


def test_a_torch_without_host_memory_stats_pins_as_before(monkeypatch):
    monkeypatch.delattr(torch.cuda, "host_memory_stats")
    assert host_copy.fits_page_locked(host_copy.PAGE_LOCKED_WAITING_BYTES + 1)


def test_rows_travel_in_the_engines_dtype_where_it_is_narrower():
    f32, bf16 = torch.float32, torch.bfloat16
    assert host_copy.travel_dtype(f32, bf16) == bf16  # a GPU engine: half the bytes
    assert host_copy.travel_dtype(f32, f32) == f32  # the CPU's float32 engine: as they are
    assert host_copy.travel_dtype(bf16, f32) == bf16  # never widened: the engine converts them itself
    rows = torch.randn(4, 8)
    half = host_copy.page_locked(rows, "cpu", bf16)
    assert half.dtype == bf16 and torch.equal(half, rows.to(bf16))
    assert host_copy.page_locked(rows, "cpu", f32) is rows
