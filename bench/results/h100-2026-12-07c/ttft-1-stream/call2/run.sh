set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=454ab13
W=/tmp/bench-gpu; R=$W/results5; mkdir -p $R
(cd old && python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-old.json > $R/timeline-old.log 2>&1); date -u
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-new3.json > $R/timeline-new3.log 2>&1; date -u
(cd old && python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-old2.json > $R/timeline-old2.log 2>&1); date -u
echo ALL-DONE
