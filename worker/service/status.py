"""What the worker says about itself: the ``STATUS=`` line, the ``/health`` verdict, ``/metrics``."""

from __future__ import annotations

import os
from typing import Final

import attrs
import trio

from worker.host.health import is_healthy
from worker.host.metrics import Metrics
from worker.prefect.outage import Outage
from worker.process import usage
from worker.runs.inhand import InHand
from worker.runs.interpreter import InterpreterCheck
from worker.service.liveness import Liveness

SLOW_CALL_SECONDS: Final = 15.0
"""An API call unanswered for longer is said in the status line before it fails (which
is at its deadline, ``liveness.API_DEADLINE``): an answer takes milliseconds, a loaded
server's seconds."""


@attrs.define
class Status:
    pool: str
    query_seconds: float
    in_hand: InHand
    outage: Outage
    metrics: Metrics
    synced: trio.Event = attrs.Factory(trio.Event)
    """Set once the pool was read and the first heartbeat sent: polling may begin."""
    started_at: float = attrs.Factory(trio.current_time)
    last_poll: float | None = None
    interpreter: InterpreterCheck = attrs.Factory(InterpreterCheck)
    liveness: Liveness = attrs.Factory(Liveness)
    """What the loops are doing: an API call going on for long is said before it fails."""
    silent_since: float | None = None
    """Since when the API has not answered, as far as the status line has seen."""

    def problem(self) -> str | None:
        """What makes the worker unhealthy although it polls (for ``/health``), if anything."""
        return self.interpreter.problem

    def healthy(self) -> bool:
        if self.problem() is not None:
            return False
        if not self.synced.is_set():
            return False  # 503 until the API has answered once
        return is_healthy(trio.current_time(), self.last_poll, self.started_at, self.query_seconds)

    def render_metrics(self) -> str:
        since = trio.current_time() - self.last_poll if self.last_poll is not None else None
        return self.metrics.render(len(self.in_hand.live), since, usage.tree_pss(os.getpid()))

    def api(self) -> str:
        """The API's part of the status line: reachable, or since when it is not.

        An API that does not answer (timeouts, a refused connection, a server that accepts
        and never answers) is "NOT ANSWERING" from the start of the first call seen
        waiting for longer than ``SLOW_CALL_SECONDS``, or else from the first failure
        (which, for a hung API, comes only at the call's deadline); one that answers with
        errors (5xx, 429, a refused key) is "FAILING" from its first failure.
        """
        now = trio.current_time()
        calling = self.liveness.calling_since()
        waiting = calling if calling is not None and now - calling > SLOW_CALL_SECONDS else None
        failing = self.outage.failing_since
        failed = f" ({self.outage.failures} failed calls)" if self.outage.failures else ""
        if failing is None and waiting is None:
            self.silent_since = None
            return "API reachable"
        if failing is not None and not self.outage.unreachable:
            self.silent_since = None
            return f"API FAILING for {now - failing:.0f}s{failed}"
        since = min(t for t in (failing, waiting, self.silent_since) if t is not None)
        self.silent_since = since
        return f"API NOT ANSWERING for {now - since:.0f}s{failed}"

    def line(self) -> str:
        """The one-line status shown by ``systemctl status`` (``STATUS=``)."""
        api = self.api()
        since = self.last_poll
        poll = f"last poll {trio.current_time() - since:.0f}s ago" if since is not None else "no poll yet"
        hung = "".join(f"HUNG: {loop}; " for loop in self.liveness.hung)  # the watchdog is not fed
        mode = "draining, " if self.in_hand.stopping else ""
        python = "; PYTHON HAS NO PREFECT (see the log)" if self.interpreter.problem else ""
        held = self.metrics.runs_held
        memory = f"; holding {held} due runs: memory short" if held else ""
        runs = f"{len(self.in_hand.live)} active runs"
        return f"{hung}{mode}{runs}, {poll}, {api}; pool {self.pool}{python}{memory}"
