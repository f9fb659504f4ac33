set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=bc886f0
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/bs1 $R/bp1 $R/bp2 $R/bs2 $R/modes
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 bench/kernels_bench.py --only attention --kv-dtype bf16 > $R/attention-bf16.log 2>&1
INTERNVL_SERVE_DECODE_PARTITIONS=1 python3 bench/kernels_bench.py --only attention --kv-dtype bf16 > $R/attention-bf16-partitions.log 2>&1
python3 -m pytest -v -p no:cacheprovider -m gpu tests/unit/test_fused_ops.py tests/unit/test_quantize.py \
  tests/unit/test_engine_gpu.py tests/unit/test_vision_fp8.py > $R/gpu-tests.log 2>&1
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --levels 1,32,64 --requests-per-stream 4"
$B --out $R/bs1 > $R/bs1/benchmark.log 2>&1; date -u
INTERNVL_SERVE_DECODE_PARTITIONS=1 $B --out $R/bp1 > $R/bp1/benchmark.log 2>&1; date -u
INTERNVL_SERVE_DECODE_PARTITIONS=1 $B --out $R/bp2 > $R/bp2/benchmark.log 2>&1; date -u
$B --out $R/bs2 > $R/bs2/benchmark.log 2>&1; date -u
(for i in $(seq 1 30); do date -u; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | \
  while IFS=, read pid mem; do echo "$pid $mem $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-150)"; done; sleep 10; done \
  > $R/modes/compute-apps.txt 2>&1) &
python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --levels 1 --requests-per-stream 16 \
  --server-compare llm.engine_process=false --out $R/modes > $R/modes/benchmark.log 2>&1; date -u
for m in true false; do python3 bench/engine_alone.py --checkpoint $W/ckpt/v1-1-random --levels 1 --requests-per-stream 8 \
  --engine-option engine_process=$m --out $R/alone-process-$m.json > $R/alone-process-$m.log 2>&1; done; date -u
echo ALL-DONE
