"""The labels Prefect's worker gives a run (its worker and pool), so the UI shows who runs it
and peers know the owner of a started run; a label write that failed is tried again for
live runs (every 5 s, by the reconciler: one write, never a storm of them).

One label write at a time, per worker. A label write is a read-modify-write in one
transaction on the server, the kind a busy SQLite server refuses (``503``): fifty runs
started together sent fifty at once, and each was refused 4 to 5 times (4.4 ``503`` answers
per run in the burst bench, against Prefect's worker's 2.1). So a write that would have to
wait for another is not sent now: its run goes to the relabel loop (a pass every 5 s).
A run that ends with its labels not on is handed to that loop too (:meth:`Labeller.later`),
which gives it essential writes, one at a time (the UI shows who ran it): its end waits for
none. It used to wait for that write, in turn with every other run's: 1,000 runs in a row
on SQLite, where a third of the label writes are answered ``503`` (the server's read and
write of the labels in one transaction), left a hundred ended runs in hand waiting their
turn, each holding its frames (the worker's RSS grew ~13 KB a run).

The labels are written once, in the background right after the start, never before it:
the owner of a PENDING run is named by the claim itself (``fleet.claim_message``), so the
start waits for no write. Until a run's labels are on (:meth:`Labeller.unconfirmed`), its
label may still name a previous owner, which the fence knows (``Fencer.check_live``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

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
RELABEL_SECONDS: Final = 5.0
"""A pass of the relabel loop at least this often."""
LAST_TRIES: Final = 3
"""Essential writes an ended run gets, one a relabel pass (a pass every 5 s, or sooner when
another run ends), each one retried as every essential request is."""
MAX_ENDED: Final = 1000
"""Ended runs waiting for their labels at most (then the oldest is given up, said at INFO):
a server that refuses label writes for long costs a bounded memory."""


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
    ended: dict[str, tuple[FlowRun, int]] = attrs.Factory(dict)
    """Runs that ended with their labels not on, oldest first, with the tries they have had."""
    _turn: trio.Lock = attrs.Factory(trio.Lock)
    """One label write at a time (module doc); fair: essential writes go in turn."""
    _wake: trio.Event = attrs.Factory(trio.Event)

    def unconfirmed(self, run_id: str) -> bool:
        """Our labels are not known to be on the run (being written, or failed)."""
        return run_id in self.writing or run_id in self.unlabelled or run_id in self.ended

    def later(self, flow_run: FlowRun) -> None:
        """The run has ended with its labels not (known to be) on: :meth:`loop` writes them
        (the UI shows who ran it); its end waits for nothing. At most ``MAX_ENDED`` wait."""
        if self.unsupported or not self.unconfirmed(flow_run.id):
            return
        self.unlabelled.pop(flow_run.id, None)
        self.ended[flow_run.id] = (flow_run, 0)
        if len(self.ended) > MAX_ENDED:
            oldest = next(iter(self.ended))
            del self.ended[oldest]
            log.info("run.labels_given_up", flow_run_id=oldest, reason=f"more than {MAX_ENDED} waiting")
        self._wake.set()

    async def label(self, flow_run: FlowRun, run_log: Any, pool: WorkPool, essential: bool = False) -> bool:
        """Give the run the labels Prefect's worker gives it, so the UI shows who runs it;
        False if they are not on (the write failed, or waits for a later pass). A server
        without the labels endpoint (before 3.1) is said once, not per run.
        ``essential`` (an ended run's, from :meth:`loop`): waits its turn, retried."""
        if self.unsupported:
            return True
        labels = {
            "prefect.worker.name": self.settings.worker_name,
            "prefect.worker.type": "process",
            "prefect.work-pool.name": pool.name,
            "prefect.work-pool.id": pool.id,
        }
        if not essential and self._turn.locked():  # another write is out: this one goes later
            self.unlabelled[flow_run.id] = flow_run
            return False
        self.writing.add(flow_run.id)
        try:
            async with self._turn:
                return await self._write(flow_run, labels, run_log, essential)
        finally:
            self.writing.discard(flow_run.id)

    async def _write(self, flow_run: FlowRun, labels: dict[str, str], run_log: Any, essential: bool) -> bool:
        try:
            # not essential (``throttle.py``): held back while the server is busy and not
            # retried then, in step with every other run's; the next relabel pass (5 s) tries again
            await self.client.update_labels(flow_run.id, labels, essential)
        except ApiRefused as exc:
            if not (isinstance(exc, ApiNotFound) and "flow run" in str(exc).lower()):
                self.unsupported = True  # (else the run is gone, deleted: nothing to label)
                log.info(
                    "api.labels_unsupported", error=str(exc), effect="runs are not labelled with their worker"
                )
        except API_ERRORS as exc:
            if flow_run.id not in self.unlabelled and flow_run.id not in self.ended:
                run_log.info("run.labels_not_set", error=str(exc), effect="tried again every 5 s")
            if not essential:
                self.unlabelled[flow_run.id] = flow_run
            return False
        self.unlabelled.pop(flow_run.id, None)
        self.ended.pop(flow_run.id, None)
        return True

    async def loop(self, pool: Callable[[], WorkPool | None]) -> None:
        """The relabel loop: a pass when a run ends unlabelled, else every 5 s."""
        while True:
            with trio.move_on_after(RELABEL_SECONDS):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.relabel(pool())

    async def relabel(self, pool: WorkPool | None) -> None:
        """One pass. Ended runs first, oldest first, one essential write each in turn (the
        UI shows who ran it), one a pass and ``LAST_TRIES`` at most; then the live runs whose write failed
        or went later (or, adopted, may lack ours), one non-essential write each while the
        server is not said busy. A run in ``unlabelled`` that is no longer in hand has
        ended (adopted runs end elsewhere): it joins the ended."""
        if pool is None:
            return  # not synced yet: the pool's id is part of the labels
        if self.unsupported:  # (learnt after these were put here): nothing to write, ever
            self.unlabelled.clear()
            self.ended.clear()
            return
        for run_id in [r for r in self.unlabelled if r not in self.in_hand.live]:
            self.later(self.unlabelled[run_id])
        for run_id in list(self.ended):  # one try each per pass: its LAST_TRIES span as many passes
            if self.unsupported:  # (learnt on the way: the next pass clears)
                break
            entry = self.ended.pop(run_id, None)
            if entry is None:  # (given up meanwhile: more than MAX_ENDED)
                continue
            flow_run, tried = entry
            if not await self.label(flow_run, log.bind(flow_run_id=run_id), pool, essential=True):
                if tried + 1 < LAST_TRIES:
                    self.ended[run_id] = (flow_run, tried + 1)
                else:
                    log.info("run.labels_given_up", flow_run_id=run_id, tries=tried + 1)
        for run_id, flow_run in list(self.unlabelled.items()):
            # a busy server would hold each write up to 5 s: the next pass (5 s)
            if self.unsupported or self.client.throttle.state.busy or self._turn.locked():
                return
            await self.label(flow_run, log.bind(flow_run_id=run_id), pool)
