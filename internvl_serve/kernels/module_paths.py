"""Where a model's swappable modules sit, for the module swaps (fp8_linear.quantize_linears_fp8_,
decode_linear.use_triton_decode_linears_): `modules_at(blocks, paths)` yields, for each dotted path in
each block, the path, the module's parent, its attribute name there and the module, so the caller can
setattr a replacement."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn


def modules_at(blocks: Iterable[nn.Module], paths: Iterable[str]) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    paths = tuple(paths)
    for block in blocks:
        for path in paths:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            yield path, parent, name, getattr(parent, name)
