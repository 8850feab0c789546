"""Claiming a due run: the claim written to the ledger first, PENDING proposed with a fixed
``transition_id`` and this worker's name in its message (``fleet.claim_message``: how peers
know the owner of a PENDING run), the answer judged (``decisions.claim_outcome``), and,
unless the answer shows the claim replaced a SCHEDULED state
(``decisions.claimed_from_scheduled``), the run's history checked for a state another
worker finished meanwhile (``decisions.displaced_state``, put back if so). After a
heartbeat gap, whether a peer took the run meanwhile (``Fencer``)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import attrs

from worker.books.ledger import Entry, Ledger
from worker.fleet.reclaim import Fencer
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.prefect.api import PrefectClient
from worker.prefect.cache import DEPLOYMENT_TTL, ReadCache
from worker.prefect.outage import API_ERRORS, Outage
from worker.rules import decisions, fleet
from worker.rules.models import Deployment, FlowRun, StateType


@attrs.define
class Claimer:
    """Claims runs for one pool; shares the runner's cache and lost claims."""

    settings: Settings
    client: PrefectClient
    ledger: Ledger
    metrics: Metrics
    outage: Outage
    fencer: Fencer
    """Whether peers may have taken our claims during a heartbeat gap (``reclaim.py``)."""
    cache: ReadCache
    lost_claims: dict[str, Entry]
    """Where a claim whose answer was lost goes (``Reconciler.pending``)."""
    pool: str
    """The pool's name, written in the ledger entries."""

    async def claim(self, flow_run: FlowRun, run_log: Any) -> tuple[Deployment | None, Entry, Any] | None:
        """Read the deployment, propose PENDING, verify the claim. None: not ours."""
        deployment = None
        if flow_run.deployment_id:
            deployment_id = flow_run.deployment_id
            deployment = await self.cache.get(
                ("deployment", deployment_id),
                DEPLOYMENT_TTL,
                lambda: self.client.read_deployment(deployment_id),
            )
            if deployment is None:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    StateType.CANCELLED,
                    "Cancelled",
                    f"Deployment {deployment_id} no longer exists, cancelled run.",
                    force=True,
                )
                run_log.warning("run.deployment_missing", deployment_id=deployment_id)
                return None
            run_log = run_log.bind(deployment_id=deployment.id, deployment_name=deployment.name)
        transition_id = str(uuid.uuid4())
        # the ledger knows of the claim before the server does: a crash in between is recoverable
        entry = Entry(
            flow_run_id=flow_run.id,
            flow_run_name=flow_run.name,
            pool=self.pool,
            worker_name=self.settings.worker_name,
            phase="claiming",
            transition_id=transition_id,
            claimed_at=time.time(),
        )
        self.ledger.write(entry)
        try:
            result = await self.client.set_flow_run_state(
                flow_run.id,
                StateType.PENDING,
                "Pending",
                fleet.claim_message(self.settings.worker_name),
                transition_id=transition_id,
            )
            claim = decisions.claim_outcome(result, transition_id)
            if not claim.proceed:
                self.ledger.remove(flow_run.id)
                run_log.info("run.not_claimed", reason=claim.reason)
                return None
            if not decisions.claimed_from_scheduled(result) and not await self._undo_if_raced(
                flow_run, transition_id, run_log
            ):
                return None
            entry = self.ledger.update(entry, phase="claimed")
        except Exception:
            # Proposed, perhaps written (a lost answer, a failed check, a ledger that cannot
            # be written, a bug): the claim is resolved against the server by the reporter
            # loop, as a lost answer is (back to SCHEDULED while it is still ours).
            self.lost_claims[flow_run.id] = entry
            raise
        run_log.info("run.claimed", worker_name=self.settings.worker_name)
        self.metrics.runs_claimed += 1
        return deployment, entry, run_log

    async def still_ours(self, entry: Entry, claimed_at: float, run_log: Any) -> bool:
        """After a heartbeat gap since the claim, a peer may have taken the run: check
        first (``Fencer.still_ours``). Unknowable now: the claim is resolved later, as
        one whose answer was lost (back to SCHEDULED if still ours)."""
        try:
            lost = await self.fencer.still_ours(entry.flow_run_id, entry.transition_id, claimed_at)
        except API_ERRORS as exc:
            self.outage.failed(exc, "submit")
            run_log.warning("run.not_started", reason=f"could not check the claim after a gap: {exc}")
            self.lost_claims[entry.flow_run_id] = entry
            return False
        if lost:
            self.metrics.runs_lost += 1
            run_log.warning("run.lost_to_peer", reason=lost)
            self.ledger.remove(entry.flow_run_id)
        return not lost

    async def _undo_if_raced(self, flow_run: FlowRun, transition_id: str, run_log: Any) -> bool:
        """True if the claim stands; False if another worker had finished the run after
        our poll, in which case its final state is put back (PROTOCOL §7.6)."""
        displaced = decisions.displaced_state(
            await self.client.read_flow_run_states(flow_run.id), transition_id
        )
        if displaced is None:
            return True
        await self.client.restore_state(flow_run.id, displaced)
        self.ledger.remove(flow_run.id)
        run_log.warning("run.claim_raced", restored_state=displaced.type.value)
        return False
