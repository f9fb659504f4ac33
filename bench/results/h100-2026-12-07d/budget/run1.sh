set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=bc886f0
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/budget-bf16 $R/budget-fp8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --levels 32,64 --requests-per-stream 4"
$B --server-compare llm.max_num_batched_tokens=1024 --server-compare llm.max_num_batched_tokens=512 \
  --out $R/budget-bf16 > $R/budget-bf16/benchmark.log 2>&1; date -u
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
$B --skip-server --server-compare $FP8,llm.max_num_batched_tokens=512 --server-compare $FP8 \
  --out $R/budget-fp8 > $R/budget-fp8/benchmark.log 2>&1; date -u
echo ALL-DONE
