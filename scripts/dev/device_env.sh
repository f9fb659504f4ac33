# Sourced at the start of a device command, from the repository root, after scripts/dev/device_carry.sh
# made .carry/ here: the carried Triton server and wheels (.carry/bootstrap.sh: a venv at /tmp/venv,
# TRITONSERVER, TRITON_BACKENDS), and the client SDK importable there (the benchmarks' load generator
# imports internvl_client). The device's copy of the repository has this session's files but not its
# git history: set BENCH_COMMIT=<the commit you ran> for the results' headers.
source .carry/bootstrap.sh
echo "$PWD/client" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/internvl-client.pth"
python3 -c 'import internvl_client, uvicorn, starlette' || echo "device_env: the server's HTTP guard or the client will not import"
