# The device script of 2026-12-07 23:47 UTC (at 60be9db), run in the background and polled over one call; the budget ran out during capprio/.
set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=60be9db
W=/tmp/bench-gpu; R=$W/results; mkdir -p $R/kern $R/step $R/vcap1 $R/vcap2 $R/dot1 $R/dot2 $R/capprio
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 -m pytest -q -m gpu tests/unit/test_kernels.py tests/unit/test_fused_ops.py > $R/kern/gpu-tests.log 2>&1; date -u
python3 bench/kernels_bench.py --only rope > $R/kern/rope-bf16.log 2>&1; date -u
python3 bench/kernels_bench.py --only attention --grid-sweep > $R/kern/attention-bf16.log 2>&1; date -u
python3 bench/decode_step_bench.py --batches 1,32,64 --ctx 416 \
  --attention-variants default,heads-first,dot,heads-first+dot > $R/step/variants.log 2>&1; date -u
B="python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --requests-per-stream 4"
$B --levels 1,32 --server-compare vision.max_batch_size=1 --out $R/vcap1 > $R/vcap1/benchmark.log 2>&1; date -u
INTERNVL_SERVE_DECODE_DOT=1 $B --levels 32 --out $R/dot1 > $R/dot1/benchmark.log 2>&1; date -u
P=vision.max_batch_size=1,llm.encoder_priority_ms=50
$B --levels 32 --skip-server --server-compare $P --server-compare $P,llm.encoder_priority_linger_ms=5 \
  --out $R/capprio > $R/capprio/benchmark.log 2>&1; date -u
$B --levels 32,64 --server-compare vision.max_batch_size=1 --out $R/vcap2 > $R/vcap2/benchmark.log 2>&1; date -u
INTERNVL_SERVE_DECODE_DOT=1 $B --levels 32,64 --out $R/dot2 > $R/dot2/benchmark.log 2>&1; date -u
python3 bench/kernels_bench.py --only attention --grid-sweep --kv-dtype fp8 > $R/kern/attention-fp8.log 2>&1; date -u
python3 bench/decode_step_bench.py --fused on --batches 32 --ctx 416 --profile > $R/step/profile.log 2>&1; date -u
echo ALL-DONE
