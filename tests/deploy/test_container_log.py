"""The launcher as the image runs it: `--log-file /dev/stdout` with stdout a pipe (as under `docker logs`
or a Kubernetes container). A start that fails must still end with the launcher's own message and exit
code, not a traceback from reading the log back (a pipe cannot seek). The real tritonserver is started
on a model repository whose one model has a broken config, so it exits at once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from internvl_serve.serving.launcher import TritonServer, free_port


def test_log_tail_of_a_pipe_reads_nothing_back(tmp_path):
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"I1205 tritonserver line\n")
        server = TritonServer(tmp_path, log_file=f"/proc/self/fd/{write_end}")
        tail = server.log_tail()
        assert tail == (f"(the server log went to /proc/self/fd/{write_end}, which cannot be read back: "
                        f"see its last lines there)")
        assert os.read(read_end, 100) == b"I1205 tritonserver line\n"  # the line is still in the pipe
    finally:
        os.close(read_end)
        os.close(write_end)


def test_failed_start_logging_to_stdout_pipe(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")  # the launcher checks it exists; no model loads it
    repository = tmp_path / "models"
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text('backend: "python"\nthis is not a model config\n')
    result = subprocess.run(
        [sys.executable, "-m", "internvl_serve.serving.launcher", "--checkpoint", str(checkpoint),
         "--model-repository", str(repository), "--log-file", "/dev/stdout",
         "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        cwd=Path(__file__).resolve().parents[2])
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert "launcher: tritonserver exited (code 1) before it was ready" in result.stderr
    assert "which cannot be read back" in result.stderr
    assert "broken" in result.stdout  # Triton's own log (naming the model) went to the pipe
