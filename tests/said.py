"""A stand-in for a module's structlog logger in unit tests: what was said, as (event, fields)."""

from __future__ import annotations

from typing import Any


class Said:
    """Replaces ``module.log`` (``monkeypatch.setattr(module, "log", Said())``)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    warning = error = debug = exception = info

    def of(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.lines if name == event]
