"""Images and videos -> the encoded bytes the server decodes.

Owns: `encode_image` (path, bytes, `data:` URL or PIL image -> bytes), `encode_images`,
`encode_video` (path or bytes -> bytes), and base64 helpers for saved sessions.
Does not own: decoding, resizing or frame sampling: the server does all of that (448x448 bicubic,
ImageNet normalisation, the card's get_index for videos), so the client needs no pillow and no decord.

Files are sent as they are (JPEG stays JPEG). Only in-memory PIL images are encoded, to PNG (lossless),
which needs pillow (the `pillow` extra); it is imported only then.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from typing import Any, Union

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]  # Any: a PIL.Image.Image
VideoLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

DATA_URL_PREFIX = "data:"


def encode_image(image: ImageLike) -> bytes:
    """Return the encoded bytes of one image.

    - `str` / `os.PathLike`: a file path, read as is; a `data:image/...;base64,...` string is decoded.
    - `bytes` / `bytearray` / `memoryview`: already encoded (PNG, JPEG, ...), sent as is.
    - a PIL image: encoded to PNG (lossless; needs pillow, which is installed if you have the object).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return data
    if isinstance(image, str) and image.startswith(DATA_URL_PREFIX):
        return decode_data_url(image)
    if isinstance(image, (str, os.PathLike)):
        return _read_file(image, "image")
    if _is_pil_image(image):
        buf = io.BytesIO()
        img = image
        if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1"):
            img = img.convert("RGB")
        img.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(
        f"unsupported image type {type(image).__name__}: give a file path, encoded bytes, "
        "a data: URL or a PIL image"
    )


def encode_images(images: ImageLike | Iterable[ImageLike] | None) -> list[bytes]:
    """Encode one image or a list of images; None -> []."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil_image(images):
        return [encode_image(images)]
    return [encode_image(image) for image in images]


def encode_video(video: VideoLike) -> bytes:
    """Return the bytes of an encoded video file (MP4, AVI, ...); the server samples the frames."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
        if not data:
            raise ValueError("video bytes are empty")
        return data
    if isinstance(video, (str, os.PathLike)):
        return _read_file(video, "video")
    raise TypeError(f"unsupported video type {type(video).__name__}: give a file path or encoded bytes")


def to_data_url(data: bytes, mime: str | None = None) -> str:
    """`data:<mime>;base64,<...>`: the form the HTTP generate endpoint accepts in `images`."""
    return f"data:{mime or guess_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_url(url: str) -> bytes:
    """Inverse of to_data_url (only base64 data URLs)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith(DATA_URL_PREFIX) or not head.endswith(";base64"):
        raise ValueError("only base64 data URLs are supported: data:<mime>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise ValueError(f"invalid base64 in data URL: {exc}") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def guess_mime(data: bytes) -> str:
    """MIME type from the magic bytes of common image formats (application/octet-stream otherwise)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    return "application/octet-stream"


def _read_file(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)}") from None
    if not data:
        raise ValueError(f"{what} file is empty: {os.fspath(path)}")
    return data


def _is_pil_image(obj: Any) -> bool:
    # Duck-typed so that pillow is imported only by callers who already use it.
    cls = type(obj)
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in cls.__mro__)
