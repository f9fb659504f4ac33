set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=8d642ef
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/a $R/b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
date -u
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8; T1=llm.host_threads=1,vision.host_threads=1
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 1,32,64 --requests-per-stream 4"
$B --out $R/a --direct-levels 64 --server-compare $FP8,$T1 --server-compare $FP8 > $R/a/benchmark.log 2>&1; date -u
$B --out $R/b --server-compare $FP8 --server-compare $FP8,$T1 > $R/b/benchmark.log 2>&1; date -u
echo ALL-DONE
