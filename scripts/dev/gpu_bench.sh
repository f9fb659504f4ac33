#!/usr/bin/env bash
# The speed benchmark across several device commands (one command may run 10 minutes; the whole run
# takes longer). On the GPU machine, from the repository root, after the environment is set up (a venv
# with the project's requirements and the tritonserver binary, e.g. scripts/gpu-setup.sh or a carried
# bootstrap):
#   BENCH_COMMIT=abc1234 bash scripts/dev/gpu_bench.sh start [benchmark.py options]   # in the background
#   bash scripts/dev/gpu_bench.sh wait 560                                            # until it ends or 560 s pass
#   bash scripts/dev/gpu_bench.sh collect "$OUT"                                      # results, logs
# Every option after `start` goes to bench/benchmark.py as given, e.g. the open loop (Poisson arrivals):
#   bash scripts/dev/gpu_bench.sh start --arrival-rates 1,2,4,8 --arrival-requests 100
# or only the open loop, added to an earlier run's results of the same commit on the same machine:
#   bash scripts/dev/gpu_bench.sh start --merge --skip-baseline --skip-engine-alone --levels "" --arrival-rates 2,4
# The run: bench/benchmark.py (baseline, engine alone, server; its options are passed on), then
# bench/ttft_timeline.py on the same random checkpoint. It runs in its own session (setsid), so a
# command that ends does not end it. Work folder: $BENCH_WORK (default /tmp/bench-gpu).
set -euo pipefail
work=${BENCH_WORK:-/tmp/bench-gpu}
cmd=${1:?start [benchmark options] | wait SECONDS | collect DIR}
shift
case $cmd in
  start)
    mkdir -p "$work/results"
    cat > "$work/run.sh" <<EOF
set -x
python3 bench/benchmark.py --out "$work/results" --work "$work/ckpt" $(printf '%q ' "$@")
echo "benchmark exit \$?"
python3 bench/ttft_timeline.py --checkpoint "$work/ckpt/v1-1-random" --requests 8 --max-tokens 8 \
  --out "$work/results/ttft_timeline.json"
echo "timeline exit \$?"
EOF
    BENCH_COMMIT=${BENCH_COMMIT:-unknown} setsid nohup bash "$work/run.sh" > "$work/bench.out" 2>&1 < /dev/null &
    echo $! > "$work/bench.pid"
    echo "gpu_bench: started (pid $(cat "$work/bench.pid")), output $work/bench.out"
    ;;
  wait)
    limit=${1:?seconds}
    pid=$(cat "$work/bench.pid")
    for ((i = 0; i < limit; i += 5)); do
      kill -0 "$pid" 2>/dev/null || { echo "gpu_bench: run ended"; break; }
      sleep 5
    done
    tail -n 12 "$work/bench.out"
    ;;
  collect)
    dest=${1:?destination folder}
    mkdir -p "$dest"
    cp -r "$work/results/." "$dest/" 2>/dev/null || true
    cp "$work/bench.out" "$dest/" 2>/dev/null || true
    ;;
  *)
    echo "gpu_bench: unknown command $cmd" >&2
    exit 2
    ;;
esac
