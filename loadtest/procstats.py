"""Resource readings of a running server for the soak: the RSS of a process tree (from /proc) and
GPU memory (from nvidia-smi, when there is one). Linux only; standard library only.

Owns: finding the server (`find_pids_by_name`), walking its process tree (tritonserver and the Python
backend's stub processes it forks), and the two readings. Does not own: when to read (soak.py).

RSS is summed over the tree's processes, so pages they share (libraries, Triton's shared-memory
regions with the stubs) count once per process that maps them: watch its drift, not its level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _parent_of(stat_text: str) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
    return int(stat_text.rsplit(")", 1)[1].split()[1])


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process visible now."""
    out = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = _parent_of((entry / "stat").read_text())
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants ([] when root is gone)."""
    if not (PROC / str(root)).exists():
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process (None when it is gone)."""
    try:
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class TreeRss:
    bytes: int
    processes: int
    pids: tuple[int, ...]


def tree_rss(root: int) -> TreeRss | None:
    """Summed RSS of `root`'s process tree; None when root is gone."""
    sizes = {pid: rss_bytes(pid) for pid in process_tree(root)}
    sizes = {pid: size for pid, size in sizes.items() if size is not None}
    if root not in sizes:
        return None
    return TreeRss(sum(sizes.values()), len(sizes), tuple(sorted(sizes)))


def find_pids_by_name(name: str = "tritonserver") -> list[int]:
    """Pids of the processes whose command name is `name` (the kernel keeps its first 15 characters)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name[:15]:
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


@dataclass(frozen=True)
class GpuMemory:
    used_mib: float  # memory.used summed over the visible GPUs (every process, ours or not)
    server_mib: float | None  # what nvidia-smi lists for the server's processes (None: none listed)


def gpu_memory(pids: tuple[int, ...] = (), timeout_s: float = 20.0) -> GpuMemory | None:
    """GPU memory now, from nvidia-smi; None without nvidia-smi or when it fails. In a container the
    compute-apps pids may be another namespace's, so `server_mib` can be None while `used_mib` is not."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None

    def query(*args: str) -> list[list[str]]:
        run = subprocess.run([smi, *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=timeout_s)
        if run.returncode != 0:
            raise OSError(run.stderr.strip() or f"nvidia-smi exited with {run.returncode}")
        return [[f.strip() for f in line.split(",")] for line in run.stdout.splitlines() if line.strip()]

    def number(text: str) -> float | None:  # "[N/A]" and the like in some containers
        try:
            return float(text)
        except ValueError:
            return None

    try:
        used = [number(row[0]) for row in query("--query-gpu=memory.used")]
        apps = query("--query-compute-apps=pid,used_memory")
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [u for u in used if u is not None]
    if not used:
        return None
    mine = [number(row[1]) for row in apps if len(row) > 1 and row[0].isdigit() and int(row[0]) in pids]
    mine = [m for m in mine if m is not None]
    return GpuMemory(used_mib=sum(used), server_mib=sum(mine) if mine else None)
