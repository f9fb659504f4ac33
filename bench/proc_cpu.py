"""CPU time of the processes behind a benchmark level, from /proc: which process runs out of cores first.

Owns: naming the processes of one served benchmark (the load generator itself, the gRPC guard,
tritonserver, each model's Python stubs and, apart, the processes those stubs started, such as the llm's
engine process) and the CPU seconds (user + system) each group spent between two snapshots, as cores
busy over the level's wall time. Does not own: starting the server (triton_server.TritonServer) or the
levels (benchmark.py). Linux only.
"""
from __future__ import annotations

import os

from internvl_serve.serving.processes import stat_fields

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (all its threads); None once it is gone."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_of(pids: set[int]) -> dict[int, int]:
    """Every live process whose parent is in `pids`, and its descendants: pid -> the ancestor in `pids`."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(stat_fields(entry)[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    found: dict[int, int] = {}
    frontier = {p: p for p in pids}
    while frontier:
        frontier = {child: frontier[ppid] for child, ppid in parent.items() if ppid in frontier and child not in found}
        found.update(frontier)
    return found


def server_groups(server) -> dict[str, list[int]]:
    """A running TritonServer's processes by role: 'load generator' (this process), 'gRPC guard',
    'tritonserver', one group per model's stubs ('llm', 'vision', ...) and, where a model's stubs
    started processes of their own, '<model> children' (the llm's engine process)."""
    groups: dict[str, list[int]] = {"load generator": [os.getpid()]}
    guard = server.guard_pid("grpc")
    if guard is not None:
        groups["gRPC guard"] = [guard]
    groups["tritonserver"] = [server.pid]
    stubs = server.stub_processes()  # pid -> instance name, e.g. llm_0_0
    model_of = {pid: name.rsplit("_", 2)[0] for pid, name in stubs.items()}
    for pid, model in sorted(model_of.items()):
        groups.setdefault(model, []).append(pid)
    for child, stub in sorted(children_of(set(stubs)).items()):
        groups.setdefault(f"{model_of[stub]} children", []).append(child)
    return groups


class CpuMeter:
    """CPU seconds of each group from start() to stop(), as cores busy over the wall time given."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.before: dict[int, float] = {}

    def start(self) -> None:
        self.before = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids}

    def stop(self, wall_s: float) -> dict[str, float]:
        """Cores each group kept busy (CPU seconds / wall_s); a process gone meanwhile counts nothing."""
        cores = {}
        for name, pids in self.groups.items():
            spent = 0.0
            for pid in pids:
                after, before = cpu_seconds(pid), self.before.get(pid)
                if after is not None and before is not None:
                    spent += after - before
            cores[name] = spent / wall_s if wall_s > 0 else float("nan")
        return cores
