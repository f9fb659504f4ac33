# The device command's script (one H100, from 18:17 UTC, at 828b677), run in the background and polled.
set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=828b677
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/vbatch $R/full $R/fp8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --levels 32,64 --requests-per-stream 4"
$B --server-compare vision.max_batch_size=2 --server-compare vision.max_batch_size=4 \
  --out $R/vbatch > $R/vbatch/benchmark.log 2>&1; date -u
for b in 512 2048; do python3 bench/engine_alone.py --checkpoint $W/ckpt/v1-1-random --levels 1 --requests-per-stream 4 \
  --new-tokens 16 --tiles 12 --engine-option max_num_batched_tokens=$b --out $R/tiles12-budget$b.json \
  > $R/tiles12-budget$b.log 2>&1; done; date -u
python3 bench/rows_handoff.py --iters 50 --out $R/handoff.json > $R/handoff.log 2>&1
python3 bench/rows_handoff.py --iters 50 --pin --out $R/handoff-pin.json > $R/handoff-pin.log 2>&1
python3 bench/benchmark.py --work $W/ckpt --out $R/full --warm-levels 1,32 --arrival-rates 2,6 > $R/full/benchmark.log 2>&1; date -u
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --max-tokens 8 \
  --out $R/full/ttft_timeline.json > $R/full/timeline.log 2>&1; date -u
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
$B --skip-server --server-compare $FP8 --server-compare $FP8,vision.max_batch_size=4 \
  --server-compare $FP8,llm.max_num_batched_tokens=2048 --out $R/fp8 > $R/fp8/benchmark.log 2>&1; date -u
echo ALL-DONE
