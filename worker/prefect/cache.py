"""API reads reused for a while, with concurrent misses of one key sharing one request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

DEPLOYMENT_TTL: Final = 10.0
FLOW_TTL: Final = 300.0
"""Seconds a deployment / flow read is reused: a burst of runs of one deployment reads it
once; an edited deployment is seen within DEPLOYMENT_TTL (a flow's name never changes)."""
MAX_ENTRIES: Final = 1024


@attrs.define
class ReadCache:
    """API reads reused for a while, with concurrent misses of one key sharing one request."""

    _values: dict[tuple[str, str], tuple[float, Any]] = attrs.Factory(dict)
    _inflight: dict[tuple[str, str], trio.Event] = attrs.Factory(dict)

    async def get(self, key: tuple[str, str], ttl: float, fetch: Callable[[], Awaitable[Any]]) -> Any:
        while True:
            hit = self._values.get(key)
            if hit is not None and hit[0] > trio.current_time():
                return hit[1]
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()  # someone is fetching it: use their answer (or retry theirs)
        done = self._inflight[key] = trio.Event()
        try:
            value = await fetch()
            self._values[key] = (trio.current_time() + ttl, value)
            if len(self._values) > MAX_ENTRIES:
                self._values.pop(next(iter(self._values)))
            return value
        finally:
            del self._inflight[key]
            done.set()
