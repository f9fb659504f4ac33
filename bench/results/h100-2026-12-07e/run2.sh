# The second device call's script (another machine start, from 19:01 UTC, at 828b677), run in the background and polled.
set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=828b677
W=/tmp/bench-gpu; R=$W/results2; mkdir -p $R/vcap
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt; date -u >> $R/device.txt
python3 bench/benchmark.py --work $W/ckpt --skip-baseline --skip-engine-alone --levels 32,64 --requests-per-stream 4 \
  --server-compare vision.max_batch_size=1 --server-compare vision.max_batch_size=2 --server-compare vision.max_batch_size=8 \
  --out $R/vcap > $R/vcap/benchmark.log 2>&1; date -u
echo ALL-DONE
