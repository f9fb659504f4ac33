"""engine/host_copy.py's bound on the page-locked memory that waiting requests' image rows hold (the CPU
part: the rule; test_engine_gpu.py checks the copies on a GPU)."""
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
