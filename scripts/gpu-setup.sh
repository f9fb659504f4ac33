#!/usr/bin/env bash
# A GPU machine without Docker: the venv scripts/setup.sh makes, with the server's pins
# (requirements-serve.txt: PyPI's CUDA build of torch 2.13.0, numpy 1.26.4, tritonserver 2.51 from the
# nvidia-pytriton wheel), then checks what the Python backend needs on a GPU (docs/serving.md "On a GPU
# machine"). Idempotent.
#   bash scripts/gpu-setup.sh            # install (serving only), then check
#   bash scripts/gpu-setup.sh --dev      # install requirements.txt (the test tools too), then check
#   bash scripts/gpu-setup.sh --check    # check an existing venv only (INTERNVL_VENV, default .venv)
# Then: .venv/bin/python -m internvl_serve.serving.launcher --checkpoint /models/InternVL-Chat-V1-1
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${INTERNVL_VENV:-$root/.venv}
case ${1:-} in
  --check) ;;
  --dev) bash scripts/setup.sh ;;
  "") INTERNVL_REQUIREMENTS=requirements-serve.txt bash scripts/setup.sh ;;
  *) echo "usage: scripts/gpu-setup.sh [--dev|--check]" >&2; exit 2 ;;
esac
# numpy < 2 (the stub misreads tensors with numpy 2); torch built for CUDA and a GPU visible to it; the
# server and a backend folder holding the stub for this Python (the launcher's own lookup: the wheel's,
# or $TRITONSERVER and $TRITON_BACKENDS without it).
exec "$venv/bin/python" - <<'PY'
import sys
import numpy
import torch
from internvl_serve.serving.launcher import LaunchError, find_triton

problems = []
if int(numpy.__version__.split(".")[0]) >= 2:
    problems.append(f"numpy {numpy.__version__}: Triton's Python backend needs numpy<2 (pip install numpy==1.26.4)")
if not torch.version.cuda:
    problems.append(f"torch {torch.__version__} is a CPU build: install PyPI's torch (a CUDA build), not the CPU index's")
elif not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the NVIDIA driver "
                    f"(CUDA {torch.version.cuda} needs a driver that supports it) and CUDA_VISIBLE_DEVICES")
try:
    install = find_triton()
except LaunchError as e:
    problems.append(f"Triton: {e}")
else:
    print(f"gpu-setup: tritonserver {install.server}, backends {install.backends}")
if problems:
    sys.exit("gpu-setup: not ready:\n  " + "\n  ".join(problems))
print(f"gpu-setup: ready: Python {sys.version.split()[0]} in {sys.prefix}, numpy {numpy.__version__}, "
      f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
PY
