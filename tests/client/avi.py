"""A minimal Motion-JPEG AVI writer for test videos (pillow only: no ffmpeg, OpenCV or imageio here).

`mjpeg_avi(frames, fps)` -> bytes of an AVI whose frames are JPEGs; decord (ffmpeg) decodes it.
"""

from __future__ import annotations

import io
import struct


def _chunk(fourcc: bytes, data: bytes) -> bytes:
    pad = b"\0" if len(data) % 2 else b""
    return fourcc + struct.pack("<I", len(data)) + data + pad


def _list(kind: bytes, data: bytes) -> bytes:
    return _chunk(b"LIST", kind + data)


def mjpeg_avi(frames, fps: int = 4, quality: int = 90) -> bytes:
    """frames: PIL images of one size (RGB)."""
    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        frame.convert("RGB").save(buf, format="JPEG", quality=quality)
        jpegs.append(buf.getvalue())
    width, height = frames[0].size
    n = len(jpegs)
    max_bytes = max(len(j) for j in jpegs)
    avih = struct.pack("<IIIIIIIIII16x", 1_000_000 // fps, max_bytes * fps, 0, 0x10, n, 0, 1, max_bytes,
                       width, height)
    strh = struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, n, max_bytes,
                       0xFFFFFFFF, 0, 0, 0, width, height)
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    hdrl = _list(b"hdrl", _chunk(b"avih", avih) + _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf)))
    movi_chunks = [_chunk(b"00dc", j) for j in jpegs]
    movi = _list(b"movi", b"".join(movi_chunks))
    index, offset = [], 4  # offsets relative to the 'movi' fourcc
    for j, c in zip(jpegs, movi_chunks):
        index.append(struct.pack("<4sIII", b"00dc", 0x10, offset, len(j)))
        offset += len(c)
    body = b"AVI " + hdrl + movi + _chunk(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body
