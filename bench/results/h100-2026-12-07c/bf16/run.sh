set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=454ab13
W=/tmp/bench-gpu; R=$W/results3; mkdir -p $R/b1
date -u
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-bf16.json > $R/timeline-bf16.log 2>&1; date -u
python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --levels 1,32,64 --requests-per-stream 4 --out $R/b1 > $R/b1/benchmark.log 2>&1; date -u
echo ALL-DONE
