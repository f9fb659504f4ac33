# this session's device pipeline (untracked): engine in the stub vs in its own process, repeated
set -x
W=/tmp/bench-gpu; R=$W/results3; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt
date -u >> $R/device.txt
if [[ ! -d $W/ckpt/v1-1-random ]]; then python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
fi
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --requests-per-stream 4"
$B --out $R/a1 --levels 1,32,64 --arrival-rates 5 --arrival-requests 100 --server-compare $FP8 > $R/a1.log 2>&1; echo "a1 rc $?"
$B --out $R/b1 --levels 1,32,64 --arrival-rates 5 --arrival-requests 100 --server-compare $FP8,llm.engine_process=true > $R/b1.log 2>&1; echo "b1 rc $?"
$B --out $R/c1 --levels 32,64 --server-compare $FP8,llm.engine_process=true,llm.response_senders=2 > $R/c1.log 2>&1; echo "c1 rc $?"
$B --out $R/a2 --levels 32,64 --arrival-rates 5 --arrival-requests 100 --server-compare $FP8 > $R/a2.log 2>&1; echo "a2 rc $?"
$B --out $R/b2 --levels 32,64 --arrival-rates 5 --arrival-requests 100 --server-compare $FP8,llm.engine_process=true > $R/b2.log 2>&1; echo "b2 rc $?"
echo ALL-DONE
