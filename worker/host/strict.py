"""Strict setting values: one cattrs converter whose hooks take ``"false"`` as false and
refuse ``"3.5"`` as an int, so a setting from the environment (a string) and one from a
TOML file (typed) are held to the same rules, and the validators of the values
(``settings.py`` names them per setting). A ``ValueError`` says what is accepted."""

from __future__ import annotations

import re
from typing import Any, Final

import attrs
import cattrs

from worker.rules.runlimits import PARSERS

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


def positive(inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError("must be greater than 0")


def port(inst: Any, attr: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")


def worker_name(inst: Any, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and ("/" in value or "%" in value or not value.strip()):
        raise ValueError("a worker name must be non-empty and contain neither '/' nor '%'")


def log_format(inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
    if value not in ("auto", "console", "json", "journald"):
        raise ValueError("must be one of 'auto', 'console', 'json', 'journald'")


def crash_or_reschedule(inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
    if value not in ("crash", "reschedule"):
        raise ValueError("must be 'crash' or 'reschedule'")


def run_limit(inst: Any, attr: attrs.Attribute[Any], value: str | None) -> None:
    PARSERS[attr.name.removeprefix("run_")](value)  # ValueError says what is accepted


def not_negative(inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError("must be 0 (off) or more")


def memory_reserve(inst: Any, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        from worker.rules.admission import parse_reserve

        parse_reserve(value)
