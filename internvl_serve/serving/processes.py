"""The processes and sockets of a tritonserver the launcher started, read from /proc (Linux): its Python
backend stubs, the shared-memory regions they map, which process listens on a port; and killing its
process group.

Owns: /proc reading, /dev/shm region removal, port checks. Does not own: starting or stopping the
server (serving/triton_server.py), the models.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
SHM_REGION = re.compile(r"/dev/shm/triton_python_backend_shm_region_[0-9A-Za-z-]+")
_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(hosts: dict[str, str]) -> dict[str, int]:
    """A free port for each key (bound on its host), all different: every socket stays bound until the
    last port is picked (free_port called once per key can hand out the same port twice)."""
    sockets = []
    try:
        ports = {}
        for key, host in hosts.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
            ports[key] = s.getsockname()[1]
        return ports
    finally:
        for s in sockets:
            s.close()


def stat_fields(pid: int | str) -> list[bytes]:
    """/proc/PID/stat after the command name: [0] the state, [1] the parent pid, ... [11] and [12] the
    user and system CPU time in clock ticks (proc(5)'s fields 3, 4, 14, 15). OSError once it is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def python_stubs(server_pid: int) -> dict[int, str]:
    """The live Python backend stubs tritonserver `server_pid` started: pid -> model instance name
    ('preprocess_0_1'). Read from /proc; zombies (dead, not reaped yet) are left out."""
    stubs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state, ppid = stat_fields(entry)[:2]
            if int(ppid) != server_pid or state == b"Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0")]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if argv and Path(argv[0]).name == STUB_NAME:
            # argv: stub, model.py, shm region, shm sizes (2), parent pid, backend dir, ipc size, instance name
            stubs[int(entry)] = argv[8] if len(argv) > 8 and argv[8] else Path(argv[1]).parents[1].name
    return stubs


def shm_regions(pids) -> set[str]:
    """The Python backend's shared-memory regions (/dev/shm/triton_python_backend_shm_region_<uuid>, one
    per stub, 32 MiB and up) that these processes have mapped, read from /proc/PID/maps."""
    regions = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                regions.update(SHM_REGION.findall(f.read()))
        except OSError:
            continue  # gone meanwhile
    return regions


def remove_shm_regions(regions) -> list[str]:
    """Unlink those of `regions` that still exist: a tritonserver that exits normally removes its own, one
    that is killed (SIGKILL, OOM) or loses a stub leaves them, and tmpfs holds them in RAM for good."""
    removed = []
    for path in sorted(regions):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            print(f"launcher: could not remove {path}: {e}", file=sys.stderr, flush=True)
    return removed


def kill_group(leader: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGKILL every process of the leader's group and wait (bounded) until none is left."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while time.monotonic() < deadline:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        leader.poll()  # reap the leader (our child); the others are reaped by init
        tick.wait(0.05)


def port_in_use(host: str, port: int) -> bool:
    """Whether a socket already listens on host:port (bind with SO_REUSEADDR, as servers do: a port in
    TIME_WAIT counts as free, one with a listener does not)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def listening_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on TCP `port` (any address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (its /proc/PID/fd links 'socket:[INODE]')."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def port_owner(pid: int, port: int) -> str:
    """'mine' if process `pid` listens on `port`, 'other' if only other processes do, 'none' if nobody."""
    listening = listening_inodes(port)
    if not listening:
        return "none"
    return "mine" if listening & socket_inodes(pid) else "other"
