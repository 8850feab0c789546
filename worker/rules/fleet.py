"""What a worker concludes about its peers: the reclaim table and the fence table (pure).

Theory of operation
-------------------
Many workers serve one pool. Each labels the runs it claims with its name
(``prefect.worker.name``, as Prefect's worker does), and heartbeats the pool, so the
server knows every run's owner and when that owner was last heard from. Two rules keep
a dead host from holding runs for ever without ever running a flow twice:

* **Reclaim** (``reclaim_verdict``, run by every worker's reclaim loop, ``reclaim.py``):
  a PENDING, RUNNING or CANCELLING run of the pool whose owner has been silent for
  ``reclaim_after`` (and at least three of its own heartbeat intervals, when Prefect
  would still call it ONLINE) *and* whose state has not changed for ``reclaim_after``
  is resolved by the peer that notices: a claim that never started goes back to
  SCHEDULED, a RUNNING run is CRASHED (or SCHEDULED with ``on_lost = "reschedule"``),
  a CANCELLING one is CANCELLED. The second condition means a run someone has just
  acted on (e.g. re-claimed after a reclaim) is never touched on stale evidence.
  Exactly one peer acts: the proposal's transition id is derived from the state it
  replaces, so the server rejects the same transition from a second peer ("already made
  this state transition"), and a CRASHED run aborts any other crash.
* **Fence** (``fence_verdict``, run by the worker itself, ``reclaim.py``): a worker that
  could not heartbeat for half of ``reclaim_after`` knows its peers may have taken its
  runs. Once the API answers again it checks each run it holds before starting or
  keeping it; a run a peer has resolved is stopped (intent ``relinquish``, so the engine
  writes nothing) and nothing is reported over the peer's decision.

Clocks: every age is measured on the server's clock (its ``Date`` header against the
times it recorded), so clock skew between hosts never makes a live peer look dead.
"""

from __future__ import annotations

import datetime
import enum
from typing import Final

import attrs

from worker.rules.decisions import newest_other, parse_time
from worker.rules.models import FlowRun, State, StateType, WorkerRecord

OWNER_LABEL: Final = "prefect.worker.name"
ONLINE_HEARTBEATS: Final = 3
"""Prefect's server calls a worker ONLINE until 3 of its heartbeat intervals have passed."""
WATCHED: Final = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
"""The states a run can be stuck in when its worker is gone."""


def owner(flow_run: FlowRun) -> str | None:
    """The worker that claimed the run, by its label (None: unlabelled)."""
    value = flow_run.labels.get(OWNER_LABEL)
    return str(value) if value else None


# ---------------------------------------------------------------- reclaim


class Reclaim(enum.Enum):
    LEAVE = "leave"  # nothing to do (why: the verdict's reason)
    UNOWNED = "unowned"  # no owner label: left alone, said once
    RESCHEDULE = "reschedule"  # back to SCHEDULED: run once by whoever claims it
    CRASH = "crash"  # CRASHED, naming the lost worker
    CANCEL = "cancel"  # CANCELLED: its cancellation cannot finish without its worker


@attrs.frozen
class ReclaimVerdict:
    action: Reclaim
    reason: str
    """LEAVE: why; otherwise the message of the state written."""
    silent: float | None = None
    """How long the lost owner had been silent, on the server's clock (None: never seen)."""


def silence(record: WorkerRecord | None, now: datetime.datetime) -> float | None:
    """Seconds since the worker's last heartbeat (None: never heard of)."""
    last = parse_time(record.last_heartbeat_time) if record is not None else None
    return None if last is None else (now - last).total_seconds()


def newly_silent(
    workers: list[WorkerRecord], now: datetime.datetime, reclaim_after: float, window: float
) -> list[str]:
    """Names of the pool's workers that went silent for longer than ``reclaim_after``
    within the last ``window`` seconds: whose runs may have just become reclaimable.
    (Workers silent for long were dealt with when they crossed the line; a pool keeps
    the records of every worker that ever heartbeated.)"""
    return [
        w.name
        for w in workers
        if (s := silence(w, now)) is not None and reclaim_after < s <= reclaim_after + window
    ]


def reclaim_verdict(
    flow_run: FlowRun,
    owner_record: WorkerRecord | None,
    now: datetime.datetime,
    me: str,
    ours: bool,
    reclaim_after: float,
    on_lost: str,
) -> ReclaimVerdict:
    """What this worker does about one run of its pool, seen by its reclaim loop.

    ``owner_record`` is the pool's record of the run's owner (None: unknown to the pool);
    ``now`` is the server's clock; ``ours`` says the run is in this worker's hands or
    ledger.

    =====================================  ===========  ======================================
    the run                                action       why
    =====================================  ===========  ======================================
    reclaim_after = 0                      LEAVE        reclaim is off
    in this worker's hands, or owned by    LEAVE        its own runs are the ledger's business
    this worker's name
    not PENDING, RUNNING or CANCELLING     LEAVE        nothing is stuck
    state changed within reclaim_after     LEAVE        someone acted on it lately (e.g. a
                                                        claim whose label is on its way)
    no owner label                         UNOWNED      nobody to ask about: left alone
    owner heard from within reclaim_after  LEAVE        alive, however long the run takes
    (or 3 of its heartbeat intervals)
    PENDING                                RESCHEDULE   claimed, never started
    RUNNING, on_lost = "crash"             CRASH        its process died with its host
    RUNNING, on_lost = "reschedule"        RESCHEDULE   the user's flows are idempotent
    CANCELLING                             CANCEL       nobody is left to stop it
    =====================================  ===========  ======================================
    """
    state = flow_run.state
    if reclaim_after <= 0:
        return ReclaimVerdict(Reclaim.LEAVE, "reclaim is off")
    name = owner(flow_run)
    if ours or name == me:
        return ReclaimVerdict(Reclaim.LEAVE, "this worker's own run")
    if state is None or state.type not in WATCHED:
        return ReclaimVerdict(Reclaim.LEAVE, "not PENDING, RUNNING or CANCELLING")
    changed = parse_time(state.timestamp)
    unchanged = (now - changed).total_seconds() if changed is not None else None
    if unchanged is None or unchanged < reclaim_after:
        return ReclaimVerdict(Reclaim.LEAVE, "its state changed less than reclaim_after ago")
    if name is None:
        return ReclaimVerdict(Reclaim.UNOWNED, "no prefect.worker.name label: its worker is unknown")
    silent = silence(owner_record, now)
    interval = (owner_record.heartbeat_interval_seconds or 0.0) if owner_record else 0.0
    limit = max(reclaim_after, ONLINE_HEARTBEATS * interval)
    if silent is not None and silent <= limit:
        return ReclaimVerdict(Reclaim.LEAVE, f"its worker {name!r} was heard from {silent:.0f} s ago")
    seen = (
        f"last seen {owner_record.last_heartbeat_time} ({silent:.0f} s before this check)"
        if owner_record is not None and silent is not None
        else "never seen heartbeating in this pool"
    )
    lost = f"Worker {name!r} was lost: {seen}, longer than reclaim_after ({reclaim_after:g} s)."
    if state.type is StateType.PENDING:
        never = f"{lost} It had claimed this run but never started it; {_by(me)}"
        return ReclaimVerdict(Reclaim.RESCHEDULE, never, silent)
    if state.type is StateType.CANCELLING:
        return ReclaimVerdict(Reclaim.CANCEL, f"{lost} Nothing is left to cancel; {_by(me)}", silent)
    if on_lost == "reschedule":
        return ReclaimVerdict(
            Reclaim.RESCHEDULE,
            f"{lost} The run's process went with it; rescheduled (on_lost) {_by(me)}",
            silent,
        )
    return ReclaimVerdict(Reclaim.CRASH, f"{lost} The run's process went with it; {_by(me)}", silent)


def _by(me: str) -> str:
    return f"resolved by worker {me!r}."


# ---------------------------------------------------------------- fence


class Fence(enum.Enum):
    KEEP = "keep"  # still ours: start it / let it run
    LOST = "lost"  # a peer resolved it: stop it (if started), report nothing


@attrs.frozen
class FenceVerdict:
    verdict: Fence
    reason: str = ""


def fence_verdict(
    started: bool,
    current: FlowRun | None,
    me: str,
    claim_transition_id: str | None,
    claimed_as: str | None = None,
) -> FenceVerdict:
    """After a heartbeat gap: is a run this worker holds still its own?

    ``started``: its process was started (else it was claimed and not started yet);
    ``current``: the run as the server has it now (None: deleted); ``claimed_as``: the
    name it was claimed under, when that was not ``me`` (a run adopted after a restart
    under another name: both names are ours).

    ==========  ==============================================  =======  =====================
    started?    the run now                                     verdict  then
    ==========  ==============================================  =======  =====================
    any         deleted                                         LOST     stop it, report nothing
    no          PENDING by our claim (our transition id)        KEEP     start it
    no          anything else                                   LOST     never started: drop it
    yes         labelled with another worker's name             LOST     another worker has it
    yes         SCHEDULED                                       LOST     a peer returned it
    yes         CRASHED or CANCELLED                            LOST     a peer ended it
    yes         PENDING by another claim                        LOST     someone else claimed it
    yes         otherwise (RUNNING, CANCELLING, COMPLETED …)    KEEP     it is ours, or ending
    ==========  ==============================================  =======  =====================
    """
    if current is None or current.state is None:
        return FenceVerdict(Fence.LOST, "the run was deleted (or has no state)")
    state = current.state
    name = owner(current)
    by_someone_else = name is not None and name not in (me, claimed_as)
    by_our_claim = state.state_details.get("transition_id") == claim_transition_id
    if not started and state.type is StateType.PENDING and by_our_claim:
        # nobody takes a claim without replacing its state; the labels may still be the
        # previous owner's (our label write failed, as writes do during the very API trouble
        # that made the gap; it is tried again later), so they decide nothing here
        return FenceVerdict(Fence.KEEP)
    if by_someone_else:
        return FenceVerdict(Fence.LOST, f"worker {name!r} has claimed it since")
    if not started:
        return FenceVerdict(Fence.LOST, f"it is {state.type.value} now, no longer our claim")
    if state.type is StateType.SCHEDULED:
        return FenceVerdict(Fence.LOST, "a peer returned it to the queue")
    if state.type in (StateType.CRASHED, StateType.CANCELLED):
        return FenceVerdict(Fence.LOST, f"a peer marked it {state.type.value}: {state.message or ''}".strip())
    if state.type is StateType.PENDING and not by_our_claim:
        return FenceVerdict(Fence.LOST, "another claim replaced ours")
    return FenceVerdict(Fence.KEEP)


FENCE_SHARE: Final = 0.5
"""A worker fences itself after ``FENCE_SHARE * reclaim_after`` without a heartbeat:
half the peers' patience is the safety margin (a false alarm costs one read per run)."""


def reclaim_raced(history: list[State], transition_id: str, read_state_id: str | None) -> State | None:
    """After a reclaim was accepted: the state it displaced, if that was not the state
    the reclaim was decided on (someone acted between our read and our write); else None.

    The server has no compare-and-set, so it is emulated: the newest state that is not
    ours must be the one we read; if it is not, that newer state is put back.
    """
    newest = newest_other(history, transition_id)
    return None if newest is None or newest.id == read_state_id else newest
