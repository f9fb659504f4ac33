"""Hardening of the deployment: how weights are read, limits checked when the model loads, where the
server listens, Triton's admin APIs behind a key, and the launcher's watchdog for dead Python stubs
(the CLI exits 3 so that a supervisor restarts it). Servers here are small throw-away repositories
(an echo model, or the preprocess model alone) that load in seconds."""
from __future__ import annotations

import ast
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from robustness_helpers import make_echo_repository
from internvl_serve.serving.launcher import (ADMIN_GRPC_HEADER, ADMIN_HEADER, DEFAULT_MODEL_REPOSITORY, LaunchError, TritonServer,
                                             free_port, python_stubs, shm_regions)

REPO_ROOT = Path(__file__).resolve().parents[2]

# ---- weights and remote code -------------------------------------------------------------------------------


def served_python_files() -> list[Path]:
    """Every Python file that can run in the deployment or its tools (tests and the venv excluded)."""
    skip = {".venv", "tests", ".git", "node_modules", "build", "checkpoints"}
    return [p for p in REPO_ROOT.rglob("*.py") if not skip & set(p.relative_to(REPO_ROOT).parts)]


def unsafe_calls(path: Path, root: Path = REPO_ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{path.relative_to(root)}:{node.lineno}"

        def is_true(key):
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        if (name.endswith("torch.load") and not name.startswith("safetensors")) or (
                name == "load" and "weights_only" in keywords):
            if not is_true("weights_only"):
                found.append(f"{where}: {name}() without weights_only=True")
        if is_true("trust_remote_code"):
            found.append(f"{where}: {name}(trust_remote_code=True)")
        if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load"):
            found.append(f"{where}: {name}() unpickles")
        if name.endswith(("np.load", "numpy.load")) and is_true("allow_pickle"):
            found.append(f"{where}: {name}(allow_pickle=True)")
    return found


def test_weights_are_read_without_unpickling_code_and_no_remote_code_runs():
    files = served_python_files()
    assert any(p.name == "checkpoint.py" for p in files) and len(files) > 20
    problems = [problem for path in files for problem in unsafe_calls(path)]
    assert not problems, "\n".join(problems)
    loads = [p for p in files if "torch.load(" in p.read_text(encoding="utf-8")]
    assert loads, "the checker found no torch.load at all: is it still looking at the package?"


def test_the_checker_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle, numpy as np\nfrom transformers import AutoModel\n"
                   "torch.load('x.bin')\ntorch.load('y.bin', weights_only=False)\n"
                   "AutoModel.from_pretrained('m', trust_remote_code=True)\npickle.loads(b'')\n"
                   "np.load('z.npy', allow_pickle=True)\ntorch.load('ok.bin', weights_only=True, mmap=True)\n")
    problems = unsafe_calls(bad, tmp_path)
    assert len(problems) == 5, problems
    assert "bad.py:3" in problems[0] and "trust_remote_code" in problems[2]


# ---- limits checked when the model loads ----------------------------------------------------------------------


def test_a_bad_limit_fails_the_load_naming_the_parameter(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / "preprocess", repo / "preprocess",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / "preprocess" / "config.pbtxt"
    config.write_text(config.read_text().replace('"max_images" value: { string_value: "12" }',
                                                 '"max_images" value: { string_value: "-3" }'))
    server = TritonServer(tiny_checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                          ready_timeout_s=120)
    with pytest.raises(LaunchError, match=r"(?s)before it was ready.*parameter 'max_images' must be a positive "
                                          r"integer, got '-3'"):
        server.start()
    assert not server.is_running()


# ---- a throw-away server: an echo model ---------------------------------------------------------------------

@pytest.fixture
def echo(tmp_path):
    """(model repository, checkpoint folder) of an echo model that loads in a second."""
    return make_echo_repository(tmp_path)


def listening(port: int) -> set[str]:
    """Where a TCP socket listens on `port` (from /proc/net/tcp and tcp6): IPv4 addresses, IPv4-mapped
    IPv6 ones as IPv4, and "any" for 0.0.0.0 and :: (every interface)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                hex_address, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(raw)
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                found.add("any" if address.is_unspecified else str(address))
    return found


@pytest.mark.parametrize("host, expected", [("127.0.0.1", {"127.0.0.1"}), ("0.0.0.0", {"any"})])
def test_the_server_listens_only_where_configured(echo, tmp_path, host, expected):
    repo, checkpoint = echo
    with TritonServer(checkpoint, model_repository=repo, host=host, log_file=tmp_path / "log",
                      exit_timeout_s=2) as server:
        for kind in ("grpc", "http", "metrics"):
            assert listening(server.ports[kind]) == expected, (kind, listening(server.ports[kind]))


def test_admin_apis_need_the_admin_key(echo, tmp_path):
    repo, checkpoint = echo
    key = "k" * 8 + "-test-admin-key"
    with TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                      admin_key=key) as server:
        url = server.http_url
        # the chat's APIs stay open
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        assert requests.get(f"{url}/v2/models/echo/stats", timeout=10).status_code == 200
        # the admin ones answer 403 without the key, and work with it
        for method, path in (("post", "/v2/logging"), ("get", "/v2/systemsharedmemory/status"),
                             ("post", "/v2/repository/index"), ("get", "/v2/trace/setting")):
            denied = getattr(requests, method)(f"{url}{path}", json={}, timeout=10)
            assert denied.status_code == 403, (path, denied.status_code, denied.text)
            allowed = getattr(requests, method)(f"{url}{path}", json={}, headers={ADMIN_HEADER: key}, timeout=10)
            assert allowed.status_code == 200, (path, allowed.status_code, allowed.text)
        assert requests.post(f"{url}/v2/logging", json={"log_verbose_level": 1}, timeout=10).status_code == 403
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert client.is_server_ready()
            with pytest.raises(InferenceServerException, match="(?i)permission|restricted|denied"):
                client.register_system_shared_memory("region", "/triton_python_backend_shm_region_x", 64)
            with pytest.raises(InferenceServerException, match="(?i)permission|restricted|denied"):
                client.update_log_settings({"log_verbose_level": 1})
            assert client.get_system_shared_memory_status(headers={ADMIN_GRPC_HEADER: key}) is not None
        finally:
            client.close()


def test_a_random_admin_key_by_default(echo, tmp_path):
    repo, checkpoint = echo
    first, second = TritonServer(checkpoint, model_repository=repo), TritonServer(checkpoint, model_repository=repo)
    assert first.admin_key != second.admin_key and len(first.admin_key) >= 24
    with pytest.raises(LaunchError, match="admin key"):
        TritonServer(checkpoint, admin_key="short")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError):
                pass
    return out


def test_the_cli_exits_3_when_a_stub_dies(echo, tmp_path):
    repo, checkpoint = echo
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_serve.serving.launcher", "--checkpoint", str(checkpoint),
         "--model-repository", str(repo), "--grpc-port", str(free_port()), "--http-port", str(free_port()),
         "--metrics-port", str(free_port()), "--exit-timeout-secs", "2", "--kill-grace-secs", "3",
         "--log-file", str(tmp_path / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    launched = []
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and "launcher: ready" in proc.stdout.readline(), proc.stderr.read() if proc.poll() else ""
        launched[:] = children(proc.pid)  # tritonserver and the gRPC and HTTP guards
        servers = [pid for pid in launched if Path(open(f"/proc/{pid}/cmdline").read().split("\0")[0]).name == "tritonserver"]
        assert len(servers) == 1 and len(launched) == 3, launched
        stubs = python_stubs(servers[0])
        assert list(stubs.values()) == ["echo_0_0"], stubs
        regions = shm_regions([servers[0], *stubs])
        assert regions
        os.kill(next(iter(stubs)), signal.SIGKILL)
        assert proc.wait(timeout=60) == 3
        assert "the Python stub of model instance(s) echo_0_0 died" in proc.stderr.read()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in launched)  # stopped and reaped, the guard too
        assert not any(os.path.exists(r) for r in regions)  # and no shared memory is left in /dev/shm
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in launched:  # each in a session of its own: a failed assertion must not leave them running
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_the_watchdog_stops_the_server_when_a_guard_dies(echo, tmp_path, kind):
    """Without its guard a public port is closed while tritonserver runs on: stop, for a restart."""
    repo, checkpoint = echo
    with TritonServer(checkpoint, model_repository=repo, log_file=tmp_path / "log", exit_timeout_s=2,
                      on_stub_death="exit") as server:
        assert requests.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200
        server._guards[kind].kill()
        server.wait()  # the watchdog stopped tritonserver
        assert server.stub_failure == {"grpc": "the gRPC guard", "http": "the HTTP guard"}[kind]
