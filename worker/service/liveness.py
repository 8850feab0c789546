"""Liveness: whether the worker is alive enough to feed systemd's watchdog.

systemd restarts a ``Type=notify`` service whose ``WATCHDOG=1`` pings stop for
``WatchdogSec``. A restart cures a hung process, and nothing else: a worker whose API
hangs meets the same API after its restart, and its runs go through an adoption for
nothing. So the pings must mean "the worker's loops make bounded progress", not "a poll
ended lately" (the rule until issue 19, when one hung API call outlasted ``WatchdogSec``
and systemd restarted the worker in a loop).

The policy
----------
One task (:meth:`Liveness.watch`) sends ``WATCHDOG=1`` every ``WatchdogSec / 3`` if and
only if both hold:

(a) **The event loop is responsive.** The ping is sent by a trio task, so a process that
    is frozen (SIGSTOP), blocked in a system call, or starved by a task that never yields
    sends none: the pings stop by themselves and systemd restarts the worker.
(b) **Every loop that must make progress kept its word.** Such a loop (the poll loop and
    the heartbeat loop: without them the worker claims nothing and peers take its runs)
    says before each step how long that step may take at most, and the verdict
    (:func:`overdue`) is whether one is past it:

    * an API call: :data:`CALL_SECONDS` per call. Every call ends within the API's total
      deadline (``api.CALL_DEADLINE``), with an answer or an ``ApiError``: a hung API is
      an outage (a WARNING, and the ``STATUS=`` line says how long it has not answered:
      ``outage.py``, ``status.py``), not a hung worker;
    * a deliberate pause (the poll interval, a backoff, the heartbeat interval): its
      length plus :data:`SLACK`;
    * waiting for another loop, which is judged instead (the poll loop before the first
      sync), or for its restart after a bug (``guard.py``): not judged;
    * a loop that ended is forgotten: the poll loop when the drain begins (the heartbeat
      loop goes on, and with it the pings, until every run is reported).

A loop past its word is hung: an await that never returns, a deadlock, a deadline that
did not work. The pings stop, ``STATUS=`` names the loop and what it is stuck in, one
ERROR is logged, and systemd restarts the worker ``WatchdogSec`` later (the runs live
on: ``KillMode=process``, and the next worker adopts them). If the loop comes back
before that, the pings resume.

Why these numbers
-----------------
* A ping every third of ``WatchdogSec``: one ping may be missed, or two late (a loaded
  host), before systemd acts. sd_watchdog_enabled(3) suggests every half.
* :data:`CALL_SECONDS` = the API's total deadline (45 s) + 30 s: the margin covers the
  work around a call that ended on its deadline (judging the answer, the ledger, a late
  wake-up on a loaded host). It is a bound for bugs, not a timeout: nothing is cut
  short at it. The heartbeat's step is 4 calls (its sync makes up to 3, the fence check 1).
* :data:`SLACK` (10 s) for pauses: a sleep on a loaded host wakes late by milliseconds,
  not seconds; 10 s keeps a false "hung" far away.
* So with the shipped unit (``WatchdogSec=60s``), a poll stuck in an await that never
  returns is restarted at most ``75 + 20 + 60`` s after that await began.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

import attrs
import structlog
import trio

from worker.host.systemd import Notifier
from worker.prefect.session import CALL_DEADLINE

log = structlog.get_logger("flow_worker")

API_DEADLINE: Final = CALL_DEADLINE
"""Seconds within which every API call ends, retries and a CSRF token included (45 s)."""
CALL_SECONDS: Final = API_DEADLINE + 30.0
"""The most one API call may take before the loop making it is judged hung."""
SLACK: Final = 10.0
"""How late a loop may come back from a pause before it is judged hung."""
STATUS_SECONDS: Final = 10.0
"""Without a watchdog (``WatchdogSec`` unset), how often ``STATUS=`` is refreshed."""

Doing = Literal["call", "pause", "wait"]


@attrs.frozen
class Step:
    """What a loop said it is doing: since when, and by when it will be done."""

    doing: Doing
    what: str
    since: float
    by: float = math.inf


def overdue(now: float, steps: Mapping[str, Step]) -> list[str]:
    """The loops past their word, each said as "the poll loop: an API call for 90 s
    (bound 75 s)". Empty: the watchdog may be fed."""
    return [
        f"the {loop} loop: {step.what} for {now - step.since:.0f} s (bound {step.by - step.since:.0f} s)"
        for loop, step in sorted(steps.items())
        if now > step.by
    ]


@attrs.define
class Liveness:
    """The loops' word (what each is doing, and until when), and the task that judges it."""

    clock: Callable[[], float] = trio.current_time
    steps: dict[str, Step] = attrs.Factory(dict)
    hung: list[str] = attrs.Factory(list)
    """The verdict of the last tick: the loops past their word."""

    def calls(self, loop: str, n: int = 1) -> None:
        """``loop`` makes up to ``n`` API calls now."""
        what = "an API call" if n == 1 else f"up to {n} API calls"
        self._say(loop, "call", what, n * CALL_SECONDS)

    def pause(self, loop: str, seconds: float) -> None:
        """``loop`` pauses deliberately for at most ``seconds``."""
        self._say(loop, "pause", f"a pause of {seconds:.0f} s", seconds + SLACK)

    def waiting(self, loop: str, on: str) -> None:
        """``loop`` waits for something judged elsewhere: it is not judged meanwhile."""
        self._say(loop, "wait", f"waiting for {on}", math.inf)

    def retire(self, loop: str) -> None:
        """``loop`` ended: it is no longer judged."""
        self.steps.pop(loop, None)

    def _say(self, loop: str, doing: Doing, what: str, within: float) -> None:
        now = self.clock()
        self.steps[loop] = Step(doing, what, now, now + within)

    def calling_since(self) -> float | None:
        """Since when the oldest API step still going began (for the status line)."""
        return min((s.since for s in self.steps.values() if s.doing == "call"), default=None)

    def judged(self, loop: str, body: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[None]]:
        """``body`` (a loop), run so that how it ends is told here: an error means a
        restart after a backoff (``guard.py``), not judged; a return or cancellation
        (the poll loop when the drain begins) ends the judging."""

        async def run(*args: Any) -> None:
            try:
                await body(*args)
            except Exception:
                self.waiting(loop, "its restart after an error")
                raise
            except BaseException:
                self.retire(loop)
                raise
            self.retire(loop)

        return run

    async def watch(self, notifier: Notifier, status_line: Callable[[], str]) -> None:
        """Under systemd: each tick, say the ``STATUS=`` line, with ``WATCHDOG=1`` if no
        loop is past its word; else say which is, once in the log (the status line says
        it too: :attr:`hung`)."""
        if not notifier.enabled:
            return
        tick = (notifier.watchdog_seconds or 3 * STATUS_SECONDS) / 3
        while True:
            late = overdue(self.clock(), self.steps)
            if late and not self.hung:
                log.error(
                    "worker.hung",
                    loops=late,
                    effect="systemd's watchdog is no longer fed: it restarts the worker"
                    if notifier.watchdog_seconds
                    else "none (no watchdog): the loop stays stuck",
                )
            elif self.hung and not late:
                log.warning("worker.hang_ended", was=self.hung)
            self.hung = late
            if late:
                notifier.status(status_line())
            else:
                notifier.alive(status_line())
            await trio.sleep(tick)
