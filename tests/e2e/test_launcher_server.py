"""The launcher against the real tritonserver, on small throw-away model repositories (fast to load):
fail fast when a model cannot load, notice a server that died, and the CLI's start / Ctrl-C / exit."""
from __future__ import annotations

import os
import socket
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from e2e_client import make_echo_repository as make_repository
from internvl_serve.serving.launcher import LaunchError, PortInUse, TritonServer, free_port, shm_regions
from internvl_serve.serving.processes import python_stubs

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
    told = []
    with TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                      malloc_mmap_threshold=2 << 20, progress=told.append) as server:
        assert told == ["loading models: echo ready"]  # (the CLI prints these; the API is quiet without it)
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
    shutil.copytree(repo / "echo", repo / "echo2")  # a second model, to see the loading progress change
    config = repo / "echo2" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "echo"', 'name: "echo2"'))
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
        # while the models loaded (before "ready"): which of them were ready, once per change, the last
        # line with both (before: nothing between "starting" and "ready")
        lines = [l for l in proc.stderr.read().splitlines() if l.startswith("launcher: loading models: ")]
        assert len(lines) in (1, 2), lines  # each model's load logged once: one or two changes
        assert lines[-1] == "launcher: loading models: echo ready, echo2 ready", lines
        if len(lines) == 2:
            assert lines[0] in ("launcher: loading models: echo ready, echo2 loading...",
                                "launcher: loading models: echo loading..., echo2 ready"), lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_second_launcher_on_taken_ports_says_address_in_use_and_never_ready(tmp_path):
    """Before: the second launcher's readiness probe reached the first server, so it printed "ready" and
    only then reported that its own tritonserver had exited (address in use)."""
    repo, checkpoint = make_repository(tmp_path)
    with TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "first.log", exit_timeout_s=2) as first:
        argv = [sys.executable, "-m", "internvl_serve.serving.launcher", "--checkpoint", str(checkpoint),
                "--model-repository", str(repo), "--exit-timeout-secs", "2", "--log-file", str(tmp_path / "second.log")]
        for kind in ("grpc", "http", "metrics"):
            argv += [f"--{kind}-port", str(first.ports[kind])]
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert "launcher: ready" not in second.stdout
        assert "address already in use" in second.stderr, second.stderr
        # one taken port is enough, and the API says so too
        other = TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "third.log", exit_timeout_s=2,
                             metrics_port=first.ports["metrics"])
        with pytest.raises(PortInUse, match=rf"metrics port {first.ports['metrics']} .*held by another process"):
            other.start()
        assert not other.is_running()
        assert first.is_running()
        assert requests.get(f"{first.http_url}/v2/health/ready", timeout=10).status_code == 200


def test_a_picked_port_taken_before_its_guard_binds_it_is_picked_again(tmp_path, monkeypatch):
    """The public ports are picked free at start and bound by the guards only once tritonserver is ready;
    another process may listen on one meanwhile (seen once in CI: 'grpc port ... held by another
    process'). A port the launcher picked is picked again; a port the caller gave stays an error (the
    test above)."""
    from internvl_serve.serving import triton_server

    repo, checkpoint = make_repository(tmp_path)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real, picks = triton_server.free_ports, []

    def first_pick_collides(hosts):
        ports = real(hosts)
        if not picks:
            ports["grpc"] = taken  # as if another process took it between the pick and the guard's bind
        picks.append(ports)
        return ports

    monkeypatch.setattr(triton_server, "free_ports", first_pick_collides)
    try:
        with TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                          ready_timeout_s=120) as server:
            assert len(picks) == 2 and server.ports["grpc"] == picks[1]["grpc"] != taken
            assert requests.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        squatter.close()


def test_free_ports_are_all_different():
    from internvl_serve.serving.processes import free_ports

    ports = free_ports({f"k{i}": "127.0.0.1" for i in range(64)})
    assert len(set(ports.values())) == 64


def test_a_server_that_dies_before_it_is_ready_leaves_no_shared_memory(tmp_path):
    """tritonserver killed (OOM killer, SIGKILL) while a model loads: its stub has mapped its region, which
    stays in /dev/shm (tmpfs, RAM) for good unless the launcher removes it (before: it did so only for a
    server that had been ready)."""
    go = tmp_path / "go"
    repo, checkpoint = make_repository(
        tmp_path, initialize=f'exec("import pathlib, time\\nwhile not pathlib.Path({str(go)!r}).exists(): '
                             f'time.sleep(0.05)")')
    server = TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                          ready_timeout_s=120)
    failure = []
    starter = threading.Thread(target=lambda: failure.append(pytest.raises(LaunchError, server.start)))
    starter.start()
    try:
        deadline = time.monotonic() + 120
        regions = set()
        while not (regions and regions <= server.shm_regions):  # the stub waits in initialize(), its
            # region noted by the launcher (it polls /proc while the models load)
            assert time.monotonic() < deadline, f"stub regions {regions}, noted {server.shm_regions}"
            pid = server.pid
            regions = shm_regions(python_stubs(pid)) if pid else set()
            time.sleep(0.05)  # polling /proc, not synchronising
        assert all(os.path.exists(r) for r in regions)
        os.kill(pid, signal.SIGKILL)
    finally:
        go.write_text("")
        starter.join(120)
    assert failure and "exited (code -9) before it was ready" in str(failure[0].value)
    assert not any(os.path.exists(r) for r in regions), regions
