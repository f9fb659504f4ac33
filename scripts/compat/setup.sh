#!/usr/bin/env bash
# The benchmark tools of scripts/compat/run.py, each in a venv of its own under .venv-tools/ (they do not
# install next to the project's pins: aiperf needs pillow 12, the server pins 13; docs/tools.md).
#   .venv-tools/perf:   genai-perf and perf_analyzer. perf_analyzer is the binary inside tritonclient
#                       2.51.0's Linux wheel: the newest one that runs on glibc 2.36 (Debian 12); the
#                       `perf-analyzer` wheels (2.58+) and tritonclient 2.52+ need glibc 2.38. It links
#                       libb64 (Debian/Ubuntu: apt-get install libb64-0d) and libcudart.so.12 (a pip wheel).
#   .venv-tools/aiperf: aiperf.
# Idempotent. INTERNVL_TOOLS_VENV picks another folder (run.py reads it too). PYTHON picks the interpreter (3.11 or 3.12; default python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tools=${INTERNVL_TOOLS_VENV:-$root/.venv-tools}
python=${PYTHON:-python3}

make_venv() {  # name, then the requirements
  local venv=$tools/$1; shift
  if [[ -f $venv/.stamp && $(cat "$venv/.stamp") == "$*" ]]; then return; fi
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --only-binary=:all: "$@"
  echo "$*" > "$venv/.stamp"
}

make_venv perf genai-perf==0.0.16 tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79 sentencepiece==0.2.3 protobuf==7.36.2
make_venv aiperf aiperf==0.13.0
libraries=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p) )
if [[ $libraries != *libb64.so.0d* ]]; then
  echo "compat setup: perf_analyzer needs libb64: apt-get install libb64-0d (Debian, Ubuntu)" >&2
  exit 1
fi
echo "compat setup: ready ($tools)" >&2
