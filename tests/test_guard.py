"""``guard.forever``: a bug in one of the daemon's loops is logged and the loop started again."""

from __future__ import annotations

import itertools
import random

import pytest
import structlog
import trio
import trio.testing

from worker.service import guard


async def test_a_failing_loop_is_restarted_with_a_growing_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def loop() -> None:
        starts.append(trio.current_time())
        if len(starts) < 4:
            raise KeyError("an answer of a shape never seen")
        await trio.sleep_forever()

    with structlog.testing.capture_logs() as logs, trio.move_on_after(1000):
        await guard.forever("poll", loop, rng=random.Random(1))
    assert len(starts) == 4, "restarted after each failure, then kept running"
    pauses = [b - a for a, b in itertools.pairwise(starts)]
    assert pauses == sorted(pauses) and 0.7 < pauses[0] < 1.3, pauses
    failed = [e for e in logs if e["event"] == "loop.failed"]
    assert [e["failures"] for e in failed] == [1, 2, 3]
    assert all(e["log_level"] == "error" and e["loop"] == "poll" and e["exc_info"] for e in failed)
    assert "KeyError" in failed[0]["error"]


async def test_a_loop_that_returns_stays_ended_and_cancellation_passes() -> None:
    calls = 0

    async def done() -> None:
        nonlocal calls
        calls += 1

    await guard.forever("off", done)
    assert calls == 1

    async def waits() -> None:
        await trio.sleep_forever()

    with trio.CancelScope() as scope:
        scope.cancel()
        await guard.forever("cancelled", waits)
    assert scope.cancelled_caught


async def test_a_base_exception_is_not_swallowed() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await guard.forever("ctrl-c", interrupted)
