"""The daemon's policy for a bug in one of its own loops: log it, wait, start the loop again.

The API's errors are expected and each loop handles them itself (``outage.py``). This is
for what nobody expected: a ``KeyError`` on an answer of a shape never seen, a bug in a
table. Such an exception used to end the loops nursery and with it the daemon and every
run it supervised (issue 19). Now:

* the loop's traceback goes to the worker's log (ERROR, ``loop.failed``), with how many
  times in a row it failed;
* the loop is started again after a jittered backoff (1 s doubling to 60 s), so a bug
  that fires on every pass costs a line a minute, not a hot loop; a loop that then ran
  for ``RESET_AFTER`` seconds starts its count again;
* cancellation (the worker stopping) is never caught: ``trio.Cancelled`` is not an
  ``Exception``;
* a loop that returns on its own (turned off, or ``--once`` done) stays ended.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
import trio

from worker.rules.retry import backoff

log = structlog.get_logger("flow_worker")

RESET_AFTER: Final = 300.0
"""Seconds a restarted loop must run before its failures no longer count toward the backoff."""


async def forever(
    name: str, loop: Callable[..., Awaitable[Any]], *args: Any, rng: random.Random | None = None
) -> None:
    """Run ``loop(*args)``; after an unexpected exception, log it and run it again."""
    failures = 0
    while True:
        began = trio.current_time()
        try:
            await loop(*args)
            return
        except Exception as exc:
            if trio.current_time() - began > RESET_AFTER:
                failures = 0
            failures += 1
            delay = backoff(failures - 1, 1.0, 60.0, 0.2, rng=rng)
            with contextlib.suppress(Exception):  # (a log that cannot be written: the loop goes on)
                log.error(
                    "loop.failed",
                    loop=name,
                    error=f"{type(exc).__name__}: {exc}",
                    failures=failures,
                    restart_in=round(delay, 1),
                    exc_info=exc,
                )
        await trio.sleep(delay)
