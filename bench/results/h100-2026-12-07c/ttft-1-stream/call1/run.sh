set -x
source scripts/dev/device_env.sh; export BENCH_COMMIT=454ab13
W=/tmp/bench-gpu; R=$W/results4; mkdir -p $R
grep -m1 "model name" /proc/cpuinfo > $R/cpu.txt; nproc >> $R/cpu.txt; uptime >> $R/cpu.txt
python3 -c "import time;t=time.perf_counter();s=sum(i*i for i in range(10**7));print('py loop s',time.perf_counter()-t)" >> $R/cpu.txt
python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-new.json > $R/timeline-new.log 2>&1; date -u
cd old && source scripts/dev/device_env.sh && python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-old.json > $R/timeline-old.log 2>&1; date -u
cd .. && source scripts/dev/device_env.sh && python3 bench/ttft_timeline.py --checkpoint $W/ckpt/v1-1-random --requests 16 --out $R/timeline-new2.json > $R/timeline-new2.log 2>&1; date -u
echo ALL-DONE
