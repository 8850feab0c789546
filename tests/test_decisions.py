"""Pure decisions: claim outcomes, displaced claims, exit-code messages."""

from __future__ import annotations

from typing import Any

from worker.rules import decisions
from worker.rules.models import OrchestrationResult, SetStateStatus, State, StateType


def result(status: str, state_type: StateType, reason: str = "", tid: str = "x") -> OrchestrationResult:
    return OrchestrationResult(
        SetStateStatus(status),
        State(state_type, state_details={"transition_id": tid}),
        {"reason": reason} if reason else {},
    )


def test_claim_table() -> None:
    assert decisions.claim_outcome(result("ACCEPT", StateType.PENDING), "t").proceed
    replay = decisions.claim_outcome(result("REJECT", StateType.PENDING, "already", tid="t"), "t")
    assert replay.proceed
    other = decisions.claim_outcome(result("REJECT", StateType.PENDING, "already", tid="other"), "t")
    assert not other.proceed
    abort = decisions.claim_outcome(result("ABORT", StateType.PENDING, "This run is in a PENDING state"), "t")
    assert abort == decisions.ClaimOutcome(
        False, "Server sent an abort signal: This run is in a PENDING state"
    )
    slot = decisions.claim_outcome(
        result("REJECT", StateType.SCHEDULED, "Deployment concurrency limit reached."), "t"
    )
    assert (
        slot.reason
        == "Server returned a non-pending state 'SCHEDULED': Deployment concurrency limit reached."
    )


def s(state_type: StateType, ts: str, tid: str = "") -> State:
    return State(state_type, timestamp=ts, state_details={"transition_id": tid} if tid else {})


def test_displaced_state() -> None:
    ours = "mine"
    normal = [s(StateType.SCHEDULED, "1"), s(StateType.PENDING, "2", ours)]
    assert decisions.displaced_state(normal, ours) is None
    # another worker ran it in between; our PENDING was stamped before it committed
    raced = [
        s(StateType.SCHEDULED, "1"),
        s(StateType.PENDING, "2", "theirs"),
        s(StateType.PENDING, "3", ours),
        s(StateType.RUNNING, "4"),
        s(StateType.COMPLETED, "5"),
    ]
    displaced = decisions.displaced_state(raced, ours)
    assert displaced is not None and displaced.type is StateType.COMPLETED
    retried = [s(StateType.FAILED, "1"), s(StateType.SCHEDULED, "2"), s(StateType.PENDING, "3", ours)]
    assert decisions.displaced_state(retried, ours) is None
    assert decisions.displaced_state(normal, "not-in-history") is None


def test_exit_messages() -> None:
    assert decisions.exit_message(3) == (
        "Process exited with status code: 3. Process exited with an unexpected status code."
    )
    assert "SIGTERM signal" in decisions.exit_message(-15)
    assert "SIGKILL signal" in decisions.exit_message(-9)
    assert (
        decisions.exit_message(-11)
        == "Process exited with status code: -11. Process exited due to a SIGSEGV signal."
    )
    assert decisions.exit_message(127).endswith("Command not found.")


def test_owed_proposal_table() -> None:
    p = decisions.owed_proposal
    assert p("reschedule", StateType.RUNNING) == decisions.Proposal(StateType.SCHEDULED, "Scheduled", True)
    assert p("reschedule", None) is None  # deleted
    assert p("crash", StateType.CANCELLING) == decisions.Proposal(StateType.CANCELLED, "Cancelled", True)
    assert p("cancelled", StateType.CRASHED) == decisions.Proposal(StateType.CANCELLED, "Cancelled", True)
    assert p("cancelled", StateType.CANCELLED) is None
    assert p("crash", StateType.RUNNING) == decisions.Proposal(StateType.CRASHED, "Crashed", False)
    assert p("crash_if_running", StateType.PENDING) == decisions.Proposal(StateType.CRASHED, "Crashed", False)
    assert p("crash_if_running", StateType.COMPLETED) is None
    assert p("crash", None) is None
    # a run back in the queue (a peer's reclaim, or an AwaitingRetry) is not crashed: it will run
    assert p("crash_if_running", StateType.SCHEDULED) is None
    assert p("crash", StateType.SCHEDULED) is None
    # a run another worker has taken since: nothing is written over the peer's decision
    for kind in ("reschedule", "crash", "crash_if_running", "cancelled"):
        assert p(kind, StateType.RUNNING, taken=True) is None
    assert p("none", StateType.RUNNING) is None


def test_a_run_lost_to_a_peer_owes_nothing() -> None:
    assert decisions.run_outcome(False, True, -15, "crash", lost="crashed by a peer") == (
        "none",
        "crashed by a peer",
    )


def test_claimed_from_scheduled() -> None:
    """The server copies the SCHEDULED state's scheduled_time into the claim's PENDING
    (CopyScheduledTime), never from a final state: then no race is possible."""

    def answer(status: SetStateStatus, type_: StateType | None, **details: Any) -> OrchestrationResult:
        return OrchestrationResult(status, State(type_, state_details=details) if type_ else None)

    when = "2026-12-03T04:00:00+00:00"
    assert decisions.claimed_from_scheduled(
        answer(SetStateStatus.ACCEPT, StateType.PENDING, scheduled_time=when)
    )
    # replayed after a lost answer: the current state is our PENDING, which carries it too
    replayed = answer(SetStateStatus.REJECT, StateType.PENDING, scheduled_time=when, transition_id="t")
    assert decisions.claimed_from_scheduled(replayed)
    # over COMPLETED / FAILED / CRASHED (the race): no scheduled_time, so the history is read
    assert not decisions.claimed_from_scheduled(answer(SetStateStatus.ACCEPT, StateType.PENDING))
    assert not decisions.claimed_from_scheduled(
        answer(SetStateStatus.ACCEPT, StateType.PENDING, scheduled_time=None)
    )
    assert not decisions.claimed_from_scheduled(answer(SetStateStatus.ABORT, None))
    assert not decisions.claimed_from_scheduled(
        answer(SetStateStatus.REJECT, StateType.SCHEDULED, scheduled_time=when)
    )
