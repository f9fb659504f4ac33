#!/usr/bin/env bash
# The GPU soak across several device commands (one command may run 10 minutes; the soak runs longer).
# On the GPU machine, from the repository root, after the environment is set up (a venv with the
# project's requirements and the tritonserver binary, e.g. scripts/gpu-setup.sh or a carried bootstrap):
#   bash scripts/dev/gpu_soak.sh start 20m [extra soak.py options]   # random full-size weights, soak in the background
#   bash scripts/dev/gpu_soak.sh wait 560                            # until the soak ends or 560 s pass
#   bash scripts/dev/gpu_soak.sh collect "$OUT"                      # copy its reports (and the log's tail)
# The soak runs in its own session (setsid), so a command that ends does not end it (start|wait|collect:
# scripts/dev/background.sh); soak.py itself handles SIGINT/SIGTERM and writes its reports. Work folder:
# $SOAK_WORK (default /tmp/soak-gpu).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/background.sh"

run_start() {
  local duration=${1:?duration, e.g. 20m}; shift
  python3 -m internvl_serve.tiny "$work/tiny" >/dev/null
  python3 -m internvl_serve.random_weights "$work/v1-1-random" --tokenizer-from "$work/tiny" >/dev/null
  background_launch python3 loadtest/soak.py --launch "$work/v1-1-random" --streams 64 --duration "$duration" \
    --interval 30 --num-images 1000 --max-new-tokens 128 --out "$work/run" "$@"
}

run_tail() {
  tail -n 5 "$work/soak.out"; tail -n 3 "$work/run/soak.csv" 2>/dev/null || true
}

run_collect() {
  local dest=$1 f
  for f in soak.csv soak.json soak.md soak.png settings.json errors.txt; do
    [[ -f $work/run/$f ]] && cp "$work/run/$f" "$dest/"
  done
  tail -n 400 "$work/run/server.log" > "$dest/server-log-tail.txt" 2>/dev/null || true
  tail -n 200 "$work/soak.out" > "$dest/soak-out-tail.txt"
  ls -la "$dest"
}

background_main gpu_soak "${SOAK_WORK:-/tmp/soak-gpu}" soak "start DURATION | wait SECONDS | collect DIR" "$@"
