#!/usr/bin/env bash
# Builds .carry/ (git-ignored) for a lent GPU machine (the `device` tool): ../shared/device/make-carry.sh's
# Triton server and wheels, plus what this project's server and benchmarks need there beyond them: the
# HTTP guard's uvicorn and starlette with their own needs (the launcher stops if a guard cannot start),
# and py-spy to sample the llm stub's threads. Run here, from the repository root:
#   bash scripts/dev/device_carry.sh          # ~48 MB (no decord: video is not benchmarked)
# then pass carry [".carry"] to each device run and begin its command with
#   source scripts/dev/device_env.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
NO_DECORD=${NO_DECORD:-1} bash "$root/../shared/device/make-carry.sh"
# uvicorn as requirements-serve.txt pins it; the rest as this project's venv resolved them (2026-12-06)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .carry/whl \
  uvicorn==0.54.0 h11==0.16.0 click==8.5.1 starlette==1.10.0 anyio==4.16.0 sniffio==1.3.1 idna==3.21 \
  py-spy==0.4.3
du -sh .carry
