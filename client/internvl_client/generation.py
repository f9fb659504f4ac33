"""The model card's `generation_config` words -> the ensemble's generation inputs.

Owns: `to_contract_inputs(generation_config)`, which validates a card-style dict
(`dict(max_new_tokens=1024, do_sample=False)`) and returns the contract's tensor values
(`{"max_tokens": 1024, "temperature": 0.0}`). Does not own: building Triton tensors (request.py).

Semantics follow transformers' `generate`, which the card calls:
- `do_sample` defaults to False (greedy). Greedy is sent as temperature 0, the contract's greedy.
- With `do_sample=True`, `temperature` defaults to 1.0 (transformers' default) and `top_p` / `top_k`
  are sent; with greedy they are ignored, as transformers ignores them (it warns; so do we).
- `repetition_penalty` applies in both modes (transformers applies it to greedy search too).
- Keys outside the table raise ValueError naming the key: a silently ignored knob is a bug report later.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .contract_inputs import GENERATION

# The card's words this client understands: each declared input's card word (contract_inputs.py, generated
# from the server's declaration), plus do_sample, num_beams and `stop_words` (our name for `stop`).
DECLARED = {g["card"]: g for g in GENERATION if g["card"]}
SAMPLING_KEYS = ("temperature", "top_p", "top_k")  # honoured only with do_sample=True, as transformers does
KNOWN_KEYS = ("do_sample", "num_beams", *DECLARED, "stop_words")

def to_contract_inputs(generation_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a card-style generation_config and return contract input values.

    Only the keys the caller set are returned (the server's defaults apply to the rest), except that
    an explicit greedy choice (`do_sample=False`) is sent as `temperature=0.0`.

    >>> to_contract_inputs(dict(max_new_tokens=64, do_sample=False))
    {'max_tokens': 64, 'temperature': 0.0}
    """
    if generation_config is None:
        return {}
    if not isinstance(generation_config, Mapping):
        raise TypeError(f"generation_config must be a dict, got {type(generation_config).__name__}")
    for key in generation_config:
        if key not in KNOWN_KEYS:
            raise ValueError(
                f"generation_config key {key!r} is not supported; supported keys: {', '.join(KNOWN_KEYS)}"
            )
    cfg = dict(generation_config)
    out: dict[str, Any] = {}

    num_beams = cfg.get("num_beams")
    if num_beams is not None and _int(cfg, "num_beams", low=1) != 1:
        raise ValueError("generation_config['num_beams'] > 1: beam search is not supported by this server")

    do_sample = cfg.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"generation_config['do_sample'] must be True or False, got {do_sample!r}")
    sampling_keys = [k for k in SAMPLING_KEYS if cfg.get(k) is not None]

    if do_sample:
        temperature = _float(cfg, "temperature") if cfg.get("temperature") is not None else 1.0
        if not temperature > 0.0:
            raise ValueError(
                "generation_config['temperature'] must be > 0 with do_sample=True "
                "(use do_sample=False for greedy decoding)"
            )
        out["temperature"] = temperature
        for key in ("top_p", "top_k"):
            if cfg.get(key) is not None:
                out[DECLARED[key]["name"]] = _declared(cfg, key, DECLARED[key])
    else:
        if sampling_keys:
            warnings.warn(
                f"generation_config sets {', '.join(sampling_keys)} without do_sample=True: decoding is "
                "greedy and these are ignored (as in transformers' generate)",
                UserWarning,
                stacklevel=3,
            )
        if do_sample is False or sampling_keys:
            out["temperature"] = 0.0

    for key, g in DECLARED.items():  # the card words with no rule of their own: typed and range-checked
        if key in SAMPLING_KEYS or key == "stop" or cfg.get(key) is None:
            continue
        value = _declared(cfg, key, g)
        if value != g["default"] or g["datatype"] != "BOOL":
            out[g["name"]] = value

    if cfg.get("stop") is not None and cfg.get("stop_words") is not None:
        raise ValueError("generation_config: give 'stop' or 'stop_words', not both")
    stop_key = "stop" if cfg.get("stop") is not None else "stop_words"
    if cfg.get(stop_key) is not None:
        out["stop_words"] = _stop_words(cfg[stop_key], stop_key)
    return out


def _declared(cfg: Mapping[str, Any], key: str, g: Mapping[str, Any]) -> Any:
    """cfg[key] as the declared input's type, in its declared range."""
    if g["datatype"] == "BOOL":
        if not isinstance(cfg[key], bool):
            raise ValueError(f"generation_config[{key!r}] must be True or False, got {cfg[key]!r}")
        return cfg[key]
    value = _int(cfg, key) if g["datatype"] in ("INT32", "UINT64") else _float(cfg, key)
    low, high = g["low"], g["high"]
    if low is not None and (value <= low if g["low_open"] else value < low) or high is not None and value > high:
        bounds = "(" if g["low_open"] else "["
        bounds += f"{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"generation_config[{key!r}] must be in {bounds}, got {value}")
    return value


def _int(cfg: Mapping[str, Any], key: str, *, low: int | None = None) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int,)) and not _is_integral_float(value):
        raise ValueError(f"generation_config[{key!r}] must be an integer, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"generation_config[{key!r}] must be >= {low}, got {value}")
    return value


def _is_integral_float(value: Any) -> bool:
    try:
        import numpy as np

        if isinstance(value, np.integer):
            return True
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return isinstance(value, float) and value.is_integer()


def _float(cfg: Mapping[str, Any], key: str) -> float:
    value = cfg[key]
    if isinstance(value, bool):
        raise ValueError(f"generation_config[{key!r}] must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"generation_config[{key!r}] must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"generation_config[{key!r}] must be finite, got {value!r}")
    return number


def _stop_words(value: Any, key: str) -> list[str]:
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, Sequence) or isinstance(words, (bytes, bytearray)):
        raise ValueError(f"generation_config[{key!r}] must be a string or a list of strings")
    result = []
    for word in words:
        if not isinstance(word, str) or not word:
            raise ValueError(f"generation_config[{key!r}] must hold non-empty strings, got {word!r}")
        result.append(word)
    return result
