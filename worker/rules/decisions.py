"""What the worker concludes from what it sees: orchestration answers and exit codes.

Pure functions and tables, called by the supervisor and by the tests directly.
"""

from __future__ import annotations

import datetime
import enum
import errno
import math
import signal
from collections.abc import Container
from typing import Final

import attrs

from worker.rules.models import FlowRun, OrchestrationResult, SetStateStatus, State, StateType

# ---------------------------------------------------------------- polled runs


class Verdict(enum.Enum):
    TAKE = "take"  # due and SCHEDULED: claim it
    OURS = "ours"  # this worker already handles it: nothing to say
    LATER = "later"  # SCHEDULED but not due yet: wake up when it is
    SKIP = "skip"  # not ours to start: say why, once


@attrs.frozen
class PollVerdict:
    verdict: Verdict
    reason: str = ""
    due_in: float = 0.0
    """Seconds until a LATER run is due."""


def poll_verdict(
    flow_run: FlowRun, known: bool, due_before: datetime.datetime, start: datetime.datetime | None
) -> PollVerdict:
    """What to do with one run of a poll's answer (``start``: its parsed scheduled time).

    ======================================  ========  =====================================
    the run                                 verdict   why
    ======================================  ========  =====================================
    live, owed or unresolved here           OURS      this worker already handles it
    state type unknown to this worker       SKIP      a newer server's state: never guess
    no state at all (no state, state_type)  SKIP      nothing says it is SCHEDULED
    state not SCHEDULED                     SKIP      never start what another has moved on
    scheduled after ``due_before``          LATER     polled by the look-ahead
    otherwise                               TAKE
    ======================================  ========  =====================================
    """
    if known:
        return PollVerdict(Verdict.OURS)
    if flow_run.unknown_state is not None:
        return PollVerdict(Verdict.SKIP, f"state type {flow_run.unknown_state!r} is unknown to this worker")
    state = flow_run.state
    if state is None:
        return PollVerdict(Verdict.SKIP, "the server sent no state for it (neither state nor state_type)")
    if state.type is not StateType.SCHEDULED:
        shown = f"{state.type.value} ({state.name})" if state.name else state.type.value
        return PollVerdict(Verdict.SKIP, f"its state is {shown}, not SCHEDULED")
    if start is not None and start > due_before:
        return PollVerdict(Verdict.LATER, due_in=(start - due_before).total_seconds())
    return PollVerdict(Verdict.TAKE)


@attrs.frozen
class Triage:
    take: list[FlowRun]
    """Due runs to claim now, in the server's order."""
    not_taken: list[tuple[FlowRun, str, str]]
    """(run, reason, log level) of each run polled but not taken that deserves a word."""
    due_in: float
    """Seconds until the next run seen by the look-ahead is due (inf: none)."""


def triage(
    flow_runs: list[FlowRun],
    known: Container[str],
    due_before: datetime.datetime,
    limit: int | None,
    active: int,
) -> Triage:
    """One poll's answer sorted out: ``poll_verdict`` for each run, then ``--limit``
    (``active`` runs in hand, adopted ones included) caps how many are taken."""
    take: list[FlowRun] = []
    not_taken: list[tuple[FlowRun, str, str]] = []
    due_in = math.inf
    for flow_run in flow_runs:
        start = parse_time(flow_run.next_scheduled_start_time)
        verdict = poll_verdict(flow_run, flow_run.id in known, due_before, start)
        if verdict.verdict is Verdict.SKIP:
            not_taken.append((flow_run, verdict.reason, "info"))
        elif verdict.verdict is Verdict.LATER:
            due_in = min(due_in, verdict.due_in)
        elif verdict.verdict is Verdict.TAKE:
            if limit is not None and active + len(take) >= limit:
                not_taken.append((flow_run, f"limit of {limit} active runs reached", "debug"))
            else:
                take.append(flow_run)
    return Triage(take, not_taken, due_in)


def parse_time(value: str | None) -> datetime.datetime | None:
    """An API timestamp as an aware datetime (None if absent or unreadable)."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace(" ", "T"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


@attrs.frozen
class ClaimOutcome:
    proceed: bool
    reason: str = ""


def claim_outcome(result: OrchestrationResult, transition_id: str) -> ClaimOutcome:
    """Whether a PENDING claim made the run ours.

    =========================================  ========  =====================================
    server answer                              proceed?  why
    =========================================  ========  =====================================
    ACCEPT, state PENDING                      yes       the claim was written
    REJECT, state PENDING with our transition  yes       our retried claim had already been
                                                         written (the first answer was lost)
    ABORT                                      no        another worker has it, or it is past
                                                         PENDING (RUNNING, CANCELLED …)
    REJECT (anything else)                     no        e.g. deployment concurrency limit
                                                         → AwaitingConcurrencySlot
    =========================================  ========  =====================================
    """
    state = result.state
    if result.status is SetStateStatus.ACCEPT and state is not None and state.type is StateType.PENDING:
        return ClaimOutcome(True)
    if (
        result.status is SetStateStatus.REJECT
        and state is not None
        and state.type is StateType.PENDING
        and state.state_details.get("transition_id") == transition_id
    ):
        return ClaimOutcome(True, "claim replayed after a lost answer")
    if result.status is SetStateStatus.ABORT:
        return ClaimOutcome(False, f"Server sent an abort signal: {result.reason}")
    shown = state.type.value if state is not None else "unknown"
    why = f": {result.reason}" if result.reason else ""
    return ClaimOutcome(False, f"Server returned a non-pending state {shown!r}{why}")


def claimed_from_scheduled(result: OrchestrationResult) -> bool:
    """The answer to a claim shows that it replaced a SCHEDULED state, so no race with a
    worker that finished the run meanwhile is possible (``displaced_state`` need not be read).

    The claim proposes PENDING without a ``scheduled_time``; the server's ``CopyScheduledTime``
    rule (Prefect's core flow policy, only for SCHEDULED → PENDING) copies the SCHEDULED
    state's ``scheduled_time`` into it. A PENDING written over COMPLETED, FAILED or CRASHED
    (the race of PROTOCOL §7.6) keeps none. So a ``scheduled_time`` in the answer's PENDING
    state proves the state it replaced was SCHEDULED; without one (also a SCHEDULED state
    that had none), the history is read as before.

    ==========================================  ============================================
    the claim's answer                          race ruled out?
    ==========================================  ============================================
    PENDING (accepted, or ours replayed) with   yes: it replaced a SCHEDULED state
    a scheduled_time
    anything else                               no: read the history (``displaced_state``)
    ==========================================  ============================================
    """
    state = result.state
    return bool(
        state is not None and state.type is StateType.PENDING and state.state_details.get("scheduled_time")
    )


def displaced_state(history: list[State], transition_id: str) -> State | None:
    """The state our accepted claim replaced, if it was not SCHEDULED; else None.

    The server accepts PENDING over COMPLETED (without a persisted result), FAILED and
    CRASHED, so a worker whose poll is stale can "claim" a run that another worker has
    already finished and execute it a second time (PROTOCOL §7 item 6, pain point 40).

    The state we replaced is the newest state that is not ours. "Newest" is by
    timestamp, which the server stamps when it *parses* a proposal, not when it commits
    it: under SQLite lock contention our PENDING may carry an older timestamp than the
    states it was committed after. So ours is excluded instead of used as an anchor.
    """
    newest = newest_other(history, transition_id)
    return None if newest is None or newest.type is StateType.SCHEDULED else newest


def newest_other(history: list[State], transition_id: str) -> State | None:
    """The newest state (by timestamp) not written by our transition ``transition_id``;
    None if ours is not in the history, or nothing else is: nothing to judge."""
    others = [s for s in history if s.state_details.get("transition_id") != transition_id]
    if len(others) == len(history) or not others:
        return None
    return max(others, key=lambda s: s.timestamp or "")


_EXPLANATIONS: Final[dict[int, str]] = {
    -signal.SIGKILL: (
        "Process exited due to a SIGKILL signal. Typically caused by the operating system "
        "terminating the process for exceeding memory limits, or by manual cancellation."
    ),
    -signal.SIGTERM: (
        "Process exited due to a SIGTERM signal. Typically caused by graceful shutdown or "
        "manual cancellation."
    ),
    1: "Process exited with a general error.",
    126: "Command found but not executable.",
    127: "Command not found.",
    137: (
        "Process exited with status code 137 (SIGKILL), typically caused by the operating "
        "system terminating the process for exceeding memory limits."
    ),
    143: "Process exited with status code 143 (SIGTERM): the flow run was terminated by a signal.",
}


def exit_message(returncode: int) -> str:
    """The CRASHED message for a process that exited with ``returncode`` (Prefect's
    wording, with the signal named for every signal, not just TERM and KILL)."""
    explanation = _EXPLANATIONS.get(returncode)
    if explanation is None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        explanation = f"Process exited due to a {name} signal."
    if explanation is None:
        explanation = "Process exited with an unexpected status code."
    return f"Process exited with status code: {returncode}. {explanation}"


_SHORTAGES: Final[dict[int, str]] = {
    errno.EMFILE: "too many open files",  # the worker's RLIMIT_NOFILE
    errno.ENFILE: "too many open files in the system",
    errno.ENOMEM: "not enough memory",
    errno.EAGAIN: "no process can be created now",  # a process or thread limit, or memory
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}
"""The errors that say the *host* is short of something, not that the run is wrong: a run
that meets one is not started now and goes back to SCHEDULED, for later or for a peer."""


def shortage(exc: BaseException) -> str | None:
    """What the host ran out of, if ``exc`` says it ran out of something (else None)."""
    if isinstance(exc, OSError) and exc.errno in _SHORTAGES:
        return _SHORTAGES[exc.errno]
    if isinstance(exc, MemoryError):
        return _SHORTAGES[errno.ENOMEM]
    return None


CANCELLED_MESSAGE: Final = "Flow run was cancelled successfully."
SUBMIT_FAILED: Final = "Failed to submit flow run to infrastructure: {}"
START_FAILED: Final = "Flow run could not start: {}"
INTERNAL_ERROR: Final = "Flow run could not be supervised: internal error in flow-worker: {}"
DEFERRED: Final = "Not started for now ({}): returned to the queue, for later or for another worker."
WORKER_STOPPED: Final = "The worker stopped before the flow run finished ({}); its process was terminated."


# ---------------------------------------------------------------- reconcile after a restart


class Action(enum.Enum):
    ADOPT = "adopt"  # the process still runs: watch it
    CRASH = "crash"  # the process is gone and the run is not final: report CRASHED
    RESCHEDULE = "reschedule"  # claimed but never started: back to SCHEDULED
    DELIVER = "deliver"  # a report was owed: deliver it
    FORGET = "forget"  # nothing left to do


@attrs.frozen
class Reconcile:
    action: Action
    message: str = ""


def reconcile(
    phase: str,
    has_report: bool,
    same_process_alive: bool,
    run_state: StateType | None,
    run_transition_id: str | None,
    claim_transition_id: str,
    pid: int | None,
) -> Reconcile:
    """What a restarted worker does about one ledger entry (``ledger.py`` phases).

    ==============  =========================  ===========================================
    phase           what is seen               action
    ==============  =========================  ===========================================
    any             a report is owed           DELIVER it
    started         same pid+start time+boot   ADOPT
    started         process gone, run live     CRASH (exit status unknown)
    claimed         run PENDING by our claim   RESCHEDULE
    claiming        run PENDING by our claim   RESCHEDULE
    any             run final or deleted       FORGET
    ==============  =========================  ===========================================
    """
    if has_report:
        return Reconcile(Action.DELIVER)
    if phase == "started" and same_process_alive:
        return Reconcile(Action.ADOPT)
    if run_state is None or run_state.is_final:
        return Reconcile(Action.FORGET)
    if phase == "started":
        return Reconcile(Action.CRASH, PROCESS_LOST.format(pid=pid))
    if (
        phase in ("claimed", "claiming")
        and run_state is StateType.PENDING
        and run_transition_id == claim_transition_id
    ):  # (a PENDING by another claim: a peer returned it to the queue and someone took it)
        return Reconcile(Action.RESCHEDULE, NEVER_STARTED)
    return Reconcile(Action.FORGET)


PROCESS_LOST: Final = (
    "The flow run's process (pid {pid}) ended while no worker was watching it "
    "(the worker stopped or crashed); its exit status is unknown."
)
NEVER_STARTED: Final = "Claimed by a worker that stopped before starting it; returned to the queue."
ADOPTED_EXIT: Final = (
    "The flow run's process exited without reporting a final state (it was adopted by a "
    "restarted worker, so its exit status is unknown)."
)
EXIT_UNKNOWN: Final = (
    "The flow run's process exited without reporting a final state; its exit status is unknown."
)
EXIT_0_NOT_FINAL: Final = (
    "The flow run's process exited with status 0 without reporting a final state "
    "(the command is not the Prefect engine, or the engine stopped early)."
)


# ---------------------------------------------------------------- a run's end


def stop_intent(on_stop: str) -> str:
    """What the engine is told when the worker stops its run (the ``on_stop`` setting)."""
    return "reschedule" if on_stop == "reschedule" else "relinquish"


def run_outcome(
    cancel_requested: bool,
    stop_requested: bool,
    returncode: int | None,
    on_stop: str,
    adopted: bool = False,
    stderr_tail: str = "",
    lost: str = "",
    oom: str = "",
) -> tuple[str, str]:
    """The report (``ledger.Report`` kind, message) owed for a run whose process is gone.

    ======================  ===========  ====================  ====================================
    why it ended            exit status  kind                  message
    ======================  ===========  ====================  ====================================
    a peer took the run     any          ``none``              ``lost`` (why): nothing is reported
    (``fence_verdict``)                                        over the peer's decision
    cancelled (CANCELLING)  any          ``cancelled``         CANCELLED_MESSAGE
    worker stopped it       any          ``reschedule`` if     WORKER_STOPPED (with the status, or
                                         on_stop=reschedule,   "exit status unknown")
                                         else ``crash``
    by itself               unknown      ``crash_if_running``  ADOPTED_EXIT (adopted) or
                                                               EXIT_UNKNOWN
    by itself               ≠ 0          ``crash``             exit_message(status)
    by itself               0            ``crash_if_running``  EXIT_0_NOT_FINAL
    ======================  ===========  ====================  ====================================

    ``oom`` (its cgroup counted an OOM kill: ``runlimits.oom_message``) replaces the exit
    status's message of a run that ended by itself other than with 0: the kernel's OOM
    killer ended it. A crash by itself (``crash``, ``crash_if_running``) also shows
    ``stderr_tail``, the process's last stderr lines, so the error itself is visible where
    the state is.
    """
    if lost:
        return "none", lost
    if cancel_requested:
        return "cancelled", CANCELLED_MESSAGE
    if stop_requested:
        code = exit_message(returncode) if returncode is not None else "exit status unknown"
        return ("reschedule" if on_stop == "reschedule" else "crash"), WORKER_STOPPED.format(code)
    said = f"\nLast lines of stderr:\n{stderr_tail}" if stderr_tail else ""
    if oom and returncode != 0:
        return ("crash" if returncode is not None else "crash_if_running"), oom + said
    if returncode is None:
        return "crash_if_running", (ADOPTED_EXIT if adopted else EXIT_UNKNOWN) + said
    if returncode != 0:
        return "crash", exit_message(returncode) + said
    return "crash_if_running", EXIT_0_NOT_FINAL + said


# ---------------------------------------------------------------- owed states


@attrs.frozen
class Proposal:
    type: StateType
    name: str
    force: bool


def owed_proposal(kind: str, current: StateType | None, taken: bool = False) -> Proposal | None:
    """The state to propose for an owed report (``ledger.Report.kind``), given the run's
    current state type (None: deleted) and whether another worker has
    ``taken`` it since (its ``prefect.worker.name`` label). None: nothing to write.

    ===================  =====================  ======================================
    kind                 run is now             propose
    ===================  =====================  ======================================
    any                  taken by another       nothing: a peer's decision stands
    any                  deleted                nothing
    any                  CANCELLING             CANCELLED (force): nothing else can end it
    ``cancelled``        not CANCELLED          CANCELLED (force)
    ``reschedule``       anything else          SCHEDULED (force)
    ``crash*``           SCHEDULED              nothing: back in the queue, it will run
                                                (a peer's reclaim, or a retry)
    ``crash*``           not final              CRASHED
    ``crash*``           final                  nothing
    ===================  =====================  ======================================
    """
    if taken or kind == "none" or current is None:
        return None
    if current is StateType.CANCELLING or kind == "cancelled":
        return None if current is StateType.CANCELLED else Proposal(StateType.CANCELLED, "Cancelled", True)
    if kind == "reschedule":
        return Proposal(StateType.SCHEDULED, "Scheduled", True)
    if not current.is_final and current is not StateType.SCHEDULED:
        return Proposal(StateType.CRASHED, "Crashed", False)
    return None
