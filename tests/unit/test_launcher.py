"""The launcher's Triton-free parts: the backend folder it prepares, the environment it sets, ports."""
import os
import socket
import sys
import sysconfig
from pathlib import Path

import pytest

from internvl_serve.serving import launcher, processes, triton_install
from internvl_serve.serving.launcher import LaunchError, TritonServer


def test_find_triton_uses_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_install, "_default_cache", lambda: tmp_path)
    install = launcher.find_triton()
    assert install.server.name == "tritonserver" and os.access(install.server, os.X_OK)
    python = install.backends / "python"
    assert {p.name for p in python.iterdir()} >= {"libtriton_python.so", "triton_python_backend_utils.py",
                                                 "triton_python_backend_stub"}
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
    assert any(d.name == "nvidia_pytriton.libs" for d in install.library_dirs)


def test_backend_folder_is_prepared_once(tmp_path):
    wheel = launcher.find_triton().server.parents[1]  # .../pytriton/tritonserver
    first = triton_install.prepare_backend_directory(wheel, tmp_path)
    stub = first / "python" / "triton_python_backend_stub"
    mtime = stub.stat().st_mtime_ns
    second = triton_install.prepare_backend_directory(wheel, tmp_path)
    assert second == first and stub.stat().st_mtime_ns == mtime
    assert f"py{sys.version_info.major}.{sys.version_info.minor}" in first.name
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folders left behind


def test_backend_folder_needs_the_stub_for_this_python(tmp_path):
    fake = tmp_path / "wheel"
    (fake / "backends" / "python").mkdir(parents=True)
    with pytest.raises(LaunchError, match="lacks"):
        triton_install.prepare_backend_directory(fake, tmp_path / "cache")


def test_server_environment(tmp_path):
    install = launcher.TritonInstall(server=Path("/bin/true"), backends=tmp_path,
                                     library_dirs=(Path(sysconfig.get_config_var("LIBDIR")),))
    env = launcher.server_environment(install, tmp_path, base={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [sysconfig.get_config_var("LIBDIR"), "/x"]
    assert env["INTERNVL_CHECKPOINT"] == str(tmp_path)
    assert "MALLOC_MMAP_THRESHOLD_" not in env  # glibc's default unless asked (serving/heap.py)
    env = launcher.server_environment(install, tmp_path, base={}, malloc_mmap_threshold=1 << 20)
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    env = launcher.server_environment(install, tmp_path, base={"MALLOC_MMAP_THRESHOLD_": "4194304"},
                                      malloc_mmap_threshold=1 << 20)
    assert env["MALLOC_MMAP_THRESHOLD_"] == "4194304"  # the operator's own value stays
    assert launcher.parse_args([]).malloc_mmap_threshold == 0
    assert launcher.parse_args(["--malloc-mmap-threshold", "2097152"]).malloc_mmap_threshold == 2097152


def test_free_port_is_bindable():
    port = launcher.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_command_has_the_production_flags(tmp_path):
    server = TritonServer(tmp_path, host="0.0.0.0", grpc_port=1, http_port=2, metrics_port=3, exit_timeout_s=7)
    server.ports = {"grpc": 1, "http": 2, "metrics": 3, "triton_grpc": 5, "triton_http": 4}
    cmd = server.command(launcher.TritonInstall(Path("/bin/tritonserver"), tmp_path, ()))
    for flag in ("--model-control-mode=none", "--disable-auto-complete-config", "--strict-readiness=true",
                 "--exit-timeout-secs=7", "--metrics-address=0.0.0.0", "--metrics-port=3",
                 f"--backend-directory={tmp_path}",
                 # tritonserver's own gRPC and HTTP: loopback, behind the guards on the public ports
                 "--grpc-address=127.0.0.1", "--grpc-port=5", "--http-address=127.0.0.1", "--http-port=4"):
        assert flag in cmd
    assert server.grpc_url == "127.0.0.1:1" and server.http_url == "http://127.0.0.1:2"
    assert server.triton_grpc_url == "127.0.0.1:5" and server.triton_http_url == "http://127.0.0.1:4"
    guards = server._guard_commands()
    assert guards["grpc"][guards["grpc"].index("--listen") + 1] == "0.0.0.0:1"
    assert guards["grpc"][guards["grpc"].index("--upstream") + 1] == "127.0.0.1:5"
    assert "--expose-all-models" not in guards["grpc"]
    assert guards["http"][guards["http"].index("--port") + 1] == "2"


def test_start_refuses_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(LaunchError, match="not a checkpoint folder"):
        TritonServer(tmp_path).start()


def test_command_has_the_hardening_flags(tmp_path):
    server = TritonServer(tmp_path, admin_key="a-key-of-16-chars-or-more")
    server.ports = {"grpc": 1, "http": 2, "metrics": 3, "triton_grpc": 5, "triton_http": 4}
    cmd = server.command(launcher.TritonInstall(Path("/bin/tritonserver"), tmp_path, ()))
    apis = ",".join(launcher.ADMIN_APIS)
    assert f"--http-restricted-api={apis}:admin-key=a-key-of-16-chars-or-more" in cmd
    assert f"--grpc-restricted-protocol={apis}:admin-key=a-key-of-16-chars-or-more" in cmd
    assert "--allow-sagemaker=false" in cmd and "--allow-vertex-ai=false" in cmd
    assert set(launcher.ADMIN_APIS) == {"model-repository", "shared-memory", "logging", "trace"}
    assert "inference" not in apis and "health" not in apis and "statistics" not in apis


def test_hardening_arguments_are_checked(tmp_path):
    assert TritonServer(tmp_path).admin_key != TritonServer(tmp_path).admin_key  # random: the APIs are closed
    with pytest.raises(LaunchError, match="admin key"):
        TritonServer(tmp_path, admin_key="has:colon-and=sign-in-it")
    with pytest.raises(LaunchError, match="on_stub_death"):
        TritonServer(tmp_path, on_stub_death="restart")
    assert TritonServer(tmp_path).on_stub_death == "ignore"  # the API: tests observe Triton as it is


def test_cli_hardening_defaults(monkeypatch):
    monkeypatch.delenv(launcher.ADMIN_KEY_ENV, raising=False)
    args = launcher.parse_args([])
    assert (args.admin_key, args.on_stub_death, args.kill_grace_secs) == (None, "exit", 15.0)
    monkeypatch.setenv(launcher.ADMIN_KEY_ENV, "from-the-environment-123")
    assert launcher.parse_args([]).admin_key == "from-the-environment-123"
    assert launcher.parse_args(["--on-stub-death", "ignore"]).on_stub_death == "ignore"
    assert args.http_models == "internvl_chat,internvl_chat_bls"  # production: inference on the chat models only
    assert TritonServer(Path("x")).http_models == ("internvl_chat", "internvl_chat_bls")


def test_port_checks_see_who_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert processes.port_owner(os.getpid(), port) == "none"
        s.listen()
        assert processes.port_in_use("127.0.0.1", port) and processes.port_in_use("0.0.0.0", port)
        assert processes.port_owner(os.getpid(), port) == "mine"
        assert processes.port_owner(1, port) == "other"
    assert not processes.port_in_use("127.0.0.1", port)


def test_python_stubs_are_the_live_stub_children_of_the_server(tmp_path):
    import signal
    import subprocess
    import time

    # a Python process whose argv looks like a stub's: argv[0] the stub, argv[8] the instance name
    argv = [str(tmp_path / processes.STUB_NAME), "-c", "import time; time.sleep(60)", "1", "1", str(os.getpid()),
            "/backends", "336", "fake_0_1", "DEFAULT"]
    proc = subprocess.Popen(argv, executable=sys.executable)
    other = subprocess.Popen(["/bin/sleep", "60"])  # a child that is not a stub
    try:
        assert launcher.python_stubs(os.getpid()) == {proc.pid: "fake_0_1"}
        assert launcher.python_stubs(proc.pid) == {}
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline  # becoming a zombie (not reaped yet)
            time.sleep(0.01)
        assert launcher.python_stubs(os.getpid()) == {}  # a dead, unreaped stub does not count
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


def test_every_launcher_flag_has_help(monkeypatch):
    """`python -m internvl_serve.serving.launcher --help` explains every flag (before: the ports,
    --model-repository and --log-verbose had no help)."""
    parsers = []

    def capture(self, argv=None, namespace=None):
        parsers.append(self)
        return namespace

    monkeypatch.setattr(launcher.argparse.ArgumentParser, "parse_args", capture)
    launcher.parse_args([])
    (parser,) = parsers
    actions = [a for a in parser._actions if a.dest != "help"]
    assert len(actions) > 10
    missing = [a.option_strings[0] for a in actions if not (a.help or "").strip()]
    assert not missing, f"flags without help: {missing}"
