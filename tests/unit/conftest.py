"""Shared unit-test fixtures: the V1-1 config values (model sheet section 1) and tiny checkpoints on disk."""

from __future__ import annotations

import copy

import pytest

from internvl_serve.random_weights import V1_1_SHEET_CONFIG as V1_1_CONFIG  # noqa: E402


@pytest.fixture
def v1_1_config_dict() -> dict:
    return copy.deepcopy(V1_1_CONFIG)


@pytest.fixture(scope="session")
def tiny_checkpoint_safetensors(tmp_path_factory):
    """The same weights as tiny_checkpoint, as model-0000N-of-00004.safetensors shards + index."""
    from internvl_serve.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "safetensors", fmt="safetensors", seed=0)


# ---- tokenizer / prompt / imageproc / reference fixtures ---------------------------------------------
def make_mjpeg_avi(frames, fps: int = 10) -> bytes:
    """A minimal MJPEG AVI (RIFF) holding `frames` (PIL images, one size): a real video decord can read."""
    import io
    import struct

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def riff_list(kind: bytes, body: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(body) + 4) + kind + body

    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        frame.convert("RGB").save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())
    w, h = frames[0].size
    n = len(frames)
    avih = struct.pack("<IIIIIIIIII4I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, 0, w, h, 0, 0, 0, 0)
    strh = struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, n, 0,
                       0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0x47504A4D, w * h * 3, 0, 0, 0, 0)  # 'MJPG'
    hdrl = riff_list(b"hdrl", chunk(b"avih", avih) + riff_list(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    movi, index, offset = b"", b"", 4
    for data in jpegs:
        c = chunk(b"00dc", data)
        index += struct.pack("<4sIII", b"00dc", 0x10, offset, len(data))
        movi += c
        offset += len(c)
    body = b"AVI " + hdrl + riff_list(b"movi", movi) + chunk(b"idx1", index)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def video_frame_color(i: int) -> tuple[int, int, int]:
    """The solid colour of frame i of `tiny_video_bytes` (tells a sampled frame's index back)."""
    return (10 * i, 255 - 10 * i, 60)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder with make_tiny_tokenizer's files only (tokenizer.model, *.json)."""
    from internvl_serve.tiny_tokenizer import make_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from internvl_serve.tokenizer import load_tokenizer
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_video_bytes() -> bytes:
    """20 solid-colour 64x48 frames at 10 fps (frame i has video_frame_color(i)), as an MJPEG AVI."""
    from PIL import Image
    return make_mjpeg_avi([Image.new("RGB", (64, 48), video_frame_color(i)) for i in range(20)], fps=10)


@pytest.fixture(scope="session")
def tiny_video_frame_colors() -> list[tuple[int, int, int]]:
    """tiny_video_bytes' frame colours, by frame index."""
    return [video_frame_color(i) for i in range(20)]


@pytest.fixture(scope="session")
def mjpeg_avi_writer():
    """make_mjpeg_avi(frames, fps) -> bytes, for tests that need their own video."""
    return make_mjpeg_avi
