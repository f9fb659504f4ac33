# the device pipeline of this run (session-run.sh at the time; untracked, run in the background on the device)
set -x
source scripts/dev/device_env.sh
export BENCH_COMMIT=85aa837
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/server $R/server-priority
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
timeout 110 python3 -m pytest -m gpu tests/unit/test_fused_ops.py tests/unit/test_quantize.py tests/unit/test_engine_gpu.py \
  tests/unit/test_kv_cache_fp8.py tests/unit/test_vision_gpu.py -q -p no:cacheprovider > $R/gpu-tests.log 2>&1; echo "tests rc $?" >> $R/gpu-tests.log
python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
date -u
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 1,32,64 --requests-per-stream 4"
$B --out $R/server --server-compare $FP8 --server-compare $FP8,llm.host_threads=1,vision.host_threads=1 > $R/server/benchmark.log 2>&1
echo "benchmark server rc $?"; date -u
date -u
date -u
python3 bench/rows_handoff.py --iters 100 --out $R/rows-handoff.json > $R/rows-handoff.log 2>&1
for T in "" 1; do python3 bench/vision_step_profile.py --iters 10 --mmap-large-allocations --quantization fp8 \
  ${T:+--host-threads $T} --out $R/vision-step-threads${T:-default}.json > $R/vision-step-threads${T:-default}.log 2>&1; done
date -u
$B --out $R/server-priority --server-compare $FP8,llm.encoder_priority_ms=150 --server-compare $FP8 > $R/server-priority/benchmark.log 2>&1
echo ALL-DONE; date -u
