"""The vision service on CUDA (skipped without a GPU): with its ViT blocks compiled (the default on CUDA)
the embeddings match the eager encoder's, for one image and for a batch (the dynamic-batch graph)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_serve.serving.vision import VisionService

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_compiled_blocks_give_the_eager_embeddings(tiny_checkpoint):
    eager = VisionService(tiny_checkpoint, device="cuda", dtype=torch.float32, compile="false", image_cache_mb=0)
    compiled = VisionService(tiny_checkpoint, device="cuda", dtype=torch.float32, image_cache_mb=0)
    assert compiled.compiled and not eager.compiled
    rng = np.random.default_rng(0)
    size = compiled.config.vision_config.image_size
    for batch in (1, 5):
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        (a,), (b,) = eager.embed([pixels]), compiled.embed([pixels])
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
