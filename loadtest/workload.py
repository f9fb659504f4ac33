"""The load tests' workload: which chats to send, with what media, and how one streamed answer is
timed and checked. Shared by `locustfile.py` (Locust, gevent) and `soak.py` (threads).

Owns: the task kinds and their weights, the command-line options of the workload (both tools accept
the same ones), the test media (an image folder or deterministic generated images; a video file or a
generated Motion-JPEG AVI), and `Workload.run`: one task -> one `RequestResult` per streamed request
(a multi-round chat gives one per round), each timed and checked.
Does not own: the transport (`internvl_client`) or the reporting (Locust's request events, the soak's
time series). Needs numpy and pillow only to generate media.

Timings of one request (all measured on the client, `time.perf_counter`):
- total: from the call until the stream's final response;
- TTFT: until the first non-empty text delta (the server sends one response per text delta);
- ITL: the mean inter-token latency of the request, (total - TTFT) / (output tokens - 1); one value
  per request, none for a one-token answer;
- tokens/s: output tokens / total.
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl_client import ChatSession, Client, separate_images_question

KINDS = ("text", "image", "images_combined", "images_separate", "video", "multi_round")
DEFAULT_WEIGHTS = {"text": 3, "image": 3, "images_combined": 1, "images_separate": 1, "video": 1, "multi_round": 1}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
FINISH_REASONS = ("stop", "length")

QUESTIONS = {
    "text": ["Hello, who are you?", "Tell me a story about a lighthouse.", "What is the capital of France?"],
    "image": ["Describe the image.", "What is in the image?", "What colours do you see?"],
    "images_combined": ["Describe these images in detail.", "What do these images have in common?"],
    "images_separate": ["What are the similarities and differences between these images?"],
    "video": ["What is happening in the video?", "Describe this video in detail."],
    "multi_round": ["Describe the image in detail.", "What colours are in it?", "Summarise it in one sentence."],
}


# ---- options -------------------------------------------------------------------------------
def add_workload_arguments(parser: Any) -> None:
    """The workload's options (argparse or Locust's configargparse parser)."""
    for kind in KINDS:
        parser.add_argument(f"--weight-{kind.replace('_', '-')}", type=float, default=DEFAULT_WEIGHTS[kind],
                            help=f"relative weight of '{kind}' chats in the mix (0: never)")
    parser.add_argument("--image-dir", default="", help="send images from this folder (default: generated)")
    parser.add_argument("--num-images", type=int, default=8, help="how many images to generate")
    parser.add_argument("--image-size", type=int, default=448, help="side of the generated images, pixels")
    parser.add_argument("--images-per-request", type=int, default=2, help="images of the several-images chats")
    parser.add_argument("--video", default="", help="send this video file (default: a generated MJPEG AVI)")
    parser.add_argument("--video-frames", type=int, default=16, help="frames of the generated video")
    parser.add_argument("--num-segments", type=int, default=8, help="frames the server samples from the video")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a multi-round chat")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--ignore-eos", action="store_true", default=False,
                        help="always generate --max-new-tokens tokens (benchmark mode)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="deadline of one request, seconds")


def weights_from_options(options: Any) -> dict[str, float]:
    """{kind: weight} from the --weight-* options; raises ValueError when they make no mix."""
    weights = {kind: float(getattr(options, f"weight_{kind}")) for kind in KINDS}
    negative = [k for k, w in weights.items() if w < 0]
    if negative:
        raise ValueError(f"weights must be >= 0: {', '.join(negative)}")
    if sum(weights.values()) <= 0:
        raise ValueError("every --weight-* is 0: nothing to send")
    return weights


def generation_config(options: Any) -> dict[str, Any]:
    """The card's generation_config words for the SDK."""
    if options.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {options.max_new_tokens}")
    config: dict[str, Any] = dict(max_new_tokens=options.max_new_tokens)
    if options.temperature > 0:
        config.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
    if options.ignore_eos:
        config["ignore_eos"] = True
    return config


def parse_url(host: str) -> tuple[str, bool]:
    """`grpc://h:p`, `grpcs://h:p` or `h:p` -> (`h:p`, ssl). HTTP URLs are refused: this is gRPC."""
    host = (host or "").strip().rstrip("/")
    ssl = False
    if host.startswith("grpcs://"):
        host, ssl = host[len("grpcs://"):], True
    elif host.startswith("grpc://"):
        host = host[len("grpc://"):]
    elif "://" in host:
        raise ValueError(f"{host!r}: give the server's gRPC address (grpc://HOST:PORT or HOST:PORT)")
    if not host or ":" not in host:
        raise ValueError(f"{host!r}: give HOST:PORT of the server's gRPC endpoint (e.g. 127.0.0.1:8001)")
    return host, ssl


# ---- media ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Media:
    images: list[bytes]
    video: bytes


def load_media(options: Any) -> Media:
    """Images from --image-dir (sent as they are, unchecked) or generated; the video from --video or
    generated."""
    if options.image_dir:
        folder = Path(options.image_dir)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise ValueError(f"--image-dir {folder}: no {'/'.join(IMAGE_SUFFIXES)} files there")
        images = [p.read_bytes() for p in files]
    else:
        images = generated_images(options.num_images, options.image_size)
    video = Path(options.video).read_bytes() if options.video else generated_video(options.video_frames)
    return Media(images=images, video=video)


def _picture(seed: int, width: int, height: int):
    """A deterministic RGB picture (smooth gradients and a few rectangles: compresses like a photo)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    rgb = [127 + 120 * np.sin(x / width * 3 * (c + 1) + y / height * 2 + phase[c]) for c in range(3)]
    img = Image.fromarray(np.stack(rgb, -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(4, width // 3 + 5)), y0 + int(rng.integers(4, height // 3 + 5))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def _jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generated_images(count: int, size: int = 448) -> list[bytes]:
    """`count` different deterministic JPEGs of size x size pixels."""
    if count < 1 or size < 16:
        raise ValueError(f"need --num-images >= 1 and --image-size >= 16, got {count} and {size}")
    return [_jpeg(_picture(1000 + i, size, size)) for i in range(count)]


def generated_video(frames: int = 16, size: int = 224, fps: int = 4) -> bytes:
    """A deterministic Motion-JPEG AVI of `frames` frames (decord, hence the server, decodes it)."""
    if frames < 1:
        raise ValueError(f"--video-frames must be >= 1, got {frames}")
    return mjpeg_avi([_jpeg(_picture(2000 + i, size, size)) for i in range(frames)], size, size, fps)


def mjpeg_avi(jpegs: list[bytes], width: int, height: int, fps: int) -> bytes:
    """An AVI (RIFF) file holding one video stream whose frames are the given JPEGs (codec MJPG)."""

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def listing(kind: bytes, data: bytes) -> bytes:
        return chunk(b"LIST", kind + data)

    n, biggest = len(jpegs), max(len(j) for j in jpegs)
    # main header: usec/frame, max bytes/s, padding, flags (HASINDEX), frames, initial, streams, buffer, w, h
    avih = struct.pack("<10I16x", 1_000_000 // fps, biggest * fps, 0, 0x10, n, 0, 1, biggest, width, height)
    # stream header: type, handler, flags, priority, language, initial, scale, rate, start, length, buffer,
    # quality, sample size, frame rectangle
    strh = struct.pack("<4s4sIHHIIIIIIiI4h", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, n, biggest, -1, 0,
                       0, 0, width, height)
    # BITMAPINFOHEADER
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    header = listing(b"hdrl", chunk(b"avih", avih) + listing(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    frames = [chunk(b"00dc", j) for j in jpegs]
    index, offset = [], 4  # idx1 offsets count from the 'movi' fourcc
    for jpeg, framed in zip(jpegs, frames):
        index.append(struct.pack("<4sIII", b"00dc", 0x10, offset, len(jpeg)))  # 0x10: key frame
        offset += len(framed)
    body = b"AVI " + header + listing(b"movi", b"".join(frames)) + chunk(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---- one request -----------------------------------------------------------------------------
class BadAnswerError(Exception):
    """The stream ended without an error but the answer is not a well-formed answer."""


@dataclass
class RequestResult:
    kind: str
    total_s: float
    ttft_s: float | None = None
    itl_s: float | None = None  # mean over the request's tokens after the first text
    output_tokens: int = 0
    error: BaseException | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.total_s if self.total_s > 0 else 0.0


def check_answer(response: Any, streamed_text: str, config: dict[str, Any]) -> None:
    """Raise BadAnswerError unless `response` (a ChatResponse) is a complete, consistent answer."""
    if response is None:
        raise BadAnswerError("the stream ended without a final response")
    if not response.text.strip():
        raise BadAnswerError(f"empty answer (finish_reason {response.finish_reason!r})")
    if streamed_text != response.text:
        raise BadAnswerError("the streamed deltas do not add up to the answer")
    if response.finish_reason not in FINISH_REASONS:
        raise BadAnswerError(f"finish_reason {response.finish_reason!r}, expected one of {FINISH_REASONS}")
    n, limit = response.num_output_tokens, config["max_new_tokens"]
    if not isinstance(n, int) or not 1 <= n <= limit:
        raise BadAnswerError(f"num_output_tokens {n!r}, expected 1..{limit}")
    if (response.finish_reason == "length" or config.get("ignore_eos")) and n != limit:
        raise BadAnswerError(f"finish_reason {response.finish_reason!r} after {n} of {limit} tokens")
    if not isinstance(response.num_input_tokens, int) or response.num_input_tokens < 1:
        raise BadAnswerError(f"num_input_tokens {response.num_input_tokens!r}")


class InFlight:
    """Counts streams between their start and their end; `peak` is the most that were receiving
    tokens at once (sampled when a stream's first text arrives). Thread- and greenlet-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        with self._lock:
            self.now += 1

    def first_text(self) -> None:
        with self._lock:
            self.peak = max(self.peak, self.now)

    def exit(self) -> None:
        with self._lock:
            self.now -= 1


def timed_stream(kind: str, open_stream: Callable[[], Any], final_response: Callable[[Any], Any],
                 config: dict[str, Any], in_flight: InFlight | None = None) -> RequestResult:
    """Stream one answer, timing it; any failure (raised, or a malformed answer) lands in `.error`."""
    in_flight = in_flight or InFlight()
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    in_flight.enter()
    try:
        stream = open_stream()
        for delta in stream:
            if first is None and delta:
                first = time.perf_counter()
                in_flight.first_text()
            parts.append(delta)
        end = time.perf_counter()
        response = final_response(stream)
        check_answer(response, "".join(parts), config)
    except Exception as e:  # the SDK's errors, BadAnswerError, anything else: a failed request
        return RequestResult(kind, time.perf_counter() - start, error=e)
    finally:
        in_flight.exit()
    n = response.num_output_tokens
    itl = (end - first) / (n - 1) if n > 1 else None
    return RequestResult(kind, end - start, ttft_s=first - start, itl_s=itl, output_tokens=n)


class Workload:
    """Picks task kinds by weight and runs them through one `Client`."""

    def __init__(self, options: Any, media: Media, *, rng: random.Random | None = None,
                 in_flight: InFlight | None = None):
        self.weights = weights_from_options(options)
        self.config = generation_config(options)
        self.media = media
        self.per_request = max(2, min(options.images_per_request, len(media.images)))
        if len(media.images) < 2 and (self.weights["images_combined"] or self.weights["images_separate"]):
            raise ValueError("the several-images chats need at least 2 images")
        self.num_segments = options.num_segments
        self.rounds = max(1, options.rounds)
        self.rng = rng or random.Random()
        self.in_flight = in_flight or InFlight()

    def pick(self) -> str:
        kinds = [k for k in KINDS if self.weights[k] > 0]
        return self.rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]

    def run(self, client: Client, kind: str) -> Iterator[RequestResult]:
        """Run one task of `kind`; yields each request's result as it ends."""
        if kind == "multi_round":
            yield from self._conversation(client)
            return
        question = self.rng.choice(QUESTIONS[kind])
        kwargs: dict[str, Any] = dict(generation_config=self.config)
        if kind == "image":
            kwargs["images"] = [self.rng.choice(self.media.images)]
        elif kind == "images_combined":  # one <image> for all (the server prepends it)
            kwargs["images"] = self.rng.sample(self.media.images, self.per_request)
        elif kind == "images_separate":  # Image-i: <image> lines, one image each, said explicitly
            images = self.rng.sample(self.media.images, self.per_request)
            question = separate_images_question(question, len(images))
            kwargs.update(images=images, num_patches_list=[1] * len(images))
        elif kind == "video":
            kwargs.update(video=self.media.video, num_segments=self.num_segments)
        yield timed_stream(kind, lambda: client.stream(question, **kwargs), lambda s: s.response, self.config,
                           self.in_flight)

    def _conversation(self, client: Client) -> Iterator[RequestResult]:
        """`rounds` rounds about one image through ChatSession (history resent each round); stops at
        the first failed round, whose history would be missing."""
        session = ChatSession(client, images=[self.rng.choice(self.media.images)], generation_config=self.config)
        for i in range(self.rounds):
            before = session.last_response
            question = QUESTIONS["multi_round"][i % len(QUESTIONS["multi_round"])]
            result = timed_stream(
                "multi_round", lambda: session.ask_stream(question),
                lambda _: session.last_response if session.last_response is not before else None,
                self.config, self.in_flight)
            yield result
            if result.error is not None:
                return


def options_namespace(**overrides: Any) -> argparse.Namespace:
    """The workload's default options, with overrides (for code that does not parse a command line)."""
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    options = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(options, key):
            raise AttributeError(f"no workload option {key!r}")
        setattr(options, key, value)
    return options
