"""A stand-in for a structlog logger in unit tests: what was said, as (event, fields)."""

from __future__ import annotations

from typing import Any


class Said:
    """Replaces ``module.log`` (``monkeypatch.setattr(module, "log", Said())``), or is
    given where a logger is passed (a run's handle, its output)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    warning = error = debug = exception = info

    def of(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]

    def lines(self, stream: str | None = None) -> list[str]:
        """The run's output lines that were logged (of one stream, or both)."""
        return [f["line"] for f in self.of("run.output") if stream is None or f["stream"] == stream]

    def dropped(self) -> list[dict[str, Any]]:
        return self.of("run.output_dropped")
