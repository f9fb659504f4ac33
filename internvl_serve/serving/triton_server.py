"""tritonserver and the guards on its public ports as child processes: `TritonServer`.

Owns: the server's command line (production flags); its ports (an explicit port already held fails the
start; readiness is of THIS server: it must listen on its ports itself; ports it picked that another
process takes first are picked again); waiting for readiness (failing fast, with the log's tail, if the
server dies; the models' loading progress told on the way: server_log.LoadingProgress); starting the
guards (serving/grpc_guard.py, http_guard.py) in front of tritonserver's own gRPC and HTTP front ends
(bound to 127.0.0.1; docs/security.md); stopping all of them (SIGTERM, then SIGKILL of the process
groups, also when tritonserver hangs on its way out) and removing the shared memory a dead server left;
the vision and llm models' encoder-activity record (serving/encoder_activity.py: made at start, removed
at stop); hardening (admin APIs behind a key, a watchdog for dead Python stubs and guards:
docs/serving.md "Hardening and limits"). Does not own: the command-line interface (launcher.py), reading the log back
(server_log.py), finding the binary and its environment (serving/triton_install.py), /proc reading
(serving/processes.py), the checks the guards make, the models, any client.

API:  with TritonServer(checkpoint=..., grpc_port=None) as server: server.grpc_url ...  (None: a free port;
      server.triton_grpc_url / triton_http_url: tritonserver itself, every model, 127.0.0.1 only)
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from internvl_serve.serving.encoder_activity import ENCODER_ACTIVITY_ENV, create_record
from internvl_serve.serving.http_guard import DEFAULT_MAX_BODY_BYTES, DEFAULT_MODELS
from internvl_serve.serving.processes import (free_ports, kill_group, port_in_use, port_owner, python_stubs,
                                              remove_shm_regions, shm_regions)
from internvl_serve.serving.server_log import LoadingProgress, log_tail
from internvl_serve.serving.triton_install import LaunchError, TritonInstall, find_triton, server_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
# Triton APIs a client of the chat never needs and an attacker could misuse (register shared memory the
# server then reads and writes, turn on verbose logs or traces, list the repository): only requests with
# the header ADMIN_HEADER: <admin key> may call them.
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace")
ADMIN_HEADER = "admin-key"  # HTTP; gRPC metadata key: ADMIN_GRPC_HEADER (Triton adds its prefix)
ADMIN_GRPC_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_KEY_ENV = "INTERNVL_ADMIN_KEY"
GUARD_NAMES = {"grpc": "gRPC", "http": "HTTP"}  # the public ports' guards (docs/security.md)


class PortInUse(LaunchError):
    """Another process listens on one of the server's ports (`kinds`: which, where known)."""

    def __init__(self, message: str, kinds: tuple[str, ...] = ()):
        super().__init__(message)
        self.kinds = tuple(kinds)


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class TritonServer:
    """tritonserver as a child process: start() waits until ready, stop() always cleans up.

    Ports given as None are picked free at start (and picked again if the server loses a race for one).
    """

    def __init__(self, checkpoint: str | Path, *, model_repository: str | Path = DEFAULT_MODEL_REPOSITORY,
                 host: str = "127.0.0.1", grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None, log_verbose: int = 0, log_file: str | Path | None = None,
                 exit_timeout_s: int = 30, ready_timeout_s: float = 900.0,
                 tritonserver: str | Path | None = None, backend_directory: str | Path | None = None,
                 extra_args: tuple[str, ...] = (), layout=None, admin_key: str | None = None,
                 on_stub_death: str = "ignore", kill_grace_s: float = 15.0,
                 malloc_mmap_threshold: int | None = None, http_models: tuple[str, ...] = DEFAULT_MODELS,
                 max_http_body_bytes: int = DEFAULT_MAX_BODY_BYTES, expose_all_models: bool = False,
                 progress=None):
        self.checkpoint = Path(checkpoint).resolve()
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        # grpc, http: the public ports, served by the guards (serving/grpc_guard.py, serving/http_guard.py);
        # triton_grpc, triton_http: tritonserver's own front ends, on 127.0.0.1 only, always free ports
        self._ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port, "triton_grpc": None,
                       "triton_http": None}
        self.http_models = tuple(http_models)
        self.max_http_body_bytes = max_http_body_bytes
        self.expose_all_models = expose_all_models
        self._guards: dict[str, subprocess.Popen] = {}  # "grpc" / "http": the guard serving that public port
        self.ports: dict[str, int] = {}
        self.log_verbose = log_verbose
        self.log_file = Path(log_file) if log_file else None
        self.exit_timeout_s = exit_timeout_s
        self.ready_timeout_s = ready_timeout_s
        # progress(line): told which models are ready so far while they load, once per change (the CLI
        # prints it to stderr); None: quiet
        self.progress = progress
        self._install_args = (tritonserver, backend_directory)
        self.extra_args = tuple(extra_args)
        # a layout (serving/layout.py; None: the default one, which sizes preprocess to this machine's CPUs):
        # served from a derived copy of the repository, written at start, unless it changes nothing
        if layout is None:
            from internvl_serve.serving.layout import Layout
            layout = Layout()
        self.layout = None if layout.is_default else layout
        self._generated: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None
        # hardening. admin_key: the value of the ADMIN_HEADER header that opens ADMIN_APIS (None: a random
        # one, so they are closed). on_stub_death: "exit" stops the server when a Python stub dies
        # (Triton 2.51 neither restarts it nor marks its model unready). kill_grace_s: seconds after
        # exit_timeout_s before a server that has not exited is killed.
        if admin_key is not None and not re.fullmatch(r"[A-Za-z0-9_.~+/-]{16,}", admin_key):
            raise LaunchError("the admin key must be at least 16 characters of A-Z a-z 0-9 _ . ~ + / -")
        if on_stub_death not in ("ignore", "exit"):
            raise LaunchError(f"on_stub_death must be 'ignore' or 'exit', got {on_stub_death!r}")
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.on_stub_death = on_stub_death
        self.kill_grace_s = kill_grace_s
        self.malloc_mmap_threshold = malloc_mmap_threshold
        self.stub_failure: str | None = None  # the instance(s) whose stub died (or "the gRPC guard"...), when the watchdog acted
        self.shm_regions: set[str] = set()  # /dev/shm regions of the server's Python backend, removed at stop
        self.encoder_activity: Path | None = None  # made at start, removed at stop
        self._stopping = threading.Event()

    # -- addresses
    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['http']}"

    @property
    def triton_grpc_url(self) -> str:
        """tritonserver's own gRPC front end (127.0.0.1 only; every model, no guard)."""
        return f"127.0.0.1:{self.ports['triton_grpc']}"

    @property
    def triton_http_url(self) -> str:
        """tritonserver's own HTTP front end (127.0.0.1 only; every model, no guard)."""
        return f"http://127.0.0.1:{self.ports['triton_http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def guard_pid(self, kind: str) -> int | None:
        """The process of the guard serving the public `kind` port ("grpc" or "http"); None if not running."""
        guard = self._guards.get(kind)
        return guard.pid if guard is not None and guard.poll() is None else None

    def command(self, install: TritonInstall) -> list[str]:
        p = self.ports
        return [
            str(install.server),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backends}",
            "--model-control-mode=none",  # serve exactly the checked-in repository
            "--disable-auto-complete-config",  # configs are literal; nothing is filled in
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--grpc-address=127.0.0.1", f"--grpc-port={p['triton_grpc']}",  # public: the gRPC guard's port
            "--http-address=127.0.0.1", f"--http-port={p['triton_http']}",  # public: the HTTP guard's port
            "--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={p['metrics']}",
            # tensors cross to the Python stubs through shared memory: start big enough for a few images
            "--backend-config=python,shm-default-byte-size=33554432",
            "--backend-config=python,shm-growth-byte-size=33554432",
            f"--log-verbose={self.log_verbose}",
            # hardening: admin APIs only with the key; no SageMaker / Vertex AI frontends
            f"--http-restricted-api={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            "--allow-sagemaker=false", "--allow-vertex-ai=false",
            *self.extra_args,
        ]

    # -- life cycle
    def start(self) -> "TritonServer":
        if self._proc is not None:
            raise LaunchError("already started")
        if not (self.checkpoint / "config.json").is_file():
            raise LaunchError(f"{self.checkpoint} is not a checkpoint folder (no config.json)")
        if not self.model_repository.is_dir():
            raise LaunchError(f"no model repository at {self.model_repository}")
        if self.layout is not None and self._generated is None:
            from internvl_serve.serving.layout import write_model_repository
            try:
                self._generated = write_model_repository(
                    self.model_repository, Path(tempfile.mkdtemp(prefix="internvl-repo-")) / "models", self.layout)
            except ValueError as e:
                raise LaunchError(f"layout: {e}") from None
            self.model_repository = self._generated
        install = find_triton(*self._install_args)
        env = server_environment(install, self.checkpoint, malloc_mmap_threshold=self.malloc_mmap_threshold)
        if self.log_file is None:
            self.log_file = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        for kind, port in self._ports.items():  # an explicit port someone already listens on: fail now
            if port is not None and port_in_use(self.host, port):
                raise PortInUse(f"address already in use: {kind} port {port} on {self.host or '0.0.0.0'} is held by "
                                f"another process")
        for attempt in range(3):
            picked = free_ports({k: "127.0.0.1" if k.startswith("triton_") else self.host or "127.0.0.1"
                                 for k, v in self._ports.items() if v is None})
            self.ports = {k: v if v is not None else picked[k] for k, v in self._ports.items()}
            self._log = open(self.log_file, "ab")
            self._stopping.clear()
            env[ENCODER_ACTIVITY_ENV] = str(self._encoder_record())
            self._proc = subprocess.Popen(self.command(install), stdout=self._log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            try:
                self.wait_ready()
                self._note_shm_regions()
                self._start_guards()
                self._start_watchdog()
                return self
            except PortInUse as e:
                self.stop()
                # a port picked here was taken by another process before this server or its guard bound
                # it (a race of free ports): pick again; a port the caller gave stays an error
                if not e.kinds or any(self._ports[k] is not None for k in e.kinds) or attempt == 2:
                    raise
                self.log_file.write_bytes(b"")
            except LaunchError:
                lost_port_race = "already in use" in self.log_tail(200)
                self.stop()
                if not lost_port_race or attempt == 2:
                    raise
                self.log_file.write_bytes(b"")
        return self

    def _encoder_record(self) -> Path:
        """The vision and llm models' shared record (serving/encoder_activity.py): made for each start,
        removed by stop()."""
        if self.encoder_activity is None:
            fd, path = tempfile.mkstemp(prefix="internvl-encoder-activity-")
            os.close(fd)
            self.encoder_activity = create_record(path)
        return self.encoder_activity

    def _own_ports(self, proc: subprocess.Popen, kinds) -> bool:
        """Whether `proc` listens on the ports of `kinds`; PortInUse if another process does (a probe
        must never take another server's answer for this one's)."""
        owners = {kind: port_owner(proc.pid, self.ports[kind]) for kind in kinds}
        taken = [kind for kind, owner in owners.items() if owner == "other"]
        if taken:
            raise PortInUse("address already in use: " + ", ".join(
                f"{kind} port {self.ports[kind]}" for kind in taken) + " held by another process", tuple(taken))
        return all(owner == "mine" for owner in owners.values())

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Returns when this tritonserver listens on its ports and its /v2/health/ready answers 200;
        raises LaunchError (with the log's tail) if the process exits first or the time runs out, and
        PortInUse if another process listens on one of its ports. Notes its stubs' shared memory on the
        way (removed at stop even if the server dies before it is ready)."""
        deadline = time.monotonic() + (self.ready_timeout_s if timeout_s is None else timeout_s)
        url = f"{self.triton_http_url}/v2/health/ready"
        loading = LoadingProgress(self.progress, self.log_file, self.model_repository)
        while True:
            self._note_shm_regions()
            loading.report()
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise LaunchError(f"tritonserver exited (code {code}) before it was ready; "
                                  f"log {self.log_file}, last lines:\n{self.log_tail()}")
            if self._own_ports(self._proc, ("triton_grpc", "triton_http", "metrics")) and _answers_200(url):
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"tritonserver not ready after {self.ready_timeout_s:.0f}s; "
                                  f"log {self.log_file}, last lines:\n{self.log_tail()}")
            try:  # wait for the process to exit, at most a quarter second, then ask again
                self._proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass

    def _guard_commands(self) -> dict[str, list[str]]:
        """The public ports' guards: serving/grpc_guard.py and serving/http_guard.py in front of
        tritonserver's own front ends (docs/security.md)."""
        host = self.host or "0.0.0.0"
        grpc = [sys.executable, "-m", "internvl_serve.serving.grpc_guard", "--listen", f"{host}:{self.ports['grpc']}",
                "--upstream", self.triton_grpc_url]
        http = [sys.executable, "-m", "internvl_serve.serving.http_guard", "--host", host,
                "--port", str(self.ports["http"]), "--upstream", self.triton_http_url,
                "--models", ",".join(self.http_models), "--max-body-bytes", str(self.max_http_body_bytes)]
        if self.expose_all_models:
            grpc.append("--expose-all-models")
        return {"grpc": grpc, "http": http}

    def _start_guards(self) -> None:
        env = dict(os.environ, **{ADMIN_KEY_ENV: self.admin_key})  # the key never on a command line
        for kind, command in self._guard_commands().items():
            self._guards[kind] = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        for kind, guard in self._guards.items():
            # listening on its port (and, over HTTP, answering the health probe through to tritonserver)
            while not (self._own_ports(guard, (kind,))
                       and (kind != "http" or _answers_200(f"{self.http_url}/v2/health/ready"))):
                if guard.poll() is not None:
                    raise LaunchError(f"the {GUARD_NAMES[kind]} guard exited (code {guard.returncode}) before it was "
                                      f"ready; log {self.log_file}, last lines:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise LaunchError(f"the {GUARD_NAMES[kind]} guard not ready after 60s; log {self.log_file}")
                try:
                    guard.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass

    def _stop_guards(self) -> None:
        guards, self._guards = self._guards, {}
        for guard in guards.values():
            if guard.poll() is None:
                guard.send_signal(signal.SIGTERM)
        for guard in guards.values():
            try:
                guard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            kill_group(guard)
            guard.wait()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The log's last lines (server_log.log_tail)."""
        return log_tail(self.log_file, lines)

    def terminate(self) -> None:
        """Ask for a graceful shutdown (SIGTERM): in-flight requests get exit_timeout_s to finish."""
        if self.is_running():
            self._proc.send_signal(signal.SIGTERM)

    def shutdown(self) -> None:
        """terminate(), and SIGKILL the process group if tritonserver is still there kill_grace_s after
        its exit timeout: with decoupled streams in flight Triton 2.51 can crash and hang on its way
        out (SIGSEGV after "Exit timeout expired"), holding its clients' connections open."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._stopping.set()
        proc.send_signal(signal.SIGTERM)

        def kill_if_stuck():
            try:
                proc.wait(timeout=self.exit_timeout_s + self.kill_grace_s)
            except subprocess.TimeoutExpired:
                print(f"launcher: tritonserver did not exit {self.exit_timeout_s + self.kill_grace_s:g}s after "
                      f"SIGTERM; killing it", file=sys.stderr, flush=True)
                kill_group(proc)

        threading.Thread(target=kill_if_stuck, name="triton-kill-timer", daemon=True).start()

    def _note_shm_regions(self) -> None:
        """Remember the shared-memory regions of the server and its stubs, to remove what a crash leaves."""
        if self.is_running():
            self.shm_regions |= shm_regions([self._proc.pid, *python_stubs(self._proc.pid)])

    def stub_processes(self) -> dict[int, str]:
        """This server's live Python stubs: pid -> model instance name (e.g. 'llm_0_0')."""
        return python_stubs(self._proc.pid) if self.is_running() else {}

    def _start_watchdog(self) -> None:
        if self.on_stub_death != "exit":
            return
        expected = set(self.stub_processes().values())
        threading.Thread(target=self._watch_stubs, args=(expected,), name="triton-stub-watchdog",
                         daemon=True).start()

    def _watch_stubs(self, expected: set[str]) -> None:
        """Poll the stubs and the guards; a stub gone for two polls in a row (Triton never restarts it),
        or a guard that exited, stops the server, so that the supervisor (Docker, Kubernetes, systemd)
        starts a fresh one."""
        missing_before: set[str] = set()
        while not self._stopping.wait(0.5):
            if not self.is_running():
                return
            exited = [(kind, g) for kind, g in list(self._guards.items()) if g.poll() is not None]
            if exited and not self._stopping.is_set():
                kind, guard = exited[0]
                self.stub_failure = f"the {GUARD_NAMES[kind]} guard"
                print(f"launcher: the {GUARD_NAMES[kind]} guard exited (code {guard.returncode}); the {GUARD_NAMES[kind]} port "
                      f"is closed: stopping the server", file=sys.stderr, flush=True)
                self.shutdown()
                return
            missing = expected - set(self.stub_processes().values())
            if missing & missing_before and not self._stopping.is_set():
                self.stub_failure = ", ".join(sorted(missing))
                print(f"launcher: the Python stub of model instance(s) {self.stub_failure} died; Triton does not "
                      f"restart it and its requests fail ('Stub process ... is not healthy') or hang: stopping "
                      f"the server", file=sys.stderr, flush=True)
                self.shutdown()
                return
            missing_before = missing

    def stop(self) -> int | None:
        """Stop the server and everything it started (its process group); returns its exit code."""
        self._stopping.set()
        self._note_shm_regions()
        self._stop_guards()
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.exit_timeout_s + self.kill_grace_s)
                except subprocess.TimeoutExpired:
                    print(f"launcher: tritonserver did not exit {self.exit_timeout_s + self.kill_grace_s:g}s "
                          f"after SIGTERM; killing it", file=sys.stderr, flush=True)
        finally:
            kill_group(proc)  # the Python backend's stubs are in the server's group
            proc.wait()
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._generated is not None:  # the derived repository of a layout
                shutil.rmtree(self._generated.parent, ignore_errors=True)
            if self.encoder_activity is not None:
                self.encoder_activity.unlink(missing_ok=True)
                self.encoder_activity = None
            left = remove_shm_regions(self.shm_regions)
            if left:
                print(f"launcher: removed {len(left)} shared-memory region(s) tritonserver left in /dev/shm",
                      file=sys.stderr, flush=True)
        return proc.returncode

    def wait(self) -> int:
        """Block until the server exits by itself (or by a signal someone sent it)."""
        return self._proc.wait() if self._proc else 0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
