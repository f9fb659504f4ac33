#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with the pinned requirements, this package and the client SDK
# installed in editable mode. Re-running it does nothing when everything is already in place.
# torch==2.13.0 comes from wherever pip finds it: on the development machines a local CPU wheel (their
# pip configuration); elsewhere PyPI's CUDA build (works on a CPU too, with several GB of CUDA
# libraries), or the CPU build when PyTorch's CPU index is added (README "Set-up"):
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# INTERNVL_REQUIREMENTS picks another requirements file (scripts/gpu-setup.sh: requirements-serve.txt).
# PYTHON picks the interpreter that makes the venv (3.11 or 3.12; default python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${INTERNVL_VENV:-$root/.venv}
requirements=${INTERNVL_REQUIREMENTS:-requirements.txt}
stamp=$venv/.internvl-setup-stamp
want=$( (echo "$requirements"; cat requirements.txt requirements-serve.txt pyproject.toml client/pyproject.toml gateway/pyproject.toml 2>/dev/null) | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
if [[ ! -x $venv/bin/python ]]; then
  echo "setup: creating $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q pip==26.3 >/dev/null  # tests/install uses its resolver (fast-deps)
# the Python versions pyproject.toml claims (tests/install resolves the pins for each)
"$venv/bin/python" - <<'PY'
import sys
version = "%d.%d.%d" % sys.version_info[:3]
try:
    import tomllib  # 3.11+
    from pip._vendor.packaging.specifiers import SpecifierSet
    spec = SpecifierSet(tomllib.load(open("pyproject.toml", "rb"))["project"]["requires-python"])
except ImportError:
    spec = None
if spec is None or version not in spec:
    sys.exit("setup: %s has Python %s; this project needs %s (remove the venv and run again with "
             "PYTHON=python3.12 or python3.11)" % (sys.prefix, version, spec or "3.11 or 3.12"))
PY
echo "setup: installing pinned requirements (first time: about a minute)" >&2
"$venv/bin/python" -m pip install -q -r "$requirements"
"$venv/bin/python" -m pip install -q --no-deps -e . 
if [[ -f client/pyproject.toml ]]; then
  "$venv/bin/python" -m pip install -q --no-deps -e client
fi
if [[ -f gateway/pyproject.toml ]]; then
  "$venv/bin/python" -m pip install -q --no-deps -e gateway
fi
echo "$want" > "$stamp"
echo "setup: ready ($venv)" >&2
