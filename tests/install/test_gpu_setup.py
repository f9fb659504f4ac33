"""scripts/gpu-setup.sh --check, the GPU path outside Docker: on a machine without a CUDA build of torch
it refuses and says why (the CPU machines, CI); on the GPU machine it passes (marked gpu). The check runs
on this test's own venv, so it sees what the server would see."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def check() -> subprocess.CompletedProcess:
    env = {**os.environ, "INTERNVL_VENV": sys.prefix}
    return subprocess.run(["bash", "scripts/gpu-setup.sh", "--check"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this machine has a CUDA build of torch (see the gpu test)")
def test_check_refuses_a_cpu_torch():
    result = check()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"torch {torch.__version__} is a CPU build" in result.stderr
    assert "gpu-setup: tritonserver " in result.stdout  # the server and the stub for this Python were found
    assert "numpy" not in result.stderr  # numpy 1.26: no complaint


def test_check_rejects_an_unknown_option():
    result = subprocess.run(["bash", "scripts/gpu-setup.sh", "--install-everything"], cwd=REPO_ROOT,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "usage: scripts/gpu-setup.sh" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_check_passes_on_a_gpu_machine():
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu-setup: ready: " in result.stdout and torch.cuda.get_device_name(0) in result.stdout
