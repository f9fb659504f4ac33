# A long run across several device commands (one command may run 10 minutes; the run takes longer):
# `start` launches it in its own session (setsid), so the command that started it may end; `wait`
# returns when it ends or after a number of seconds; `collect` copies what it wrote. Sourced by
# gpu_bench.sh and gpu_soak.sh, which own what runs and what is collected; this file owns the
# start|wait|collect skeleton, the pid file and the output file ($work/$stem.pid, $work/$stem.out).
#
# A script that sources it defines
#   run_start ARGS...    prepares $work and calls `background_launch CMD...` (exported variables reach CMD)
#   run_tail             prints the end of the run's output (after `wait`)
#   run_collect DEST     copies the results into DEST (DEST exists)
# and ends with `background_main NAME WORK STEM USAGE "$@"`.

# background_launch CMD...: CMD in its own session, stdout and stderr to $work/$stem.out, its pid in
# $work/$stem.pid.
background_launch() {
  setsid nohup "$@" > "$work/$stem.out" 2>&1 < /dev/null &
  echo $! > "$work/$stem.pid"
  echo "$name: started (pid $(cat "$work/$stem.pid")), output $work/$stem.out"
}

# background_wait SECONDS: until the run's process has ended or SECONDS have passed (checked every 5 s).
background_wait() {
  local limit=${1:?seconds} pid i
  pid=$(cat "$work/$stem.pid")
  for ((i = 0; i < limit; i += 5)); do
    kill -0 "$pid" 2>/dev/null || { echo "$name: run ended"; break; }
    sleep 5
  done
}

# background_main NAME WORK STEM USAGE start ARGS... | wait SECONDS | collect DIR
background_main() {
  name=$1 work=$2 stem=$3
  local usage=$4
  shift 4
  local cmd=${1:?$usage}
  shift
  case $cmd in
    start)
      mkdir -p "$work"
      run_start "$@"
      ;;
    wait)
      background_wait "${1:?seconds}"
      run_tail
      ;;
    collect)
      local dest=${1:?destination folder}
      mkdir -p "$dest"
      run_collect "$dest"
      ;;
    *)
      echo "$name: unknown command $cmd" >&2
      exit 2
      ;;
  esac
}
