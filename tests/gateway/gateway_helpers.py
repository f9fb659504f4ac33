"""Helpers of the gateway tests: test images, and the gateway as a subprocess
(`python -m internvl_gateway`, as deployed) on a free port."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
GATEWAY_DIR = REPO_ROOT / "gateway"


def png(seed: int, size=(64, 48)) -> bytes:
    """A deterministic RGB noise image, PNG-encoded (different seeds: different answers)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Gateway:
    """`python -m internvl_gateway` in a subprocess (its own process group), ready when /v1/models answers."""

    def __init__(self, triton: str, log: Path, *extra: str, api_key: str | None = None):
        from internvl_serve.serving.launcher import free_port

        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GATEWAY_DIR), env.get("PYTHONPATH", "")) if p)
        env.pop("INTERNVL_GATEWAY_API_KEY", None)
        if api_key is not None:  # through the environment, as docs/gateway.md advises
            env["INTERNVL_GATEWAY_API_KEY"] = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "internvl_gateway", "--triton", triton, "--port", str(self.port),
             "--log-level", "warning", "--timeout", "60", *extra],
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"the gateway exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/v1/models", headers=headers, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the gateway did not answer within 60 s:\n{log.read_text()[-3000:]}")
            try:
                self.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass

    def openai(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
