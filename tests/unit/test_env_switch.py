"""internvl_serve/env_switch.py: the one reading of the engine's on/off environment switches."""

import pytest

from internvl_serve.env_switch import env_switch

NAME = "INTERNVL_SERVE_TEST_SWITCH"


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), (" Yes ", True), ("ON", True),
    ("0", False), ("false", False), ("No", False), (" off", False),
    ("", None), ("  ", None),
])
def test_values(monkeypatch, value, expected):
    monkeypatch.setenv(NAME, value)
    assert env_switch(NAME) is expected


def test_unset_is_the_callers_default(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_switch(NAME) is None


@pytest.mark.parametrize("value", ["2", "enable", "of", "-1"])
def test_anything_else_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(NAME, value)
    with pytest.raises(ValueError, match=f"{NAME} must be one of 1, true, yes, on, 0, false, no, off .*got '{value}'"):
        env_switch(NAME)
