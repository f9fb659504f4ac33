"""Which vision encoders of one server run a forward right now, shared between its processes, so that the
llm engine can give them the GPU (EngineThread's encoder priority, engine/engine.py).

Why: the vision and llm models run in two processes (Triton's Python backend), and a GPU time-slices the
kernels of two processes. While both have work each runs at about half its speed (H100, 32 streams,
bench/vision_decode_overlap.py: the encoder 24 images/s instead of 46 alone, a decode step 37 ms instead
of 16), so a new request waits about twice as long for its image while every running stream's steps slow
down as much. The engine holds a step of decodes only back while an encoder of its GPU runs (bounded per
step), so an image is encoded at full speed and the decode loses that time in one piece.

The record: a small file the launcher makes and names in $INTERNVL_ENCODER_ACTIVITY (unset: no record,
no priority), mapped by every process that uses it. One slot per encoder process: its pid, its device
(the CUDA index, -1 on the CPU), since when it runs a forward (CLOCK_MONOTONIC ns, the same clock in
every process of the machine; 0: idle), how many forwards it ran and when its last one ended. The last
lets a reader count an encoder as busy for a while after a forward (`busy(..., linger_ns)`): with one
image per forward (a vision batch cap of 1), Triton hands the next queued image to the stub a few ms after
the last one ends, and in that gap a reader that only sees running forwards would let a step in. An
encoder claims a free slot, or a dead process's, under an flock and then writes only its own slot; a
forward flagged longer than STALE_NS ago (its process died in the middle of it) counts as idle.

Owns: the file's layout, claiming a slot, reading it. Does not own: when the engine holds a step
(engine/engine.py), the forward (serving/vision.py), making and removing the file (serving/triton_server.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

ENCODER_ACTIVITY_ENV = "INTERNVL_ENCODER_ACTIVITY"
SLOTS = 64
PID, DEVICE, SINCE_NS, FORWARDS, ENDED_NS = range(5)  # the fields of a slot, int64 each
FIELDS = ENDED_NS + 1
RECORD_BYTES = SLOTS * FIELDS * 8
STALE_NS = 10 * 10**9  # a forward of the most tiles a request may send takes ~1 s on an H100


def device_number(device) -> int:
    """A device as the record stores it: the CUDA index (0 for a bare "cuda"), -1 for the CPU."""
    import torch

    device = torch.device(device)
    return (device.index or 0) if device.type == "cuda" else -1


def create_record(path: str | Path) -> Path:
    """Write an empty record (every slot free) at `path`."""
    path = Path(path)
    path.write_bytes(bytes(RECORD_BYTES))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class EncoderActivity:
    """The record at `path`, mapped: `busy(devices)` for the engine, `claim(device)` for an encoder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "r+b")
        if os.fstat(self._file.fileno()).st_size != RECORD_BYTES:
            self._file.close()
            raise ValueError(f"{self.path} is not an encoder-activity record ({RECORD_BYTES} bytes)")
        self._map = mmap.mmap(self._file.fileno(), RECORD_BYTES)
        self.slots = np.ndarray((SLOTS, FIELDS), dtype=np.int64, buffer=self._map)

    @classmethod
    def from_environment(cls, log: Callable[[str], None] | None = None) -> "EncoderActivity | None":
        """The server's record; None when the process was not started with one, or when it cannot be
        read (told to `log`: the model then runs without it, it does not fail)."""
        path = os.environ.get(ENCODER_ACTIVITY_ENV, "")
        if not path:
            return None
        try:
            return cls(path)
        except (OSError, ValueError) as e:
            if log is not None:
                log(f"encoder activity: {ENCODER_ACTIVITY_ENV}={path} cannot be used ({e}); running without it")
            return None

    def busy(self, devices: Iterable[int], linger_ns: int = 0) -> bool:
        """Whether an encoder on one of `devices` runs a forward now (one that started more than STALE_NS
        ago counts as idle), or, with linger_ns, ended one less than linger_ns ago."""
        since = self.slots[:, SINCE_NS]
        if not since.any() and not linger_ns:  # the usual answer, read after every engine step: keep it cheap
            return False
        now = time.monotonic_ns()
        live = (since > 0) & (since > now - STALE_NS)
        if linger_ns:
            live |= self.slots[:, ENDED_NS] > now - linger_ns
        if not live.any():
            return False
        return bool((live & (self.slots[:, PID] != 0) & np.isin(self.slots[:, DEVICE], list(devices))).any())

    def claim(self, device: int) -> "EncoderSlot":
        """A slot for this process's encoder on `device`: a free one, or one whose process is gone."""
        with self._locked():
            for index in range(SLOTS):
                pid = int(self.slots[index, PID])
                if pid == 0 or pid == os.getpid() or not _alive(pid):
                    self.slots[index] = (os.getpid(), device, 0, 0, 0)
                    return EncoderSlot(self, index)
        raise RuntimeError(f"{self.path}: all {SLOTS} encoder slots are taken")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        self.slots = None
        self._map.close()
        self._file.close()


class EncoderSlot:
    """One encoder's slot: `with slot.running(): forward...` flags the forward; `release()` frees it."""

    def __init__(self, activity: EncoderActivity, index: int):
        self.activity = activity
        self.index = index

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        row = self.activity.slots[self.index]
        row[SINCE_NS] = time.monotonic_ns()
        try:
            yield
        finally:
            row[ENDED_NS] = time.monotonic_ns()  # before the flag clears: a reader never sees neither
            row[SINCE_NS] = 0
            row[FORWARDS] += 1

    @property
    def forwards(self) -> int:
        return int(self.activity.slots[self.index, FORWARDS])

    def release(self) -> None:
        with self.activity._locked():
            self.activity.slots[self.index] = 0
