#!/usr/bin/env bash
# The GPU soak across several device commands (one command may run 10 minutes; the soak runs longer).
# On the GPU machine, from the repository root, after the environment is set up (a venv with the
# project's requirements and the tritonserver binary, e.g. scripts/gpu-setup.sh or a carried bootstrap):
#   bash scripts/dev/gpu_soak.sh start 20m [extra soak.py options]   # random full-size weights, soak in the background
#   bash scripts/dev/gpu_soak.sh wait 560                            # until the soak ends or 560 s pass
#   bash scripts/dev/gpu_soak.sh collect "$OUT"                      # copy its reports (and the log's tail)
# The soak runs in its own session (setsid), so a command that ends does not end it; soak.py itself
# handles SIGINT/SIGTERM and writes its reports. Work folder: $SOAK_WORK (default /tmp/soak-gpu).
set -euo pipefail
work=${SOAK_WORK:-/tmp/soak-gpu}
cmd=${1:?start DURATION | wait SECONDS | collect DIR}
shift
case $cmd in
  start)
    duration=${1:?duration, e.g. 20m}; shift
    mkdir -p "$work"
    python3 -m internvl_serve.tiny "$work/tiny" >/dev/null
    python3 -m internvl_serve.random_weights "$work/v1-1-random" --tokenizer-from "$work/tiny" >/dev/null
    setsid nohup python3 loadtest/soak.py --launch "$work/v1-1-random" --streams 64 --duration "$duration" \
      --interval 30 --num-images 1000 --max-new-tokens 128 --out "$work/run" "$@" \
      >"$work/soak.out" 2>&1 < /dev/null &
    echo $! > "$work/soak.pid"
    echo "gpu_soak: started (pid $(cat "$work/soak.pid")), output $work/soak.out"
    ;;
  wait)
    limit=${1:?seconds}
    pid=$(cat "$work/soak.pid")
    for ((i = 0; i < limit; i += 5)); do
      kill -0 "$pid" 2>/dev/null || { echo "gpu_soak: soak ended"; break; }
      sleep 5
    done
    tail -n 5 "$work/soak.out"; tail -n 3 "$work/run/soak.csv" 2>/dev/null || true
    ;;
  collect)
    dest=${1:?destination folder}
    mkdir -p "$dest"
    for f in soak.csv soak.json soak.md soak.png settings.json errors.txt; do
      [[ -f $work/run/$f ]] && cp "$work/run/$f" "$dest/"
    done
    tail -n 400 "$work/run/server.log" > "$dest/server-log-tail.txt" 2>/dev/null || true
    tail -n 200 "$work/soak.out" > "$dest/soak-out-tail.txt"
    ls -la "$dest"
    ;;
  *) echo "gpu_soak: unknown command $cmd" >&2; exit 2 ;;
esac
