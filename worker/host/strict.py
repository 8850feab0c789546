"""Strict conversion of setting values: one cattrs converter whose hooks take ``"false"``
as false and refuse ``"3.5"`` as an int, so a setting from the environment (a string)
and one from a TOML file (typed) are held to the same rules (``settings.py``)."""

from __future__ import annotations

import re
from typing import Any, Final

import cattrs

_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off"}
converter = cattrs.Converter()


def _to_bool(value: Any, _: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _to_int(value: Any, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError("expected an integer")


def _to_float(value: Any, _: type) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError("expected a number")


def _to_str(value: Any, _: type) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("expected a string")


def _to_strs(value: Any, _: type) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("expected a list of strings")


converter.register_structure_hook(bool, _to_bool)
converter.register_structure_hook(int, _to_int)
converter.register_structure_hook(float, _to_float)
converter.register_structure_hook(str, _to_str)
converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _to_strs)
