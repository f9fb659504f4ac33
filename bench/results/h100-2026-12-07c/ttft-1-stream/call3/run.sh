set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=454ab13
W=/tmp/bench-gpu; R=$W/results6; mkdir -p $R
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --params llm.engine_process=false --out $R/timeline-inproc.json > $R/timeline-inproc.log 2>&1; date -u
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-new4.json > $R/timeline-new4.log 2>&1; date -u
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --params llm.engine_process=false --out $R/timeline-inproc2.json > $R/timeline-inproc2.log 2>&1; date -u
echo ALL-DONE
