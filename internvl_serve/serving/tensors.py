"""Reading a Python-backend request's input tensors: the shape is checked before the array is touched.

Owns: `read_inputs`, the one way every adapter (preprocess, vision, llm; reusable by the BLS model) turns a
request's input tensors into numpy arrays. Each tensor's shape (`Tensor.shape()`, a list of Python
ints) is checked against the model's declared TensorSpec (rank, fixed dims) and its element count,
computed exactly (no 64-bit overflow), against a limit, before `as_numpy()` is called, so an input that
is larger than the contract allows is refused (InvalidInput, naming the input) before any copy,
reshape or conversion of it is made.

Does not own: the specs (contract.py), Triton itself (anything with `name()`, `shape()` and `as_numpy()`
works, so it is unit-tested without Triton). What it cannot catch: Triton 2.51's Python stub builds a
numpy view of every numeric input when it loads the request, before `execute()` runs; a shape whose
byte count wraps past 2**64 (Triton core's byte-size check overflows) makes numpy raise there and the
stub dies with it. docs/contract.md "Limits" says so.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Protocol

import numpy as np

from internvl_serve.serving.contract import InvalidInput, TensorSpec

# Any input with a variable dim holds at most this many elements unless a tighter limit is given: 12
# images of V1-1 embeddings are 12 * 256 * 5120 = 15.7 M floats; pixel values of 12 tiles 7.2 M.
MAX_ELEMENTS = 1 << 25


class TensorLike(Protocol):
    def name(self) -> str: ...
    def shape(self) -> list[int]: ...
    def as_numpy(self) -> np.ndarray: ...


def _shape_text(dims) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def check_shape(spec: TensorSpec, shape: Iterable[int], *, batched: bool = False,
                max_elements: int | None = None) -> tuple[int, ...]:
    """`shape` as a tuple of ints after checking it against `spec` (a leading batch dim when `batched`)
    and the element limit; raises InvalidInput naming the input."""
    shape = tuple(int(d) for d in shape)
    dims = ((-1,) if batched else ()) + tuple(spec.dims)
    if (len(shape) != len(dims) or any(d < 0 for d in shape)
            or any(want != -1 and want != got for want, got in zip(dims, shape))):
        raise InvalidInput(f"input '{spec.name}' must have shape {_shape_text(dims)}, got {_shape_text(shape)}")
    count = math.prod(shape)  # Python ints: exact, whatever the dims
    limit = MAX_ELEMENTS if max_elements is None else max_elements
    if count > limit:
        raise InvalidInput(f"input '{spec.name}' has shape {_shape_text(shape)} ({count} elements); "
                           f"at most {limit} elements allowed")
    return shape


def read_inputs(tensors: Iterable[TensorLike], specs: Iterable[TensorSpec], *, batched: bool = False,
                max_elements: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """{name: array} of a request's inputs, each shape-checked (check_shape) before `as_numpy()`.

    specs: the model's inputs; an input without a spec is refused (Triton refuses it first when the
    config declares the same inputs). max_elements: per-input limits, tighter than MAX_ELEMENTS."""
    by_name = {s.name: s for s in specs}
    limits = max_elements or {}
    arrays = {}
    for tensor in tensors:
        name = tensor.name()
        spec = by_name.get(name)
        if spec is None:
            raise InvalidInput(f"unexpected input '{name}'; this model's inputs are {', '.join(sorted(by_name))}")
        check_shape(spec, tensor.shape(), batched=batched, max_elements=limits.get(name))
        arrays[name] = tensor.as_numpy()
    return arrays
