set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=0a24597
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/e
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
date -u
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 32,64 --requests-per-stream 4 --out $R/e --server-compare $FP8 > $R/e/benchmark.log 2>&1; date -u
python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-server --levels 32,64 --requests-per-stream 4 --out $R/e --merge --engine-alone-compare quantization=fp8,kv_cache_dtype=fp8 > $R/e/engine.log 2>&1; date -u
echo ALL-DONE
