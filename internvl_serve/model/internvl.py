"""InternVLChatModel: vision_model + mlp1 + language_model, named as the checkpoint's key prefixes.

Owns: extract_feature (ViT hidden_states[select_layer] -> drop CLS -> grid -> pixel_shuffle ->
mlp1), the splice of image embeddings into the prompt's <IMG_CONTEXT> positions (`embed`), the
vision-only module the serving vision model loads (`VisionEncoder`) and `build_model` (any of the
three, on the meta device by default, for the checkpoint loader to fill).

Does not own: generation (reference.py, engine/), prompts and tokenizer, checkpoint I/O.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..config import InternVLChatConfig
from .language import build_language_model
from .projector import Projector, pixel_shuffle
from .vision import InternVisionModel

PARTS = ("vision", "language")


def extract_feature(vision_model: InternVisionModel, mlp1: nn.Module, config: InternVLChatConfig,
                    pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N, num_image_token, llm_hidden) image embeddings (256 tokens at S=448)."""
    feats = vision_model(pixel_values, select_layer=config.select_layer)   # (N, 1 + G*G, C)
    feats = feats[:, 1:, :]                                                 # drop CLS: (N, G*G, C)
    n, t, c = feats.shape
    g = int(round(t ** 0.5))
    feats = feats.reshape(n, g, g, c)                                       # (N, G, G, C)
    feats = pixel_shuffle(feats, config.downsample_ratio, config.ps_version)  # (N, G/2, G/2, 4C)
    feats = feats.reshape(n, -1, feats.shape[-1])                           # (N, G*G/4, 4C)
    return mlp1(feats)                                                      # (N, G*G/4, H)


def splice_image_embeds(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                        img_context_token_id: int) -> torch.Tensor:
    """Replace, in order, the rows of (B, T, H) whose id is <IMG_CONTEXT> by image_embeds (K, H).

    As the official generate(): the count of context positions must equal the image rows.
    """
    sel = input_ids == img_context_token_id                                 # (B, T)
    rows = image_embeds.reshape(-1, inputs_embeds.shape[-1])
    if int(sel.sum()) != rows.shape[0]:
        raise ValueError(f"the prompt holds {int(sel.sum())} <IMG_CONTEXT> tokens but {rows.shape[0]} "
                         f"image embedding rows were given")
    return inputs_embeds.masked_scatter(sel.unsqueeze(-1), rows.to(inputs_embeds.dtype))


class VisionEncoder(nn.Module):
    """vision_model + mlp1 only (the keys vision_model.* and mlp1.*): what the vision Triton model runs."""

    def __init__(self, config: InternVLChatConfig):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision_config)
        self.mlp1 = Projector(config.vision_config.hidden_size, config.llm_config.hidden_size, config.scale)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (N, 3, 448, 448) -> (N, 256, llm_hidden)
        return extract_feature(self.vision_model, self.mlp1, self.config, pixel_values)


class InternVLChatModel(nn.Module):
    """The whole model; attribute names are the checkpoint's prefixes (vision_model., mlp1., language_model.)."""

    def __init__(self, config: InternVLChatConfig, *, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision_config)
        self.mlp1 = Projector(config.vision_config.hidden_size, config.llm_config.hidden_size, config.scale)
        self.language_model = build_language_model(config.llm_config, attn_implementation=attn_implementation)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (N, 3, 448, 448) -> (N, 256, llm_hidden)
        return extract_feature(self.vision_model, self.mlp1, self.config, pixel_values)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None, *,
              img_context_token_id: int | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) input embeddings with image_embeds spliced into the <IMG_CONTEXT> rows."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if image_embeds is None:
            return embeds
        if img_context_token_id is None:
            raise ValueError("img_context_token_id is required with image_embeds")
        return splice_image_embeds(embeds, input_ids, image_embeds, img_context_token_id)


def build_model(config: InternVLChatConfig, *, parts: Iterable[str] = PARTS, device: torch.device | str = "meta",
                attn_implementation: str = "sdpa") -> nn.Module:
    """The module for `parts`, built on `device` (meta by default: no memory, weights assigned later).

    ("vision", "language") -> InternVLChatModel; ("vision",) -> VisionEncoder;
    ("language",) -> transformers LlamaForCausalLM (its keys lack the `language_model.` prefix).
    """
    parts = normalize_parts(parts)
    with torch.device(device):
        if parts == PARTS:
            return InternVLChatModel(config, attn_implementation=attn_implementation)
        if parts == ("vision",):
            return VisionEncoder(config)
        return build_language_model(config.llm_config, attn_implementation=attn_implementation)


def normalize_parts(parts: Iterable[str]) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = (parts,)
    given = set(parts)
    unknown = given - set(PARTS)
    if unknown or not given:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)}")
    return tuple(p for p in PARTS if p in given)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["InternVLChatModel", "VisionEncoder", "build_model", "extract_feature", "splice_image_embeds",
           "count_parameters", "normalize_parts", "PARTS"]
