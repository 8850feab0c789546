"""What a worker concludes about its peers: the reclaim table and the fence table (pure).

Theory of operation
-------------------
Many workers serve one pool. Each names itself in the claim (the PENDING state's
message, ``claim_message``), labels the runs it starts with its name
(``prefect.worker.name``, as Prefect's worker does, written after the start), and
heartbeats the pool, so the server knows every run's owner (``owner``) and when that
owner was last heard from. Two rules keep
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
import json
from typing import Final

import attrs

from worker.rules.decisions import newest_other, parse_time
from worker.rules.models import FlowRun, State, StateType, WorkerRecord

OWNER_LABEL: Final = "prefect.worker.name"
ONLINE_HEARTBEATS: Final = 3
"""Prefect's server calls a worker ONLINE until 3 of its heartbeat intervals have passed."""
WATCHED: Final = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
"""The states a run can be stuck in when its worker is gone."""


CLAIM_MARK: Final = "Claimed by worker "
"""How a claim names its worker: the PENDING state's message is this, then the worker's
name as a JSON string (``claim_message``), so any name (quotes, spaces) reads back exactly."""


def claim_message(name: str) -> str:
    """The message of the PENDING state a claim proposes: names the claiming worker.

    Why the message: a peer's reclaim loop reads the pool's runs with
    ``POST /flow_runs/filter``, whose rows carry the current ``state`` with its message
    (verified against Prefect 3.9.1, ``test_fleet_e2e``): the owner of a PENDING run is
    known from the claim itself, which the worker writes anyway, so no label write has to
    come before the start. (A transition id derived from the name would be readable only
    by trying every worker name of the pool; the state name is shown as the state in the
    UI and Prefect's worker says "Pending" there.) The message is visible in the UI too,
    as the reason of the PENDING state, which is what it says.
    """
    return CLAIM_MARK + json.dumps(name)


def claim_mark(state: State | None) -> str | None:
    """The worker a PENDING state names as its claimant (``claim_message``); None if the
    state is not PENDING or its message is not a claim mark (Prefect's worker, a user)."""
    if state is None or state.type is not StateType.PENDING or not state.message:
        return None
    if not state.message.startswith(CLAIM_MARK):
        return None
    try:
        name, _ = json.JSONDecoder().raw_decode(state.message, len(CLAIM_MARK))
    except ValueError:
        return None
    return name if isinstance(name, str) and name else None


def owner(flow_run: FlowRun) -> str | None:
    """The worker that holds the run (None: unknown).

    ================================  ==============================================
    the run                           owner
    ================================  ==============================================
    PENDING with a claim mark         the mark's worker: the claim is the newest act
                                      (a label may still name a previous owner)
    otherwise                         its ``prefect.worker.name`` label, if any: the
                                      engine's RUNNING state carries no mark, so a
                                      started run is known by the label its worker
                                      writes right after the start
    ================================  ==============================================
    """
    mark = claim_mark(flow_run.state)
    if mark is not None:
        return mark
    value = flow_run.labels.get(OWNER_LABEL)
    return str(value) if value else None


# ---------------------------------------------------------------- reclaim


class Reclaim(enum.Enum):
    LEAVE = "leave"  # nothing to do (why: the verdict's reason)
    UNOWNED = "unowned"  # no claim mark, no owner label: left alone, said once
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
                                                        start whose label is on its way)
    no owner (``owner``)                   UNOWNED      nobody to ask about: left alone
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
        return ReclaimVerdict(
            Reclaim.UNOWNED, "no claim mark nor prefect.worker.name label: its worker is unknown"
        )
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
    labelled: bool = True,
) -> FenceVerdict:
    """After a heartbeat gap: is a run this worker holds still its own?

    ``started``: its process was started (else it was claimed and not started yet);
    ``current``: the run as the server has it now (None: deleted); ``claimed_as``: the
    name it was claimed under, when that was not ``me`` (a run adopted after a restart
    under another name: both names are ours); ``labelled``: our label is known to be on
    the run (it is written after the start, in the background): until then a label naming
    another worker may be a previous owner's, so only a claim mark says who has it (the
    caller reads the history for a later claim, ``claimed_since``).

    ==========  ==============================================  =======  =====================
    started?    the run now                                     verdict  then
    ==========  ==============================================  =======  =====================
    any         deleted                                         LOST     stop it, report nothing
    no          PENDING by our claim (our transition id)        KEEP     start it
    no          anything else                                   LOST     never started: drop it
    yes         owned by another worker (``owner``)             LOST     another worker has it
    yes         SCHEDULED                                       LOST     a peer returned it
    yes         CRASHED or CANCELLED                            LOST     a peer ended it
    yes         PENDING by another claim                        LOST     someone else claimed it
    yes         otherwise (RUNNING, CANCELLING, COMPLETED …)    KEEP     it is ours, or ending
    ==========  ==============================================  =======  =====================
    """
    if current is None or current.state is None:
        return FenceVerdict(Fence.LOST, "the run was deleted (or has no state)")
    state = current.state
    name = owner(current) if labelled else claim_mark(state)
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


def claimed_since(history: list[State], transition_id: str | None) -> State | None:
    """A PENDING state newer than our claim (``transition_id``) and not ours: another claim
    came after ours (a peer returned the run to the queue and someone took it). None if
    there is none, or our claim is not in the history."""
    ours = next((s for s in history if s.state_details.get("transition_id") == transition_id), None)
    if ours is None or transition_id is None:
        return None
    later = [
        s
        for s in history
        if s.type is StateType.PENDING
        and s.state_details.get("transition_id") != transition_id
        and (s.timestamp or "") > (ours.timestamp or "")
    ]
    return max(later, key=lambda s: s.timestamp or "") if later else None


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
