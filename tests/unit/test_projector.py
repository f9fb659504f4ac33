"""pixel_shuffle v1/v2 against a loop over the sheet's verified layout; extract_feature against a slow
reference (naive ViT hidden_states[select_layer] -> drop CLS -> loop pixel shuffle -> functional mlp1)."""

from __future__ import annotations

import pytest
import torch

from internvl_serve.model.internvl import InternVLChatModel, VisionEncoder
from internvl_serve.model.projector import Projector, pixel_shuffle
from slow_reference import randomize, ref_extract_feature, ref_pixel_shuffle, small_config


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("rows, cols", [(4, 4), (8, 8), (32, 32), (4, 6)])
def test_pixel_shuffle_matches_loop(ps_version, rows, cols):
    x = torch.randn(2, rows, cols, 5)
    got = pixel_shuffle(x, 0.5, ps_version)
    assert got.shape == ((2, cols // 2, rows // 2, 20) if ps_version == "v1" else (2, rows // 2, cols // 2, 20))
    assert torch.equal(got.reshape(2, -1, 20), ref_pixel_shuffle(x, ps_version))


def test_v1_is_v2_transposed():
    x = torch.randn(1, 8, 8, 3)
    assert torch.equal(pixel_shuffle(x, 0.5, "v1").transpose(1, 2), pixel_shuffle(x, 0.5, "v2"))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(x, 0.5, "v3")


def test_projector_layout():
    mlp1 = Projector(32, 48)
    assert [k for k in mlp1.state_dict()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert mlp1[0].normalized_shape == (128,) and mlp1[0].eps == 1e-5
    assert isinstance(mlp1[2], torch.nn.GELU) and mlp1[2].approximate == "none"


@pytest.mark.parametrize("ps_version, select_layer", [("v1", -2), ("v2", -1), ("v1", 1)])
def test_extract_feature_matches_slow_reference(ps_version, select_layer):
    config = small_config(ps_version=ps_version, select_layer=select_layer)
    torch.manual_seed(0)
    encoder = randomize(VisionEncoder(config))
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got = encoder(pixels)
        want = ref_extract_feature(encoder, config, pixels)
    assert got.shape == (2, config.num_image_token, 48) == (2, 16, 48)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    full = InternVLChatModel(config)
    full.load_state_dict(encoder.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(full.extract_feature(pixels), got)
