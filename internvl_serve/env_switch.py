"""On/off switches read from the environment (INTERNVL_SERVE_FUSED_KERNELS, INTERNVL_PREFILL_KERNEL,
INTERNVL_SERVE_DECODE_PARTITIONS): one reading of their values for all of them.

Owns: `env_switch`. Does not own: the switches' names or what they switch (each beside its code).
"""

from __future__ import annotations

import os

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def env_switch(name: str) -> bool | None:
    """True for 1 / true / yes / on, False for 0 / false / no / off (any case, spaces trimmed), None when
    the variable is unset or empty (the caller's default). Anything else raises ValueError naming the
    variable: a misspelt value must not silently keep the default."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"{name} must be one of {', '.join(ON + OFF)} (or unset), got {os.environ[name]!r}")
