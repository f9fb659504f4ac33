#!/usr/bin/env bash
# The speed benchmark across several device commands (one command may run 10 minutes; the whole run
# takes longer). On the GPU machine, from the repository root, after the environment is set up (a venv
# with the project's requirements and the tritonserver binary, e.g. scripts/gpu-setup.sh or, on a lent
# machine, scripts/dev/device_carry.sh here and `source scripts/dev/device_env.sh` there):
#   BENCH_COMMIT=abc1234 bash scripts/dev/gpu_bench.sh start [benchmark.py options]   # in the background
#   bash scripts/dev/gpu_bench.sh wait 560                                            # until it ends or 560 s pass
#   bash scripts/dev/gpu_bench.sh collect "$OUT"                                      # results, logs
# Every option after `start` goes to bench/benchmark.py as given, e.g. the open loop (Poisson arrivals):
#   bash scripts/dev/gpu_bench.sh start --arrival-rates 1,2,4,8 --arrival-requests 100
# or only the open loop, added to an earlier run's results of the same commit on the same machine:
#   bash scripts/dev/gpu_bench.sh start --merge --skip-baseline --skip-engine-alone --levels "" --arrival-rates 2,4
# The run: bench/benchmark.py (baseline, engine alone, server; its options are passed on), then
# bench/ttft_timeline.py on the same random checkpoint. It runs in its own session (setsid), so a
# command that ends does not end it (start|wait|collect: scripts/dev/background.sh). Work folder:
# $BENCH_WORK (default /tmp/bench-gpu).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/background.sh"

run_start() {
  mkdir -p "$work/results"
  cat > "$work/run.sh" <<EOF
set -x
python3 bench/benchmark.py --out "$work/results" --work "$work/ckpt" $(printf '%q ' "$@")
echo "benchmark exit \$?"
python3 bench/ttft_timeline.py --checkpoint "$work/ckpt/v1-1-random" --requests 8 --max-tokens 8 \
  --out "$work/results/ttft_timeline.json"
echo "timeline exit \$?"
EOF
  export BENCH_COMMIT=${BENCH_COMMIT:-unknown}
  background_launch bash "$work/run.sh"
}

run_tail() {
  tail -n 12 "$work/bench.out"
}

run_collect() {
  cp -r "$work/results/." "$1/" 2>/dev/null || true
  cp "$work/bench.out" "$1/" 2>/dev/null || true
}

background_main gpu_bench "${BENCH_WORK:-/tmp/bench-gpu}" bench "start [benchmark options] | wait SECONDS | collect DIR" "$@"
