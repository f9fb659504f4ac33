"""Fixtures of the client tests: test images and a test video (made here, deterministic), the tiny
checkpoint, and the Node client's dependencies (`npm ci`, run only when package-lock.json changed)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO_ROOT / "clients" / "node"


def png(seed: int, size=(64, 48)) -> bytes:
    """A deterministic RGB noise image, PNG-encoded (different seeds: different answers)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def images() -> list[bytes]:
    return [png(1), png(2), png(3)]


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, images) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, data in enumerate(images):
        path = folder / f"image{i + 1}.png"
        path.write_bytes(data)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def video() -> bytes:
    """A 12-frame Motion-JPEG AVI (decord decodes it)."""
    from PIL import Image

    from avi import mjpeg_avi

    rng = np.random.default_rng(7)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(12)]
    return mjpeg_avi(frames, fps=4)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """clients/node with its node_modules installed by `npm ci` (skipped when node/npm are missing).

    Idempotent: a stamp in node_modules records the hash of package-lock.json it was installed from."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the Node.js client cannot be tested here")
    lock = NODE_CLIENT / "package-lock.json"
    stamp = NODE_CLIENT / "node_modules" / ".internvl-lock-sha256"
    want = hashlib.sha256(lock.read_bytes()).hexdigest()
    if not (stamp.is_file() and stamp.read_text() == want):
        run = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            pytest.fail(f"npm ci failed in {NODE_CLIENT}:\n{run.stdout}\n{run.stderr}")
        stamp.write_text(want)
    return NODE_CLIENT
