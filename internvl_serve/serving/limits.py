"""What a request may hold, and the error a refused input raises.

Owns: `ServingLimits` (per-request size limits: images, bytes, pixels, frames, history, stop words,
max_tokens; production defaults, each overridable by a config.pbtxt parameter of the same name) and
`InvalidInput` (the client's error: a message naming the tensor and what is allowed, `.input` its name).
Does not own: the tensor table (contract.py), reading a request's tensors against these limits
(parsing.py, vision.py, grpc_checks.py), or the sampling ranges (engine/sampling.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping


class InvalidInput(ValueError):
    """A request the client must fix; the message names the tensor and says what is allowed, and `input`
    holds the tensor's name where one input is at fault (callers read it, never the message)."""

    def __init__(self, message: str, input: str | None = None):
        super().__init__(message)
        self.input = input


@dataclass(frozen=True)
class ServingLimits:
    """Per-request size limits. Production defaults; each can be overridden by a config.pbtxt
    parameter of the same name (string value, a positive integer)."""

    max_images: int = 12  # 256 tokens each: 12 images use 3072 of V1-1's 4096-token context
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 36_000_000  # width * height after decoding (decompression bombs)
    # width * height summed over a request's images (or its num_segments video frames), from the headers,
    # before any is decoded: bounds one request's decoding time (~0.7 s per 36 MP) whatever the encoding
    max_request_pixels: int = 100_000_000
    max_video_bytes: int = 64 * 1024 * 1024
    max_frames: int = 12  # num_segments at most
    max_question_bytes: int = 32 * 1024
    max_history_bytes: int = 256 * 1024
    max_stop_words: int = 16
    max_request_bytes: int = 64 * 1024 * 1024  # all images (decoded from data URLs) + the video of one request
    max_output_tokens: int = 4096  # the largest max_tokens accepted (V1-1's context window)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "ServingLimits":
        """Defaults overridden by the keys of `parameters` that name a field; other keys are ignored."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in parameters:
                continue
            raw = str(parameters[f.name]).strip()
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value <= 0:
                raise ValueError(f"parameter {f.name!r} must be a positive integer, got {raw!r}")
            values[f.name] = value
        return cls(**values)
