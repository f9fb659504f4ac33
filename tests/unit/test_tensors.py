"""serving/tensors.read_inputs (shapes checked before any array is read) and the vision model's
per-request checks (serving/vision.request_tiles): the limits of the ensemble for direct callers."""
from __future__ import annotations

import numpy as np
import pytest

from internvl_serve.serving.contract import CHAT_INPUTS, GENERATION_INPUTS, LLM_INPUTS, InvalidInput, ServingLimits
from internvl_serve.serving.tensors import MAX_ELEMENTS, check_shape, read_inputs
from internvl_serve.serving.vision import VISION_PIXEL_VALUES, request_tiles


class FakeTensor:
    """What the Python backend hands an adapter: a name, a shape, and an array only on request."""

    def __init__(self, name, shape, array=None):
        self._name, self._shape, self._array = name, list(shape), array
        self.read = False

    def name(self):
        return self._name

    def shape(self):
        return self._shape

    def as_numpy(self):
        self.read = True
        return self._array


CHAT = CHAT_INPUTS + GENERATION_INPUTS


def test_a_shape_past_2_to_the_64_is_refused_before_the_array_is_read():
    """[2**62 + 1] INT32 is 2**64 + 4 bytes: Triton 2.51's byte-size check wraps it to 4."""
    t = FakeTensor("num_patches_list", [2**62 + 1])
    with pytest.raises(InvalidInput, match=rf"^input 'num_patches_list' has shape \[{2**62 + 1}\] \({2**62 + 1} "
                                           rf"elements\); at most {MAX_ELEMENTS} elements allowed$"):
        read_inputs([t], CHAT)
    assert not t.read
    wide = FakeTensor("image_embeds", [1, 2**32, 2**32 + 1])  # wraps to 2**32 elements in 64 bits
    with pytest.raises(InvalidInput, match="input 'image_embeds' has shape"):
        read_inputs([wide], LLM_INPUTS)
    assert not wide.read


@pytest.mark.parametrize("name, shape, message", [
    ("text_input", [2], r"input 'text_input' must have shape \[1\], got \[2\]"),
    ("max_tokens", [1, 1], r"input 'max_tokens' must have shape \[1\], got \[1,1\]"),
    ("images", [-3], r"input 'images' must have shape \[-1\], got \[-3\]"),
    ("bogus", [1], "unexpected input 'bogus'"),
])
def test_shapes_are_checked_against_the_declared_dims(name, shape, message):
    t = FakeTensor(name, shape)
    with pytest.raises(InvalidInput, match=message):
        read_inputs([t], CHAT)
    assert not t.read


def test_good_inputs_come_back_as_their_arrays():
    ids = np.arange(5, dtype=np.int32)
    text = np.array([b"hi"], dtype=object)
    got = read_inputs([FakeTensor("input_ids", [5], ids), FakeTensor("text_input", [1], text)], LLM_INPUTS)
    assert got["input_ids"] is ids and got["text_input"] is text
    assert check_shape(VISION_PIXEL_VALUES, [1, 3, 3, 448, 448], batched=True) == (1, 3, 3, 448, 448)
    with pytest.raises(InvalidInput, match="at most 10 elements"):
        check_shape(CHAT[1], [11], max_elements=10)


def tiles(n, value=0.0):
    return np.full((1, n, 3, 448, 448), value, dtype=np.float32)


def test_the_vision_model_keeps_the_ensembles_tile_limit():
    """Called directly, the vision model took 64 tiles; the ensemble allows 12 images (or 12 frames)."""
    limits = ServingLimits()
    assert request_tiles(tiles(12), limits).shape == (12, 3, 448, 448)
    with pytest.raises(InvalidInput, match=r"^input 'pixel_values' holds 64 tiles; at most 12 allowed"):
        request_tiles(tiles(64), limits)
    assert request_tiles(tiles(20), ServingLimits(max_frames=20)).shape[0] == 20  # the larger of the two


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_the_vision_model_refuses_non_finite_pixels(value):
    p = tiles(2)
    p[0, 1, 2, 3, 4] = value
    with pytest.raises(InvalidInput, match="input 'pixel_values' must be finite"):
        request_tiles(p, ServingLimits())


def test_the_vision_model_takes_one_request_per_batch_row():
    with pytest.raises(InvalidInput, match=r"must have shape \[1,-1,3,448,448\] \(one request\), got \[2, 1, 3, 448, 448\]"):
        request_tiles(np.zeros((2, 1, 3, 448, 448), np.float32), ServingLimits())
