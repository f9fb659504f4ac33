"""The preprocess service behind the `preprocess` Triton model: a ChatRequest -> prompt token ids and
pixel tiles, following the model card's chat().

Owns: decoding the images (or sampling the video's frames) within the request's pixel budget (checked from
the headers before anything is decoded; each image becomes its 448 tile before the next is decoded), the
card's placeholder rules (through
prompt.py), tokenizing the prompt, and refusing a prompt that does not fit the context window.
Pixel values go into a new array by default, or, for the Triton adapter, into reused host buffers
(`output_slot`: one per request of an execute, internvl_serve/hostbuf.py), because the adapter's malloc
setting (serving/heap.py) makes each new 2.4 MB-a-tile array a fresh mmap that faults in anew per request.
Does not own: parsing tensors (parsing.py), the template itself (prompt.py), pixel math (imageproc.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internvl_serve.config import InternVLChatConfig
from internvl_serve.hostbuf import HostBuffers
from internvl_serve.imageproc import (InvalidImage, InvalidVideo, decode_image, image_size, load_preprocessor_config,
                                     sample_video_frames, to_pixel_values, to_tile)
from internvl_serve.prompt import build_prompt, count_image_placeholders, resolve_num_patches_list, video_question
from internvl_serve.serving.contract import ChatRequest, InvalidInput, ServingLimits
from internvl_serve.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Preprocessed:
    input_ids: np.ndarray  # (T,) int32, <IMG_CONTEXT> * num_image_token per image, BOS first
    pixel_values: np.ndarray  # (N, 3, S, S) float32, N = images or frames (0 for text); output_slot: a reused view


class Preprocessor:
    def __init__(self, checkpoint: str | Path, limits: ServingLimits = ServingLimits()):
        self.config = InternVLChatConfig.from_pretrained(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        self.size, self.mean, self.std = load_preprocessor_config(checkpoint)
        self.limits = limits
        self.context_window = self.config.llm_config.max_position_embeddings
        self._buffers = HostBuffers()  # the pixel values of output_slot calls

    def __call__(self, request: ChatRequest, *, output_slot: int | None = None) -> Preprocessed:
        """The request's prompt ids and pixel tiles; raises InvalidInput (naming the input) for a bad one.

        output_slot: the pixel values are a view of that slot's reused buffer, valid until the next call
        with the same slot (it grows to the largest request seen: at most max_images or max_frames tiles,
        12 by default: 29 MB), for one caller at a time: the Triton adapter passes each request's
        index in its execute(), whose responses the Python backend copies to shared memory before the next
        execute. None (the default): a new array of the caller's own."""
        question, num_patches_list = request.question, request.num_patches_list
        if request.video is not None:
            try:
                images = sample_video_frames(request.video, num_segments=request.num_segments,
                                             max_pixels=self.limits.max_image_pixels,
                                             max_total_pixels=self.limits.max_request_pixels, resize_to=self.size)
            except InvalidVideo as e:
                raise InvalidInput(f"input 'video': {e}") from None
            if not count_image_placeholders("", request.history):  # later rounds: the history has the frames
                question = video_question(question, len(images))
            num_patches_list = [1] * len(images)
        else:
            self._check_pixels(request.images)  # from the headers, before any image is decoded
            images = [self._decode(i, data) for i, data in enumerate(request.images)]
        question, num_patches_list = resolve_num_patches_list(question, request.history, len(images),
                                                              num_patches_list)
        prompt = build_prompt(question, request.history, num_patches_list, self.config.num_image_token,
                              self.config.template, system_message=self.config.system_message)
        ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.context_window:
            raise InvalidInput(f"the prompt is {len(ids)} tokens ({len(images)} images of "
                               f"{self.config.num_image_token} tokens each); the context window is "
                               f"{self.context_window}: send fewer images or a shorter history")
        out = None
        if output_slot is not None:
            out = self._buffers.get(f"pixel_values.{output_slot}", (len(images), 3, self.size, self.size),
                                    np.float32)
        pixel_values = to_pixel_values(images, size=self.size, mean=self.mean, std=self.std, out=out)  # (N, 3, S, S)
        return Preprocessed(np.asarray(ids, dtype=np.int32), pixel_values)

    def _check_pixels(self, images: list[bytes]) -> None:
        total = 0
        for index, data in enumerate(images):
            try:
                width, height = image_size(data, max_pixels=self.limits.max_image_pixels)
            except InvalidImage as e:
                raise InvalidInput(f"input 'images[{index}]': {e}") from None
            total += width * height
        if total > self.limits.max_request_pixels:
            raise InvalidInput(f"input 'images': the request's {len(images)} images are {total} pixels in total "
                               f"(from their headers), above the limit of {self.limits.max_request_pixels} pixels "
                               f"per request (nothing was decoded)")

    def _decode(self, index: int, data: bytes):
        """One image as the card's 448 tile: the full-size image is dropped before the next is decoded."""
        try:
            return to_tile(decode_image(data, max_pixels=self.limits.max_image_pixels), self.size)
        except InvalidImage as e:
            raise InvalidInput(f"input 'images[{index}]': {e}") from None


def client_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the request is wrong" (answered INVALID_ARG), not "the server failed"."""
    from internvl_serve.engine import InvalidRequest
    from internvl_serve.imageproc import InvalidImage, InvalidVideo
    from internvl_serve.prompt import PromptError

    return (InvalidInput, PromptError, InvalidImage, InvalidVideo, InvalidRequest)
