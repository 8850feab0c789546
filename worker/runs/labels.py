"""The labels Prefect's worker gives a run (its worker and pool), so the UI shows who runs it
and peers know the owner of a started run; a label write that failed is tried again for
live runs (every 5 s, by the reconciler: one write, never a storm of them).

One label write at a time, per worker. A label write is a read-modify-write in one
transaction on the server, the kind a busy SQLite server refuses (``503``): fifty runs
started together sent fifty at once, and each was refused 4 to 5 times (4.4 ``503`` answers
per run in the burst bench, against Prefect's worker's 2.1). So a write that would have to
wait for another is not sent now: its run goes to the relabel pass (in 5 s, one by one),
or to its end's essential write, whichever comes first; only essential writes (a run's
last try, at its end) queue for their turn.

The labels are written once, in the background right after the start, never before it:
the owner of a PENDING run is named by the claim itself (``fleet.claim_message``), so the
start waits for no write. Until a run's labels are on (:meth:`Labeller.unconfirmed`), its
label may still name a previous owner, which the fence knows (``Fencer.check_live``)."""

from __future__ import annotations

from typing import Any

import attrs
import structlog
import trio

from worker.host.settings import Settings
from worker.prefect.answers import ApiNotFound, ApiRefused
from worker.prefect.api import PrefectClient
from worker.prefect.outage import API_ERRORS
from worker.rules.models import FlowRun, WorkPool
from worker.runs.inhand import InHand

log = structlog.get_logger("flow_worker")


@attrs.define
class Labeller:
    """One per worker (the ``Runner``'s)."""

    client: PrefectClient
    settings: Settings
    in_hand: InHand
    unlabelled: dict[str, FlowRun]
    """Live runs whose labels could not be set yet (shared with ``Reconciler.unlabelled``)."""
    unsupported: bool = False
    """The server has no labels endpoint (before 3.1): said once, never tried again."""
    writing: set[str] = attrs.Factory(set)
    """Runs whose label write is under way."""
    _turn: trio.Lock = attrs.Factory(trio.Lock)
    """One label write at a time (module doc); fair: essential writes go in turn."""

    def unconfirmed(self, run_id: str) -> bool:
        """Our labels are not known to be on the run (being written, or failed)."""
        return run_id in self.writing or run_id in self.unlabelled

    async def label(self, flow_run: FlowRun, run_log: Any, pool: WorkPool, essential: bool = False) -> None:
        """Give the run the labels Prefect's worker gives it, so the UI shows who runs it.
        A server without the labels endpoint (before 3.1) is said once, not per run.
        ``essential``: the last try, at the run's end (waits out a busy server, retried)."""
        if self.unsupported:
            return
        labels = {
            "prefect.worker.name": self.settings.worker_name,
            "prefect.worker.type": "process",
            "prefect.work-pool.name": pool.name,
            "prefect.work-pool.id": pool.id,
        }
        if not essential and self._turn.locked():  # another write is out: this one goes later
            self.unlabelled[flow_run.id] = flow_run
            return
        self.writing.add(flow_run.id)
        try:
            async with self._turn:
                await self._write(flow_run, labels, run_log, essential)
        finally:
            self.writing.discard(flow_run.id)

    async def _write(self, flow_run: FlowRun, labels: dict[str, str], run_log: Any, essential: bool) -> None:
        try:
            # not essential (``throttle.py``): held back while the server is busy and not
            # retried then, in step with every other run's; the next relabel pass (5 s) tries again
            await self.client.update_labels(flow_run.id, labels, essential)
            self.unlabelled.pop(flow_run.id, None)
        except ApiRefused as exc:
            if isinstance(exc, ApiNotFound) and "flow run" in str(exc).lower():
                self.unlabelled.pop(flow_run.id, None)  # the run is gone (deleted), not the endpoint
                return
            self.unsupported = True
            log.info(
                "api.labels_unsupported", error=str(exc), effect="runs are not labelled with their worker"
            )
        except API_ERRORS as exc:
            if flow_run.id not in self.unlabelled:
                run_log.info("run.labels_not_set", error=str(exc), effect="tried again every 5 s")
            self.unlabelled[flow_run.id] = flow_run

    async def relabel(self, pool: WorkPool | None) -> None:
        """Try again to label the runs whose labels could not be set (or, adopted, may
        lack ours); a run that has ended meanwhile gets one last, essential try (the UI
        shows who ran it), then is forgotten whatever the answer."""
        if pool is None:
            return  # not synced yet: the pool's id is part of the labels
        if self.client.throttle.state.busy:  # each write would be held up to 5 s, one by one,
            return  # and the reporter loop (which calls this) with them: the next pass (5 s)
        for run_id, flow_run in list(self.unlabelled.items()):
            if self._turn.locked():  # runs' own writes are out (their ends): the next pass
                return
            ended = run_id not in self.in_hand.live
            await self.label(flow_run, log.bind(flow_run_id=run_id), pool, essential=ended)
            if ended:
                self.unlabelled.pop(run_id, None)
