set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=454ab13
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/s1 $R/p1 $R/p2 $R/s2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
echo "wmem_max $(cat /proc/sys/net/core/wmem_max) uid $(id -u)" >> $R/device.txt
python3 bench/kernels_bench.py --only attention --kv-dtype fp8 > $R/attention-fp8.log 2>&1
INTERNVL_SERVE_DECODE_PARTITIONS=1 python3 bench/kernels_bench.py --only attention --kv-dtype fp8 > $R/attention-fp8-partitions.log 2>&1
python3 -m pytest -q -m gpu tests/unit/test_kernels.py -k attention > $R/gpu-tests.log 2>&1
python3 bench/rows_handoff.py --iters 100 --socket-buffer 0 --out $R/rows-handoff-buf0.json > /dev/null 2>&1
python3 bench/rows_handoff.py --iters 100 --out $R/rows-handoff.json > /dev/null 2>&1
FP8=llm.quantization=fp8,llm.kv_cache_dtype=fp8,vision.quantization=fp8
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --skip-server --levels 1,32,64 --requests-per-stream 4"
$B --out $R/s1 --server-compare $FP8 > $R/s1/benchmark.log 2>&1; date -u
INTERNVL_SERVE_DECODE_PARTITIONS=1 $B --out $R/p1 --server-compare $FP8 > $R/p1/benchmark.log 2>&1; date -u
INTERNVL_SERVE_DECODE_PARTITIONS=1 $B --out $R/p2 --server-compare $FP8 > $R/p2/benchmark.log 2>&1; date -u
$B --out $R/s2 --server-compare $FP8 > $R/s2/benchmark.log 2>&1; date -u
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --params $FP8 --out $R/timeline-fp8.json > $R/timeline.log 2>&1
echo ALL-DONE
