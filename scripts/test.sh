#!/usr/bin/env bash
# Every test tier (unit, client, end-to-end against a real tritonserver) in the project's venv.
# Extra arguments go to pytest, e.g.  scripts/test.sh tests/unit -k contract
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
venv=${INTERNVL_VENV:-$root/.venv}
export PYTHONUNBUFFERED=1
# -ra: say why anything was skipped; --durations: show the slow ones; per-test timeouts: pyproject.toml
exec "$venv/bin/python" -m pytest -q -ra --durations=10 "$@"
