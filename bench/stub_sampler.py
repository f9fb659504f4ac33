"""py-spy on a server's llm stub during one load level: where its Python threads spend their time.

The engine's counters (servermetrics.engine_step_figures) say how much of the engine thread's work per
step is host work; this says which host work, and on which thread (the engine thread, the response
senders, the execute thread). `benchmark.py --py-spy-levels 64` samples the llm stub for the whole of
each of those levels and keeps, per thread, its samples and its heaviest innermost frames in the level's
row (`py_spy`), and the raw stacks beside the results.

What a sample means: py-spy (`--nonblocking`, so the stub never pauses) records each thread that is not
idle. A thread waiting for the GIL counts as idle; one in native code that released the GIL (a CUDA
synchronize, Triton's response send) counts as active. So samples are time spent, not GIL held. Two more
modes: `gil` (py-spy --gil) records only the thread holding the GIL at each sample (who keeps the engine
thread waiting), `all` (py-spy --idle) every thread at every sample; `idle_where(all, active)` is then,
per thread, where it slept: on a lock, a queue, or (at a line that calls into torch) the GIL. The
summaries carry the seconds sampled, so samples / (seconds x rate) is a share of the wall time.

Needs py-spy on PATH (`pip install py-spy`; scripts/dev/device_carry.sh carries it to a lent GPU machine)
and ptrace rights over the stub (root, or kernel.yama.ptrace_scope 0). Without them the level runs as
usual and its row says why there is no profile; so does a level that ends before py-spy has started
(an interrupt that early ends it without output). Checked by hand on this project's CPU machine (a spinning
thread sampled and summarized); the tests cover the summary and the missing py-spy.

Owns: starting and stopping `py-spy record` on one process, and the summary of its raw output. Does not
own: which process or level (benchmark.py), the server.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

RATE_HZ = 50
TOP_FRAMES = 8


class StubSampler:
    """`py-spy record` on `pid` from start() until stop(), raw collapsed stacks into `out`."""

    MODES = {"active": [], "gil": ["--gil"], "all": ["--idle"]}

    def __init__(self, pid: int, out: Path, rate_hz: int = RATE_HZ, *, mode: str = "active"):
        if mode not in self.MODES:
            raise ValueError(f"mode {mode!r}: one of {list(self.MODES)}")
        self.pid, self.out, self.rate_hz, self.mode = pid, Path(out), rate_hz, mode
        self._proc: subprocess.Popen | None = None
        self._started = 0.0
        self.error: str | None = None

    def start(self) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            self.error = "py-spy is not on PATH (pip install py-spy)"
            return
        self._proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate_hz), "--nonblocking", "--threads",
             *self.MODES[self.mode], "--format", "raw", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._started = time.monotonic()

    def stop(self, timeout_s: float = 60.0) -> dict | None:
        """Stop sampling (py-spy writes its output on SIGINT) -> the summary, or None (self.error says why)."""
        if self._proc is None:
            return None
        seconds = time.monotonic() - self._started
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        if not self.out.exists():
            self.error = f"py-spy exited {self._proc.returncode} without output: {(err or '').strip()[-300:]}"
            return None
        return {**summarize(self.out.read_text(), self.rate_hz), "seconds": round(seconds, 1), "mode": self.mode}


def _stacks(raw: str) -> dict[str, Counter]:
    """py-spy's raw output -> {thread name: Counter of its stacks (function names, outermost first)}."""
    stacks: dict[str, Counter] = defaultdict(Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        stacks[thread][tuple(f.split(" (")[0] for f in frames[1:])] += int(count)
    return stacks


def idle_where(all_raw: str, active_raw: str, top: int = TOP_FRAMES) -> dict:
    """Per thread, the samples of `all` mode beyond those of `active` mode over the same window, by
    innermost frames: where the thread was not running (two samplers, so a difference of counts, not
    of the same instants; frames with no excess are left out, threads are kept)."""
    every, active = _stacks(all_raw), _stacks(active_raw)
    out = {}
    for thread, stacks in every.items():
        leaves: Counter = Counter()
        for stack, n in stacks.items():
            leaves[";".join(stack[-3:])] += n
        for stack, n in active.get(thread, Counter()).items():
            leaves[";".join(stack[-3:])] -= n
        excess = +leaves  # keeps the positive counts
        out[thread] = {"samples": sum(excess.values()), "top": [[f, k] for f, k in excess.most_common(top)]}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["samples"]))


def summarize(raw: str, rate_hz: int = RATE_HZ, top: int = TOP_FRAMES) -> dict:
    """py-spy's raw output ("thread (tid): name;frame (file:line);...;frame (file:line) count" per line)
    -> {"rate_hz", "threads": {name: {"samples", "top": [[innermost frames, samples], ...]}}}, the
    threads by samples, most first; frames by function name, their three innermost."""
    samples: Counter = Counter()
    leaves: dict[str, Counter] = defaultdict(Counter)
    for thread, stacks in _stacks(raw).items():
        for stack, n in stacks.items():
            samples[thread] += n
            leaves[thread][";".join(stack[-3:])] += n
    return {"rate_hz": rate_hz, "threads": {
        thread: {"samples": n, "top": [[frames, k] for frames, k in leaves[thread].most_common(top)]}
        for thread, n in samples.most_common()}}
