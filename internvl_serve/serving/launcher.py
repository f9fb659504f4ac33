"""Start the real Triton Inference Server (the binary inside the `nvidia-pytriton` wheel) on
`model_repository/`, with the gRPC and HTTP guards (serving/grpc_guard.py, http_guard.py) on the public ports.

This module is the command line. Owns: the CLI's arguments and their defaults, turning them into a `TritonServer` (a GPU layout, the tiny
checkpoint when none is given), the signals (first: graceful stop; second: kill) and the exit codes.
Does not own: the server and guard processes, their ports, readiness, hardening and clean-up
(triton_server.py; `TritonServer` and its constants are importable from here too), finding the binary
(serving/triton_install.py), /proc reading (serving/processes.py), the models, any client.

CLI:  python -m internvl_serve.serving.launcher [--checkpoint DIR] [--host 127.0.0.1] [--grpc-port 8001]
      [--http-port 8000] [--metrics-port 8002] [--log-verbose N] [--model-repository DIR]
      [--admin-key KEY] [--on-stub-death exit|ignore] [--kill-grace-secs 15]   (exit code 3: a stub died)
      [--http-models internvl_chat,internvl_chat_bls] [--max-http-body-bytes N] [--expose-all-models]
API:  with TritonServer(checkpoint=..., grpc_port=None) as server: server.grpc_url ...  (triton_server.py)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from internvl_serve.serving.http_guard import DEFAULT_MAX_BODY_BYTES, DEFAULT_MODELS
from internvl_serve.serving.processes import (  # noqa: F401  (free_port, shm_regions: part of this API)
    free_port, free_ports, python_stubs, shm_regions)
from internvl_serve.serving.triton_install import (  # noqa: F401  (LaunchError, TritonInstall: part of this API)
    LaunchError, TritonInstall, find_triton, server_environment)
from internvl_serve.serving.triton_server import (  # noqa: F401  (part of this API)
    ADMIN_APIS, ADMIN_GRPC_HEADER, ADMIN_HEADER, ADMIN_KEY_ENV, DEFAULT_MODEL_REPOSITORY, REPO_ROOT, PortInUse,
    TritonServer)

DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "tiny"


def ensure_default_checkpoint(path: Path = DEFAULT_CHECKPOINT) -> Path:
    """checkpoints/tiny, made with make_tiny_checkpoint when missing or incomplete (it is idempotent
    and writes atomically)."""
    from internvl_serve.tiny import make_tiny_checkpoint

    if not (path / "config.json").is_file():
        print(f"launcher: making the tiny checkpoint at {path}", file=sys.stderr)
    return make_tiny_checkpoint(path, fmt="bin", seed=0)


def layout_from_args(args: argparse.Namespace):
    from internvl_serve.serving.layout import Layout, parse_key_values
    try:
        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
        return Layout(gpus=gpus, tensor_parallel_size=args.tensor_parallel_size,
                      llm_parameters=parse_key_values(args.llm_param),
                      vision_parameters=parse_key_values(args.vision_param),
                      preprocess_instances=args.preprocess_instances,
                      vision_max_batch_size=args.vision_max_batch_size).validate()
    except ValueError as e:
        raise LaunchError(f"layout: {e}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m internvl_serve.serving.launcher", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint folder (default: {DEFAULT_CHECKPOINT.relative_to(REPO_ROOT)}, made if missing)")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY,
                   help=f"the Triton model repository (default: {DEFAULT_MODEL_REPOSITORY.relative_to(REPO_ROOT)})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--grpc-port", type=int, default=8001, help="public gRPC port, served by the gRPC guard")
    p.add_argument("--http-port", type=int, default=8000, help="public HTTP port, served by the HTTP guard")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (GET /metrics)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level (0: off)")
    p.add_argument("--log-file", type=Path, default=None, help="server log (default: a temporary file)")
    p.add_argument("--exit-timeout-secs", type=int, default=30, help="grace time for in-flight requests on stop")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the models to load")
    p.add_argument("--tritonserver", type=Path, default=None, help="a tritonserver binary (default: the wheel's)")
    p.add_argument("--gpus", default="", help="GPUs to serve on, e.g. 0,1: one vision and one llm instance "
                   "per GPU (data parallel), or with --tensor-parallel-size the GPUs of one split llm")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="split the LLM over this many GPUs")
    p.add_argument("--preprocess-instances", type=int, default=None, metavar="N",
                   help="processes decoding images (default: one per 4 available CPU cores, a container's limit "
                        "included, at most 8, and at least the repository's 2: serving/layout.py)")
    p.add_argument("--vision-max-batch-size", type=int, default=None, metavar="N",
                   help="requests (each with its image's tiles) the vision model encodes in one call at most "
                        "(default: 1 where it runs on a GPU in bf16, else the repository's 8: "
                        "serving/layout.py; fewer: the first images of a burst come out sooner, at some cost "
                        "per image with fp8)")
    p.add_argument("--llm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of model_repository/llm/config.pbtxt (repeatable)")
    p.add_argument("--vision-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of model_repository/vision/config.pbtxt (repeatable)")
    p.add_argument("--backend-directory", type=Path, default=None,
                   help="a backend folder with python/ for this Python (default: prepared from the wheel)")
    p.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_ENV) or None,
                   help=f"opens Triton's {', '.join(ADMIN_APIS)} APIs to requests with the header "
                        f"'{ADMIN_HEADER}: KEY' (default ${ADMIN_KEY_ENV}; unset: a random key, so they are closed)")
    p.add_argument("--on-stub-death", choices=("exit", "ignore"), default="exit",
                   help="when a model's Python stub dies (Triton 2.51 never restarts it): stop the server and "
                        "exit with code 3 so the supervisor restarts it (default), or leave it")
    p.add_argument("--kill-grace-secs", type=float, default=15.0,
                   help="kill tritonserver this long after --exit-timeout-secs if it has not exited")
    p.add_argument("--http-models", default=",".join(DEFAULT_MODELS),
                   help="models whose HTTP inference endpoints the HTTP guard opens (comma-separated; "
                        "default: the chat models only)")
    p.add_argument("--max-http-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="the HTTP guard refuses larger request bodies (413)")
    p.add_argument("--expose-all-models", action="store_true",
                   help="the gRPC guard serves every model, the steps (preprocess, vision, llm) too (debugging; "
                        "default: internvl_chat, internvl_chat_bls and the llm's cancellation requests)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="every server process (tritonserver too) mmaps host allocations from this size on, "
                        "given back when freed (default 0: glibc's adaptive threshold; the preprocess stubs, "
                        "and vision and llm on a GPU, fix 1 MiB themselves: serving/heap.py)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = args.checkpoint or ensure_default_checkpoint()
        layout = layout_from_args(args)
        server = TritonServer(checkpoint, model_repository=args.model_repository, host=args.host, layout=layout,
                              grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                              log_verbose=args.log_verbose, log_file=args.log_file,
                              exit_timeout_s=args.exit_timeout_secs, ready_timeout_s=args.ready_timeout,
                              tritonserver=args.tritonserver, backend_directory=args.backend_directory,
                              admin_key=args.admin_key, on_stub_death=args.on_stub_death,
                              kill_grace_s=args.kill_grace_secs, malloc_mmap_threshold=args.malloc_mmap_threshold,
                              http_models=tuple(m for m in args.http_models.split(",") if m),
                              max_http_body_bytes=args.max_http_body_bytes,
                              expose_all_models=args.expose_all_models,
                              progress=lambda line: print(f"launcher: {line}", file=sys.stderr, flush=True))
    except LaunchError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 2
    stopping = []

    def on_signal(signum, frame):  # first signal: graceful stop; second: kill
        if stopping and server.pid:
            os.killpg(server.pid, signal.SIGKILL)  # (the main thread's stop() reaps what is left)
        stopping.append(signum)
        server.shutdown()  # SIGTERM, and SIGKILL if tritonserver hangs on its way out

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"launcher: starting tritonserver on {checkpoint} (log: {server.log_file or 'a temporary file'})",
          file=sys.stderr, flush=True)
    try:
        server.start()
    except LaunchError as e:
        print(f"launcher: {e}", file=sys.stderr)
        server.stop()
        return 0 if stopping else 1
    print(f"launcher: ready. gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}\n"
          f"launcher: model 'internvl_chat' (streaming over gRPC, or POST {server.http_url}"
          f"/v2/models/internvl_chat/generate_stream); server log {server.log_file}; Ctrl-C stops",
          flush=True)
    code = server.wait()
    if server.stub_failure and not stopping:
        what = (server.stub_failure if server.stub_failure.endswith(" guard")
                else f"the Python stub of {server.stub_failure}")
        print(f"launcher: stopped the server because {what} died; exit 3 "
              f"(restart it)", file=sys.stderr)
        server.stop()
        return 3
    if not stopping:
        print(f"launcher: tritonserver exited by itself (code {code}); last log lines:\n{server.log_tail()}",
              file=sys.stderr)
    server.stop()
    return 0 if stopping and code in (0, -signal.SIGTERM) else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
