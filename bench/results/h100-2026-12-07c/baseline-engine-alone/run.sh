set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=454ab13
W=/tmp/bench-gpu; R=$W/results2; mkdir -p $R/e1
date -u
python3 bench/benchmark.py --work $W/ckpt --skip-server --skip-engine-alone --levels 1,32,64 --requests-per-stream 4 --engine-alone-compare quantization=fp8,kv_cache_dtype=fp8 --out $R/e1 > $R/e1/benchmark.log 2>&1; date -u
echo ALL-DONE
