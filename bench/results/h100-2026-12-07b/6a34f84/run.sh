set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=6a34f84
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/a $R/b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 -m pytest -q -m gpu tests/unit/test_kernels.py tests/unit/test_quantize.py -k "w8a8 or fp8" > $R/gpu-tests.log 2>&1; date -u
python3 bench/kernels_bench.py --only w8a8 > $R/w8a8.log 2>&1; echo "w8a8 rc $?" >> $R/w8a8.log; date -u
python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8; TR=llm.fp8_triton_max_rows=64
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 1,32,64 --requests-per-stream 4"
$B --out $R/a --direct-levels 64 --server-compare $FP8,$TR --server-compare $FP8 > $R/a/benchmark.log 2>&1; date -u
$B --out $R/b --server-compare $FP8 --server-compare $FP8,$TR > $R/b/benchmark.log 2>&1; date -u
python3 bench/kernels_bench.py --only w8a8 --sweep > $R/w8a8-sweep.log 2>&1; date -u
echo ALL-DONE
