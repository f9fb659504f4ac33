# this session's device pipeline (untracked): the server with and without CUDA MPS
set -x
W=/tmp/bench-gpu; R=$W/results2; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv > $R/device.txt
date -u >> $R/device.txt
which nvidia-cuda-mps-control nvidia-cuda-mps-server
if [[ ! -d $W/ckpt/v1-1-random ]]; then python3 - <<'PY'
from pathlib import Path
from internvl_serve.random_weights import make_random_checkpoint
from internvl_serve.tiny import make_tiny_checkpoint
w = Path('/tmp/bench-gpu/ckpt'); w.mkdir(parents=True, exist_ok=True)
print(make_random_checkpoint(w / 'v1-1-random', tokenizer_from=make_tiny_checkpoint(w / 'tiny')))
PY
fi
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 1,32,64 --requests-per-stream 4"
$B --out $R/no-mps --server-compare $FP8,llm.engine_process=true > $R/no-mps.log 2>&1
echo "no-mps rc $?"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; echo "mps daemon rc $?"
python3 -c 'import torch; print("cuda under mps", torch.ones(1, device="cuda").sum().item())'
echo get_server_list | nvidia-cuda-mps-control
$B --out $R/mps --server-compare $FP8,llm.engine_process=true --server-compare $FP8 > $R/mps.log 2>&1
echo "mps rc $?"
echo get_server_list | nvidia-cuda-mps-control
echo quit | nvidia-cuda-mps-control
cp -r /tmp/mps-log $R/ 2>/dev/null
echo ALL-DONE
