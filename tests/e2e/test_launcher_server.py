"""The launcher against the real tritonserver, on small throw-away model repositories (fast to load):
fail fast when a model cannot load, notice a server that died, and the CLI's start / Ctrl-C / exit."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import requests

from e2e_client import make_echo_repository as make_repository
from internvl_serve.serving.launcher import LaunchError, TritonServer, free_port, shm_regions

def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_model_that_fails_to_load_fails_the_start_fast_with_the_log(tmp_path):
    repo, checkpoint = make_repository(tmp_path, initialize='raise RuntimeError("boom-7f3a")')
    server = TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                          ready_timeout_s=120)
    # "exited before it was ready": the launcher saw the exit, it did not wait out ready_timeout_s
    with pytest.raises(LaunchError, match=r"(?s)exited \(code 1\) before it was ready.*boom-7f3a"):
        server.start()
    assert not server.is_running()


def test_a_server_that_dies_is_noticed_and_its_group_cleaned_up(tmp_path):
    repo, checkpoint = make_repository(tmp_path)
    with TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                      malloc_mmap_threshold=2 << 20) as server:
        pgid = server.pid
        assert requests.get(f"{server.http_url}/v2/models/echo/ready", timeout=10).status_code == 200
        for pid in server.stub_processes():  # the stub has the server's environment, the malloc setting too
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"MALLOC_MMAP_THRESHOLD_=2097152" in f.read().split(b"\0")
        regions = shm_regions([server.pid, *server.stub_processes()])
        assert regions and regions == server.shm_regions and all(os.path.exists(r) for r in regions)
        os.kill(server.pid, signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        assert not server.is_running()
        assert all(os.path.exists(r) for r in regions)  # a killed tritonserver leaves them in /dev/shm ...
    assert not group_alive(pgid)  # the Python stub went with it
    assert not any(os.path.exists(r) for r in regions)  # ... and stop() removed them


def read_line_until(proc, marker: str, timeout_s: float) -> str:
    """stdout lines of `proc` until one holds `marker` (select() with a deadline: never hangs)."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if marker in line:
                return line
        elif proc.poll() is not None:
            break
    pytest.fail(f"no {marker!r} from the launcher; stdout: {''.join(seen)}; stderr: "
                f"{proc.stderr.read() if proc.poll() is not None else '(running)'}")


def test_cli_starts_prints_where_to_connect_and_stops_on_sigint(tmp_path):
    repo, checkpoint = make_repository(tmp_path)
    grpc, http, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_serve.serving.launcher", "--checkpoint", str(checkpoint),
         "--model-repository", str(repo), "--grpc-port", str(grpc), "--http-port", str(http),
         "--metrics-port", str(metrics), "--exit-timeout-secs", "2", "--log-file", str(tmp_path / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = read_line_until(proc, "launcher: ready", 120)
        assert f"gRPC 127.0.0.1:{grpc}" in line and f"HTTP http://127.0.0.1:{http}" in line
        assert requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
