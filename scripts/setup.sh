#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with the pinned requirements, this package and the client SDK
# installed in editable mode. Re-running it does nothing when everything is already in place.
# torch==2.13.0 comes from wherever pip finds it: on the development machines a local CPU wheel (their
# pip configuration); elsewhere PyPI's CUDA build (works on a CPU too, with several GB of CUDA
# libraries), or the CPU build when PyTorch's CPU index is added (README "Set-up"):
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${INTERNVL_VENV:-$root/.venv}
stamp=$venv/.internvl-setup-stamp
want=$(cat requirements.txt requirements-serve.txt pyproject.toml client/pyproject.toml gateway/pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
if [[ ! -x $venv/bin/python ]]; then
  echo "setup: creating $venv" >&2
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
echo "setup: installing pinned requirements (first time: about a minute)" >&2
"$venv/bin/python" -m pip install -q -r requirements.txt
"$venv/bin/python" -m pip install -q --no-deps -e . 
if [[ -f client/pyproject.toml ]]; then
  "$venv/bin/python" -m pip install -q --no-deps -e client
fi
if [[ -f gateway/pyproject.toml ]]; then
  "$venv/bin/python" -m pip install -q --no-deps -e gateway
fi
echo "$want" > "$stamp"
echo "setup: ready ($venv)" >&2
