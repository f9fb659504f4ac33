set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=bc886f0
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/budget-bf16-2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 32,64 --requests-per-stream 4 \
  --server-compare llm.max_num_batched_tokens=512 --server-compare llm.max_num_batched_tokens=2048 \
  --out $R/budget-bf16-2 > $R/budget-bf16-2/benchmark.log 2>&1; date -u
echo ALL-DONE
