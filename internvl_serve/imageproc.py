"""Image bytes -> RGB images -> pixel values, and video bytes -> sampled frames; no transformers here.

Owns: decoding untrusted image bytes (format allow-list, size checked before any pixel is decoded),
the model card's preprocessing for V1-1 and the card's video frame sampling (`get_index`).

The card's image path is `img.convert('RGB').resize((448, 448))` (PIL's default filter, BICUBIC)
followed by `CLIPImageProcessor` from preprocessor_config.json: resize the shortest edge to 448
(bicubic; PIL returns an unchanged copy at the same size), centre-crop 448 (a no-op at 448x448),
rescale by 1/255 and normalise with the checkpoint's mean/std (ImageNet's for V1-1). `to_pixel_values`
does exactly that arithmetic (uint8 * (1/255) in float64 cast to float32, then (x - mean) / std in
float32, as transformers' image_transforms do); tests/unit/test_imageproc.py checks it against
transformers' CLIPImageProcessor. No dynamic tiling or thumbnail: V1-1 uses one 448 tile per image.
EXIF orientation is not applied (the card does not).

Does not own: the prompt (prompt.py), the vision model.
"""

from __future__ import annotations

import functools

import faulthandler
import io
import json
import math
import multiprocessing
import os
import re
import resource
import struct
import warnings
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats we decode; anything else (EPS, which shells out to Ghostscript, PSD, ...) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (camera JPEGs)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # width * height of one decoded image
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InvalidImage(ValueError):
    """Image bytes that cannot be used; the message says why."""


class InvalidVideo(ValueError):
    """Video bytes that cannot be used; the message says why."""


class PreprocessorConfig(NamedTuple):
    """preprocessor_config.json, the parts the V1-1 path uses (unpacks as (size, mean, std))."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _edge(value, name: str, path: str) -> int:
    # transformers writes sizes as an int or as {"shortest_edge": n} / {"height": n, "width": n}
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") == value.get("width") and isinstance(value.get("height"), int):
            return value["height"]
    raise ValueError(f"{path}: unsupported {name} {value!r} (expected a square size such as 448)")


def load_preprocessor_config(folder: str | os.PathLike) -> PreprocessorConfig:
    """Read preprocessor_config.json; V1-1's (CLIPImageProcessor, size = crop_size = 448) is expected.

    Raises ValueError (naming the field) for a config this module's fixed pipeline would not reproduce.
    """
    path = os.path.join(os.fspath(folder), "preprocessor_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing (the image mean/std come from it)") from None
    size = _edge(cfg.get("size", 448), "size", path)
    crop = _edge(cfg.get("crop_size", size), "crop_size", path)
    if crop != size:
        raise ValueError(f"{path}: crop_size {crop} != size {size}; only the square V1-1 pipeline is supported")
    for flag in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
        if cfg.get(flag, True) is not True:
            raise ValueError(f"{path}: {flag}={cfg[flag]!r} is not supported (V1-1 sets it true)")
    if cfg.get("resample", 3) != 3:
        raise ValueError(f"{path}: resample={cfg['resample']!r} is not supported (V1-1 uses 3, bicubic)")
    if not math.isclose(cfg.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"{path}: rescale_factor={cfg['rescale_factor']!r} is not supported (1/255)")
    mean = tuple(float(x) for x in cfg.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(x) for x in cfg.get("image_std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{path}: image_mean / image_std must be 3 numbers (std > 0), got {mean} / {std}")
    return PreprocessorConfig(size, mean, std)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read (PIL's lazy open): format and size known, no pixel decoded yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage("image data is empty")
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own check (2 * MAX_IMAGE_PIXELS), from the header
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(size.group(1)) if size else 0
        limit = max_pixels if pixels > max_pixels or not pixels else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise InvalidImage(f"image header says {pixels or 'too many'} pixels, above the limit of {limit} "
                           f"pixels (nothing was decoded)") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"image data is not a supported image ({len(data)} bytes; supported formats: "
                           f"{', '.join(ALLOWED_FORMATS)})") from None
    except Exception as e:  # a header PIL chokes on
        raise InvalidImage(f"image header is corrupt: {e}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImage(f"image is {width}x{height} = {width * height} pixels, above the limit of "
                           f"{max_pixels} pixels")
    return img


def image_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding a pixel; raises InvalidImage as
    decode_image does for data that is not a usable image header or is above max_pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _open(data, max_pixels).size


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> an RGB PIL image (`.convert('RGB')`; an animated GIF, PNG or WebP: its
    first frame, as the card's PIL `Image.open(...).convert('RGB')` does).

    Raises InvalidImage for empty, non-image, unsupported, corrupt or truncated data and for images
    above max_pixels (checked from the header, before any pixel is decoded).
    """
    with warnings.catch_warnings():
        # we enforce max_pixels ourselves; PIL's own warning threshold is not ours
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        try:
            img.seek(0)
            img.load()
            return img.convert("RGB")
        except Image.DecompressionBombError as e:
            raise InvalidImage(f"image is too large to decode ({e})") from None
        except Exception as e:  # truncated / corrupt data: OSError, SyntaxError, ValueError, ...
            raise InvalidImage(f"image data is corrupt or truncated ({img.format}: {e})") from None


def to_tile(img: Image.Image, size: int = 448) -> Image.Image:
    """The card's `.convert('RGB').resize((448, 448))` (PIL's default filter for RGB: BICUBIC). A tile
    resized again to its own size is an unchanged copy, so to_pixel_values of tiles gives the same values."""
    return img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def to_pixel_values(images: Sequence[Image.Image], size: int = 448, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, *, out: np.ndarray | None = None) -> np.ndarray:
    """RGB images -> (N, 3, size, size) float32: the card's resize then CLIPImageProcessor's arithmetic.

    out: a C-contiguous float32 array of that shape to write into (and return), such as a reused host
    buffer (internvl_serve/hostbuf.py); by default a new array."""
    shape = (len(images), 3, size, size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}, "
                         f"got {out.dtype} {out.shape}")
    # CLIPImageProcessor: shortest-edge resize and centre crop are no-ops at (size, size);
    # rescale: uint8 * (1/255) -> float32; normalize: float32 (x - mean) / std, channels last.
    # Each output value depends only on its byte and channel, so the arithmetic is done once for the 256
    # byte values of each channel (normalization_tables) and looked up by PIL's point() on each band:
    # the same bits, without numpy's take(), which first widens the uint8 indices to an int64 copy
    # (three 1.6 MB temporaries a tile, each a fresh mapping that page-faults in the preprocess stub,
    # serving/heap.py: 13.9 -> 9.2 ms a tile here with that setting, 5.2 -> 4.8 ms without).
    tables = normalization_tables(tuple(mean), tuple(std))
    for i, img in enumerate(images):
        tile = img if img.mode == "RGB" and img.size == (size, size) else to_tile(img, size)  # card: resize
        for c, band in enumerate(tile.split()):
            out[i, c] = np.asarray(band.point(tables[c], "F"))
    return out                                                                 # (N, 3, S, S)


@functools.lru_cache(maxsize=8)
def normalization_tables(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[float], ...]:
    """Per channel, CLIPImageProcessor's rescale then normalize of each of the 256 byte values: float32
    values as Python floats, PIL point()'s "F" tables (stored as float32, so the looked-up values keep
    their bits)."""
    x = (np.arange(256, dtype=np.uint8)[:, None] * (1 / 255)).astype(np.float32)  # (256, 1), as for pixels
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)  # (256, 3)
    return tuple(channel.tolist() for channel in x.T)


def get_frame_indices(bound: Sequence[float] | None, fps: float, max_frame: int, first_idx: int = 0,
                      num_segments: int = 32) -> list[int]:
    """The card's get_index: the middle frame of each of num_segments equal segments of [start, end].

    bound = (start_s, end_s) in seconds or None (the whole video); max_frame = len(video) - 1.
    """
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


# ---- video frame size from the container header (nothing decoded) ----------------------------------------
_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}
_MP4_VISUAL = {b"avc1", b"avc3", b"hvc1", b"hev1", b"mp4v", b"vp08", b"vp09", b"av01", b"jpeg", b"mjpa",
               b"mjpb", b"mjp2", b"s263", b"h263", b"apcn", b"apch", b"apcs", b"apco", b"ap4h", b"png "}


def _mp4_sizes(data: bytes, start: int, end: int, depth: int = 0):
    """(width, height) of every tkhd and visual stsd entry in the ISO-BMFF boxes of data[start:end]."""
    pos = start
    while pos + 8 <= end and depth < 8:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        body = pos + header
        if kind in _MP4_CONTAINERS:
            yield from _mp4_sizes(data, body, pos + size, depth + 1)
        elif kind == b"tkhd" and size >= header + 8:  # width, height: 16.16 fixed point, the box's last 8 bytes
            w, h = struct.unpack_from(">II", data, pos + size - 8)
            yield w >> 16, h >> 16
        elif kind == b"stsd" and size >= header + 8:
            entry, count = body + 8, struct.unpack_from(">I", data, body + 4)[0]
            for _ in range(min(count, 16)):
                if entry + 36 > pos + size:
                    break
                entry_size, fourcc = struct.unpack_from(">I4s", data, entry)
                if fourcc in _MP4_VISUAL:
                    yield struct.unpack_from(">HH", data, entry + 32)
                if entry_size < 8:
                    break
                entry += entry_size
        pos += size


def _avi_sizes(data: bytes):
    """(width, height) from an AVI's main header (avih) and its video streams' BITMAPINFOHEADER (strf)."""
    pos = data.find(b"avih")
    if 0 <= pos and pos + 48 <= len(data):
        yield struct.unpack_from("<II", data, pos + 8 + 32)
    pos = data.find(b"strf")
    while 0 <= pos and pos + 20 <= len(data):
        w, h = struct.unpack_from("<ii", data, pos + 12)
        yield abs(w), abs(h)
        pos = data.find(b"strf", pos + 4)


def video_frame_size(data: bytes) -> tuple[int, int] | None:
    """The largest frame size an AVI or MP4/MOV container's headers declare, read without decoding;
    None for other containers or when the headers name no size. Headers can lie: the decoded frames are
    checked again (sample_video_frames), under a memory cap."""
    try:
        if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
            sizes = list(_avi_sizes(data))
        elif data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"):
            sizes = list(_mp4_sizes(data, 0, len(data)))
        else:
            return None
    except struct.error:
        return None
    sizes = [(int(w), int(h)) for w, h in sizes if w > 0 and h > 0]
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def sample_video_frames(data: bytes | str | os.PathLike, num_segments: int = 8,
                        bound: Sequence[float] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                        max_total_pixels: int | None = None, resize_to: int | None = None,
                        isolate: bool = True, timeout_s: float = 120.0) -> list[Image.Image]:
    """Decode a video (bytes or a path) with decord and return num_segments RGB frames (card's get_index).

    Raises InvalidVideo for empty or undecodable data, a video without frames or frame rate, frames
    above max_pixels or num_segments frames above max_total_pixels (both checked from the container's
    header before any frame is decoded, where it is an AVI or MP4/MOV, and again on the decoded frames),
    and num_segments < 1. resize_to: each frame becomes the card's size x size tile (to_tile) as soon as
    it is decoded, so only one full-size frame is held at a time. decord (ffmpeg) can crash the whole
    process on some malformed files (a truncated AVI does), so by default it runs in a forked child
    process whose address space is capped (a frame larger than its header said cannot take the memory):
    a crash or a decode slower than timeout_s becomes InvalidVideo instead of taking the server down.
    """
    if num_segments < 1:
        raise InvalidVideo(f"num_segments must be >= 1, got {num_segments}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise InvalidVideo("video data is empty")
        data = bytes(data)
        declared = video_frame_size(data)
    else:
        data = os.fspath(data)
        if not os.path.isfile(data):
            raise InvalidVideo(f"video file {data!r} does not exist")
        declared = None
    if declared is not None:
        _check_frame_pixels(*declared, num_segments, max_pixels, max_total_pixels, " (from the header; nothing was decoded)")
    args = (data, num_segments, bound, max_pixels, max_total_pixels, resize_to)
    if isolate:  # a frame of max_pixels takes ~20 bytes a pixel at its peak inside decord and ffmpeg
        arrays = _run_isolated(_decode_video_frames, args, timeout_s, memory_bytes=24 * max_pixels + (256 << 20))
    else:
        arrays = _decode_video_frames(*args)
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def _check_frame_pixels(width: int, height: int, num_segments: int, max_pixels: int,
                        max_total_pixels: int | None, where: str = "") -> None:
    if width * height > max_pixels:
        raise InvalidVideo(f"video frames are {width}x{height}, above the limit of {max_pixels} pixels{where}")
    if max_total_pixels is not None and width * height * num_segments > max_total_pixels:
        raise InvalidVideo(f"{num_segments} video frames of {width}x{height} are {width * height * num_segments} "
                           f"pixels, above the request's limit of {max_total_pixels} pixels{where}")


def _decode_video_frames(data: bytes | str, num_segments: int, bound: Sequence[float] | None,
                         max_pixels: int, max_total_pixels: int | None = None,
                         resize_to: int | None = None) -> list[np.ndarray]:
    """The card's load_video frame loop: decord VideoReader(ctx=cpu(0), num_threads=1), vr[i] per index."""
    try:
        from decord import VideoReader, cpu
    except ImportError as e:  # the optional 'video' extra
        raise RuntimeError("video input needs the decord package (pip install decord)") from e
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        vr = VideoReader(source, ctx=cpu(0), num_threads=1)  # reads the container; decodes no frame
        num_frames = len(vr)
        fps = float(vr.get_avg_fps())
    except Exception as e:  # decord raises DECORDError, RuntimeError or AssertionError
        raise InvalidVideo(f"video data could not be decoded ({type(e).__name__}: {str(e)[:200]})") from None
    if num_frames < 1:
        raise InvalidVideo("video has no frames")
    if not math.isfinite(fps) or fps <= 0:
        raise InvalidVideo(f"video reports no usable frame rate ({fps})")
    frames = []
    for index in get_frame_indices(bound, fps, num_frames - 1, first_idx=0, num_segments=num_segments):
        try:
            array = vr[index].asnumpy()                                            # (H, W, 3) uint8
        except Exception as e:
            raise InvalidVideo(f"video frame {index} could not be decoded "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
        _check_frame_pixels(array.shape[1], array.shape[0], num_segments, max_pixels, max_total_pixels)
        if resize_to is not None:
            array = np.asarray(to_tile(Image.fromarray(array), resize_to))
        frames.append(array)
    return frames


def _child_main(conn, fn, args, memory_bytes: int | None = None) -> None:
    faulthandler.disable()  # a decoder crash is expected and reported by the parent, not dumped here
    try:
        if memory_bytes is not None:  # this child's address space: what it has now plus memory_bytes
            with open("/proc/self/status") as f:
                vm_size = int(f.read().split("VmSize:")[1].split()[0]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm_size + memory_bytes, resource.RLIM_INFINITY))
        conn.send(("ok", fn(*args)))
    except InvalidVideo as e:
        conn.send(("invalid", str(e)))
    except MemoryError:
        conn.send(("invalid", "video frames are larger than their header said (the decoder ran out of its memory)"))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _run_isolated(fn, args: tuple, timeout_s: float, memory_bytes: int | None = None):
    """fn(*args) in a forked child (its address space capped at memory_bytes more than the fork's); its
    death or a timeout becomes InvalidVideo. (fork: no re-import, no interpreter executable needed, the
    argument bytes are shared copy-on-write.)"""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(sender, fn, args, memory_bytes), daemon=True,
                        name="video-decode")
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise InvalidVideo(f"video decoding took longer than {timeout_s:g} s")
        try:
            status, payload = receiver.recv()
        except EOFError:
            child.join(5)
            raise InvalidVideo(f"the video decoder crashed on this data (exit code {child.exitcode}): the file is "
                               f"corrupt, truncated or unsupported") from None
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    if status == "invalid":
        raise InvalidVideo(payload)
    if status == "error":
        raise RuntimeError(f"video decoding failed: {payload}")
    return payload
