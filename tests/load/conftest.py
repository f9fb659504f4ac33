"""The load-test tier: loadtest/ on sys.path (the tiny checkpoint and the per-module tritonserver are
tests/conftest.py's)."""
from __future__ import annotations

import loadtest_helpers  # noqa: F401  (puts loadtest/ on sys.path)
