#!/usr/bin/env bash
# A short demo: set up, start the Triton server on CHECKPOINT (default: checkpoints/tiny, made if
# missing), chat with it over gRPC streaming (a text question, then a question about a generated
# image), stop the server.            usage: scripts/demo.sh [CHECKPOINT]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
py=${INTERNVL_VENV:-$root/.venv}/bin/python
read -r grpc http metrics < <("$py" -c 'from internvl_serve.serving.launcher import free_port as f; print(f(), f(), f())')
log=$(mktemp -t internvl-demo-XXXXXX.log)
args=(--grpc-port "$grpc" --http-port "$http" --metrics-port "$metrics" --log-file "$log")
if [[ $# -ge 1 ]]; then args+=(--checkpoint "$1"); fi
"$py" -m internvl_serve.serving.launcher "${args[@]}" &
server=$!
# On any exit: SIGINT makes the launcher stop tritonserver gracefully; then wait for it.
trap 'kill -INT "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
"$py" scripts/demo_chat.py --url "127.0.0.1:$grpc" --server-pid "$server"
