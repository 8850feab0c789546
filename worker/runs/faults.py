"""What a run that went wrong is owed, and what the worker keeps of it: the runs that met a
bug here (never taken again), and the host's shortages (said once while they last)."""

from __future__ import annotations

import math
from typing import Any, Final

import attrs
import structlog
import trio

from worker.books.ledger import Entry
from worker.books.reporter import Reporter
from worker.host.logs import Once
from worker.host.metrics import Metrics
from worker.process.handle import Supervised
from worker.process.spawned import RunHandle
from worker.rules import decisions
from worker.rules.models import FlowRun

log = structlog.get_logger("flow_worker")

_DEFER_EFFECT: Final = "due runs are not started now; they stay (or go back to) SCHEDULED for later or a peer"

SHORT_QUIET: Final = 60.0
"""A shortage ends once a run starts and none was met for this long: a host at its limit,
where starts and refusals alternate, is one episode and one WARNING, not one per flap."""


@attrs.define
class Faults:
    """One per worker (the ``Runner``'s)."""

    reporter: Reporter
    metrics: Metrics
    lost_claims: dict[str, Entry]
    """Where a run goes whose settling failed too (``Reconciler.pending``)."""
    shunned: dict[str, str] = attrs.Factory(dict)
    """Runs that met a bug in this worker (run id → error): never taken again by it."""
    shortages: Once = attrs.Factory(Once)
    """What the host is short of, said once while it lasts (:meth:`defer`)."""
    short_at: float = -math.inf
    """When a run last met a shortage (trio time)."""

    def started(self) -> None:
        """A run started: a shortage not met for ``SHORT_QUIET`` is over."""
        if self.shortages and trio.current_time() - self.short_at > SHORT_QUIET:
            log.info("host.short_over", effect="due runs start again")
            self.shortages = Once()

    async def defer(self, flow_run: FlowRun, entry: Entry | None, run_log: Any, short: str, why: str) -> None:
        """The host is short of something (``decisions.shortage``): the run is not started
        now. Unclaimed, it simply stays SCHEDULED; claimed, it goes back to SCHEDULED. Said
        once while the shortage lasts (a WARNING), then at DEBUG per run."""
        self.short_at = trio.current_time()  # (a WARNING per kind: the details vary)
        self.shortages.say(short, log, "warning", "host.short", short=why, effect=_DEFER_EFFECT)
        run_log.debug("run.deferred", reason=why, claimed=entry is not None)
        self.metrics.runs_deferred += 1
        if entry is None:
            return
        await self.settle(flow_run, entry, run_log, "reschedule", decisions.DEFERRED.format(why))

    async def internal_error(
        self,
        flow_run: FlowRun,
        entry: Entry | None,
        run_log: Any,
        exc: BaseException,
        handle: Supervised | None = None,
    ) -> None:
        """A bug met while handling this run: the run is CRASHED with it (if it was ours;
        a claim not yet recorded is resolved as a lost one), its process, if started, is
        stopped and reaped first, the traceback goes to the worker's log, and the run is
        never taken again by this worker (``shunned``): a bug that one run's data triggers
        cannot loop."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        run_log.error("run.internal_error", error=error, claimed=entry is not None, exc_info=exc)
        self.shunned[flow_run.id] = error
        self.metrics.runs_internal_errors += 1
        if isinstance(handle, RunHandle) and not handle.reaped:
            handle.stop(f"internal error in flow-worker: {error}", "relinquish")
            try:
                await handle.wait()
            except Exception as again:
                run_log.error("run.not_reaped", error=f"{type(again).__name__}: {again}"[:500])
        if isinstance(handle, RunHandle) and handle.reaped:
            handle.remove_output()  # (its own wait removes them; this is for a wait that failed)
        if entry is None:
            return
        await self.settle(flow_run, entry, run_log, "crash", decisions.INTERNAL_ERROR.format(error))

    async def settle(self, flow_run: FlowRun, entry: Entry, run_log: Any, kind: str, message: str) -> None:
        """What a run that went wrong is owed, through the reporter (which reads the run
        before it writes). If even that fails (a bug on top of whatever brought us here),
        the run is resolved later from its state, as a lost claim is."""
        try:
            await self.reporter.finish(entry, run_log, kind, message)
        except Exception as exc:
            run_log.error("run.not_reported", reason=f"{type(exc).__name__}: {exc}"[:500], owed=kind)
            self.lost_claims[flow_run.id] = entry
