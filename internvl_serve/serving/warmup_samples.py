"""The preprocess model's warm-up samples: config.pbtxt's `model_warmup` has Triton run them on every
preprocess instance at load, through the whole adapter path, before the model is ready, so that the
first requests of a new instance do not pay for its first use (Pillow's decoders and image blocks, the
heap's top, the output buffers, the backend's I/O): measured with bench/ttft_timeline.py, a cold
instance's first request took 36-58 ms of preprocess on an H100 machine and ~88 ms on the 2-core CPU
machine, a warm one 9-14 ms.

Owns: the sample files in model_repository/preprocess/warmup/ (each one element of Triton's serialized
string format: a 4-byte little-endian length, then the bytes): the question, a PNG of the tile's size,
a JPEG that needs a resize (smooth gradients, so the files stay small). The config runs the PNG, the
JPEG, then the PNG again, which leaves the heap as a run of PNGs does.

    python -m internvl_serve.serving.warmup_samples    # rewrite the files
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tritonclient.utils import serialize_byte_tensor

FOLDER = Path(__file__).resolve().parents[2] / "model_repository" / "preprocess" / "warmup"
QUESTION = b"<image>\nDescribe the image."
IMAGES = {"image_png": ((448, 448), "PNG"), "image_jpeg": ((480, 640), "JPEG")}  # (height, width), format


def gradient_image(height: int, width: int, fmt: str) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def samples() -> dict[str, bytes]:
    """File name -> the bytes of one element (not yet serialized)."""
    return {"text_input": QUESTION, **{name: gradient_image(*shape, fmt) for name, (shape, fmt) in IMAGES.items()}}


def write(folder: Path = FOLDER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in samples().items():
        (folder / name).write_bytes(serialize_byte_tensor(np.array([data], dtype=object)).item())


if __name__ == "__main__":
    write()
