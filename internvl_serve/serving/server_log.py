"""What the launcher reads back from tritonserver's log file.

Owns: the log's last lines (`log_tail`; a log that is not a regular file, such as `--log-file
/dev/stdout` in a container, is not read back), and telling a progress callable which models have
loaded while tritonserver loads them (`LoadingProgress`, from the log's "successfully loaded 'NAME'"
lines). Does not own: where the log goes, the server process or its readiness (triton_server.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable


def log_tail(log_file: Path | None, lines: int = 40) -> str:
    """The log's last lines. A log that is not a regular file (a pipe or a terminal: `--log-file
    /dev/stdout` in a container) cannot be read back; its lines are already where it points."""
    if log_file is None or not log_file.exists():
        return ""
    if not log_file.is_file():  # opening a pipe to read would steal its lines, and seek fails
        return f"(the server log went to {log_file}, which cannot be read back: see its last lines there)"
    with open(log_file, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 200 * lines))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class LoadingProgress:
    """Tells progress(line) which models of the repository are ready, when that changed, from the log
    lines of this start on (the log's size when it is made). tritonserver opens its HTTP and gRPC
    endpoints only once every model has loaded, so a model's /v2/models/NAME/ready cannot be asked while
    they load. Quiet when progress is None or the log cannot be read back."""

    def __init__(self, progress: Callable[[str], None] | None, log_file: Path | None, model_repository: Path):
        self._progress = progress if log_file is not None and log_file.is_file() else None
        if self._progress is None:
            return
        self._log_file = log_file
        self._names = sorted(d.name for d in model_repository.iterdir() if (d / "config.pbtxt").is_file())
        self._offset = log_file.stat().st_size
        self._ready: set[str] = set()

    def report(self) -> None:
        if self._progress is None:
            return
        with open(self._log_file, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        chunk = chunk[:chunk.rfind(b"\n") + 1]  # whole lines only
        self._offset += len(chunk)
        loaded = {m.decode("utf-8", "replace") for m in re.findall(rb"successfully loaded '([^']+)'", chunk)}
        if loaded - self._ready:
            self._ready |= loaded
            self._progress("loading models: " + ", ".join(
                f"{name} ready" if name in self._ready else f"{name} loading..." for name in self._names))
