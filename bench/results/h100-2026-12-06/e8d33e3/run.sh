# this session's device pipeline (untracked): tests, engine alone A/B, server A/B; in the background
set -x
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/engine-alone $R/server
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt
date -u >> $R/device.txt
python3 -m pytest -m gpu tests/unit/test_vision_fp8.py tests/unit/test_quantize.py tests/unit/test_vision_gpu.py \
  tests/unit/test_engine_gpu.py tests/unit/test_kv_cache_fp8.py -q -p no:cacheprovider > $R/gpu-tests.log 2>&1
echo "tests rc $?" >> $R/gpu-tests.log
python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
for ep in false true; do
  python3 bench/engine_alone.py --checkpoint $W/ckpt/v1-1-random --levels 32,64 --requests-per-stream 4 \
    --new-tokens 256 --profile-levels "" --engine-option quantization=fp8 --engine-option kv_cache_dtype=fp8 \
    --engine-option engine_process=$ep --out $R/engine-alone/engine-fp8-kv-process-$ep.json > $R/engine-alone/engine-process-$ep.log 2>&1
  echo "engine alone process=$ep rc $?"
done
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
python3 bench/benchmark.py --out $R/server --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server \
  --levels 1,32,64 --requests-per-stream 4 --py-spy-levels 64 \
  --server-compare $FP8 --server-compare $FP8,llm.engine_process=true > $R/server/benchmark.log 2>&1
echo "benchmark rc $?"
echo ALL-DONE
