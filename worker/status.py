"""What the worker says about itself: the ``STATUS=`` line, the ``/health`` verdict, ``/metrics``."""

from __future__ import annotations

import os

import attrs
import trio

from worker import usage
from worker.health import is_healthy
from worker.interpreter import InterpreterCheck
from worker.metrics import Metrics
from worker.outage import Outage
from worker.run import InHand


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

    def line(self) -> str:
        """The one-line status shown by ``systemctl status`` (``STATUS=``)."""
        api = "API reachable" if self.outage.failing_since is None else "API UNREACHABLE"
        since = self.last_poll
        poll = f"last poll {trio.current_time() - since:.0f}s ago" if since is not None else "no poll yet"
        mode = "draining, " if self.in_hand.stopping else ""
        python = "; PYTHON HAS NO PREFECT (see the log)" if self.interpreter.problem else ""
        held = self.metrics.runs_held
        memory = f"; holding {held} due runs: memory short" if held else ""
        return f"{mode}{len(self.in_hand.live)} active runs, {poll}, {api}; pool {self.pool}{python}{memory}"
