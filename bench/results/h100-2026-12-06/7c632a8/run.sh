# the device pipeline of this run (session-run.sh at the time; untracked, run in the background on the device)
set -x
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/engine-alone $R/server $R/server-priority
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 -m pytest -m gpu tests/unit/test_fused_ops.py tests/unit/test_quantize.py tests/unit/test_vision_fp8.py \
  tests/unit/test_kernels.py tests/unit/test_engine_gpu.py tests/unit/test_kv_cache_fp8.py -q -p no:cacheprovider \
  > $R/gpu-tests.log 2>&1; echo "tests rc $?" >> $R/gpu-tests.log
python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
E="python3 bench/engine_alone.py --checkpoint $W/ckpt/v1-1-random --levels 32,64 --requests-per-stream 4 --new-tokens 256 --engine-option quantization=fp8 --engine-option kv_cache_dtype=fp8"
$E --fp8-linears-quantize-their-rows --out $R/engine-alone/unfused-rows.json > $R/engine-alone/unfused-rows.log 2>&1
$E --out $R/engine-alone/fused-rows.json > $R/engine-alone/fused-rows.log 2>&1
$E --engine-option fp8_fast_accum=true --out $R/engine-alone/fast-accum.json > $R/engine-alone/fast-accum.log 2>&1
echo "engine alone done"
python3 bench/kernels_bench.py --only quantized > $R/kernels-quantized.log 2>&1; echo "kernels rc $?"
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 1,32,64 --requests-per-stream 4 --arrival-rates 5 --arrival-requests 100"
$B --out $R/server --server-compare $FP8 --server-compare $FP8,llm.fp8_fast_accum=true > $R/server/benchmark.log 2>&1
echo "benchmark rc $?"
$B --out $R/server-priority --server-compare $FP8,llm.fp8_fast_accum=true,llm.encoder_priority_ms=50 > $R/server-priority/benchmark.log 2>&1
echo "benchmark 2 rc $?"; echo ALL-DONE
