"""Robustness fixtures: the tiny checkpoint, the card's answers on it (the oracle), and real tritonservers
(robustness_helpers.running_server: the launcher's TritonServer on free 127.0.0.1 ports, always stopped).
Each module starts its own servers, one at a time: a module's server is stopped before the next starts."""
from __future__ import annotations

import threading

import pytest
import torch


@pytest.fixture(scope="session")
def oracle(tiny_checkpoint):
    """chat(question, images, max_tokens=...) -> the card's answer (reference.chat, greedy) on the tiny
    checkpoint, computed in the test process."""
    from internvl_serve import reference
    from internvl_serve.checkpoint import load_model
    from internvl_serve.imageproc import load_preprocessor_config
    from internvl_serve.tokenizer import load_tokenizer

    from robustness_helpers import MAX_TOKENS

    model = load_model(tiny_checkpoint, dtype=torch.float32, parts=("vision", "language"), progress=False)
    tokenizer = load_tokenizer(tiny_checkpoint)
    preprocessor = load_preprocessor_config(tiny_checkpoint)
    lock = threading.Lock()
    cache: dict = {}

    def chat(question, images=(), *, max_tokens=MAX_TOKENS):
        key = (question, tuple(images), max_tokens)
        if key not in cache:
            pixel_values = torch.cat([reference.load_image(b, preprocessor) for b in images]) if images else None
            with lock, torch.inference_mode():
                cache[key] = reference.chat(model, tokenizer, pixel_values, question,
                                            dict(max_new_tokens=max_tokens, do_sample=False))
        return cache[key]

    return chat
