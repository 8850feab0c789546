"""The fleet's pure tables (``worker.fleet``): every row of the reclaim and fence tables."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.fleet.reclaim import check_seconds
from worker.host import settings
from worker.rules import fleet
from worker.rules.fleet import Fence, Reclaim
from worker.rules.models import FlowRun, State, StateType, WorkerRecord

NOW = datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.UTC)
ME = "host-b pool"
LOST = "host-a pool"


def ago(seconds: float) -> str:
    return (NOW - datetime.timedelta(seconds=seconds)).isoformat()


def run(
    state: StateType | None,
    *,
    owner: str | None = LOST,
    changed: float = 1000.0,
    transition: str | None = "claim-a",
    message: str | None = None,
) -> FlowRun:
    labels = {fleet.OWNER_LABEL: owner} if owner else {}
    st = (
        State(
            state,
            id="state-1",
            timestamp=ago(changed),
            message=message,
            state_details={"transition_id": transition},
        )
        if state
        else None
    )
    return FlowRun(id="run-1", name="r", state=st, labels=labels)


def record(silent: float | None, interval: float = 30.0) -> WorkerRecord:
    return WorkerRecord(LOST, ago(silent) if silent is not None else None, interval)


def verdict(flow_run: FlowRun, owner_record: WorkerRecord | None, **kw: Any) -> fleet.ReclaimVerdict:
    args: dict[str, Any] = {"ours": False, "reclaim_after": 300.0, "on_lost": "crash"} | kw
    return fleet.reclaim_verdict(flow_run, owner_record, NOW, ME, **args)


@pytest.mark.parametrize(
    ("flow_run", "owner_record", "kw", "action"),
    [
        # reclaim_after = 0: off
        (run(StateType.RUNNING), record(1000), {"reclaim_after": 0.0}, Reclaim.LEAVE),
        # this worker's own runs, by hand or by name
        (run(StateType.RUNNING), record(1000), {"ours": True}, Reclaim.LEAVE),
        (run(StateType.RUNNING, owner=ME), record(1000), {}, Reclaim.LEAVE),
        # nothing stuck
        (run(StateType.SCHEDULED), record(1000), {}, Reclaim.LEAVE),
        (run(StateType.COMPLETED), record(1000), {}, Reclaim.LEAVE),
        (run(None), record(1000), {}, Reclaim.LEAVE),
        # no owner label
        (run(StateType.RUNNING, owner=None), None, {}, Reclaim.UNOWNED),
        # owner alive, however long the run takes
        (run(StateType.RUNNING, changed=86400), record(5), {}, Reclaim.LEAVE),
        (run(StateType.RUNNING), record(300), {}, Reclaim.LEAVE),
        # ... or still ONLINE by its own (long) heartbeat interval
        (run(StateType.RUNNING), record(400, interval=200), {}, Reclaim.LEAVE),
        # state changed lately: someone acted on it
        (run(StateType.PENDING, changed=10), record(1000), {}, Reclaim.LEAVE),
        # lost owner
        (run(StateType.PENDING), record(1000), {}, Reclaim.RESCHEDULE),
        (run(StateType.RUNNING), record(1000), {}, Reclaim.CRASH),
        (run(StateType.RUNNING), record(1000), {"on_lost": "reschedule"}, Reclaim.RESCHEDULE),
        (run(StateType.CANCELLING), record(1000), {}, Reclaim.CANCEL),
        # an owner the pool never recorded counts as silent
        (run(StateType.RUNNING), None, {}, Reclaim.CRASH),
        (run(StateType.RUNNING), record(None), {}, Reclaim.CRASH),
    ],
)
def test_reclaim_table(
    flow_run: FlowRun, owner_record: WorkerRecord | None, kw: dict[str, Any], action: Reclaim
) -> None:
    assert verdict(flow_run, owner_record, **kw).action is action


def test_reclaim_messages_name_the_lost_worker_and_when_it_was_seen() -> None:
    v = verdict(run(StateType.RUNNING), record(312))
    assert v.action is Reclaim.CRASH
    assert repr(LOST) in v.reason and ago(312) in v.reason and "312 s" in v.reason
    assert repr(ME) in v.reason and "300 s" in v.reason
    never = verdict(run(StateType.RUNNING), None)
    assert "never seen heartbeating" in never.reason


def test_the_limit_is_inclusive_and_the_unchanged_state_guards_a_fresh_claim() -> None:
    assert verdict(run(StateType.RUNNING), record(300.0)).action is Reclaim.LEAVE
    assert verdict(run(StateType.RUNNING), record(300.5)).action is Reclaim.CRASH
    assert verdict(run(StateType.PENDING, changed=299), record(1000)).action is Reclaim.LEAVE
    assert verdict(run(StateType.PENDING, changed=300), record(1000)).action is Reclaim.RESCHEDULE


@pytest.mark.parametrize(
    ("started", "current", "expected"),
    [
        (False, None, Fence.LOST),
        (True, None, Fence.LOST),
        (True, run(StateType.RUNNING, owner="host-c pool"), Fence.LOST),
        (False, run(StateType.PENDING, owner="host-c pool", transition="other"), Fence.LOST),
        (False, run(StateType.PENDING, owner=ME, transition="claim-a"), Fence.KEEP),
        (False, run(StateType.PENDING, owner=None, transition="claim-a"), Fence.KEEP),
        # our claim, still labelled with its previous owner's name (our label write failed)
        (False, run(StateType.PENDING, owner="host-a pool", transition="claim-a"), Fence.KEEP),
        (False, run(StateType.SCHEDULED, owner=ME), Fence.LOST),
        (False, run(StateType.PENDING, owner=ME, transition="other"), Fence.LOST),
        (True, run(StateType.SCHEDULED, owner=ME), Fence.LOST),
        (True, run(StateType.CRASHED, owner=ME, message="Worker lost"), Fence.LOST),
        (True, run(StateType.CANCELLED, owner=ME), Fence.LOST),
        (True, run(StateType.PENDING, owner=ME, transition="other"), Fence.LOST),
        (True, run(StateType.PENDING, owner=ME, transition="claim-a"), Fence.KEEP),
        (True, run(StateType.RUNNING, owner=ME), Fence.KEEP),
        (True, run(StateType.CANCELLING, owner=ME), Fence.KEEP),
        (True, run(StateType.COMPLETED, owner=ME), Fence.KEEP),
        (True, run(StateType.FAILED, owner=ME), Fence.KEEP),
    ],
)
def test_fence_table(started: bool, current: FlowRun | None, expected: Fence) -> None:
    assert fleet.fence_verdict(started, current, ME, "claim-a").verdict is expected


def test_a_run_adopted_under_another_name_is_still_ours() -> None:
    # a restarted worker without a fixed name adopts runs labelled with its previous name
    previous = run(StateType.RUNNING, owner="ProcessWorker old")
    assert fleet.fence_verdict(True, previous, ME, "claim-a", "ProcessWorker old").verdict is Fence.KEEP
    assert fleet.fence_verdict(True, previous, ME, "claim-a").verdict is Fence.LOST


# ---------------------------------------------------------------- the owner: claim mark, else label

names = st.text(min_size=1, max_size=40)
state_types = st.sampled_from(list(StateType))
messages = st.one_of(
    st.none(),
    st.text(max_size=60),
    names.map(fleet.claim_message),
    st.text(max_size=20).map(lambda t: fleet.CLAIM_MARK + t),  # a mark's prefix, then anything
)
labels = st.dictionaries(
    st.one_of(st.just(fleet.OWNER_LABEL), st.text(max_size=10)),
    st.one_of(st.text(max_size=20), st.integers(), st.none()),
    max_size=3,
)


@hsettings(max_examples=300, deadline=None)
@given(names)
def test_a_claim_mark_reads_back_any_name(name: str) -> None:
    pending = State(StateType.PENDING, message=fleet.claim_message(name))
    assert fleet.claim_mark(pending) == name
    assert fleet.owner(FlowRun("r", state=pending, labels={fleet.OWNER_LABEL: "someone else"})) == name
    # the mark counts only on a PENDING state (the claim's): a later state's message is its own
    assert fleet.claim_mark(State(StateType.RUNNING, message=fleet.claim_message(name))) is None


@hsettings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), state_types), messages, labels)
def test_the_owner_is_the_claims_mark_on_a_pending_run_else_the_label(
    type_: StateType | None, message: str | None, run_labels: dict[str, Any]
) -> None:
    current = State(type_, message=message) if type_ is not None else None
    who = fleet.owner(FlowRun("r", state=current, labels=run_labels))
    mark = fleet.claim_mark(current)
    label = run_labels.get(fleet.OWNER_LABEL)
    if mark is not None:
        assert type_ is StateType.PENDING and who == mark and message == fleet.claim_message(mark)
    else:
        assert who == (str(label) if label else None)
    assert who is None or (isinstance(who, str) and who != "")


def test_a_prefect_workers_claim_or_a_users_message_names_nobody() -> None:
    for message in (
        None,
        "",
        "Pending",
        "Claimed by worker",
        fleet.CLAIM_MARK + "x",
        fleet.CLAIM_MARK + '""',
    ):
        assert fleet.claim_mark(State(StateType.PENDING, message=message)) is None, message


def test_a_pending_claim_named_by_its_mark_is_judged_by_its_claimer_not_the_stale_label() -> None:
    """A rescheduled run still labelled with its lost previous owner, claimed by a live peer
    whose start waits: the reclaim loop sees the claimer (alive), not the lost owner."""
    claimed = run(StateType.PENDING, owner=LOST, message=fleet.claim_message("host-c pool"))
    alive = WorkerRecord("host-c pool", ago(5), 30.0)
    assert verdict(claimed, alive).action is Reclaim.LEAVE
    # the claimer itself gone silent: its claim goes back to the queue, naming it
    gone = verdict(claimed, WorkerRecord("host-c pool", ago(1000), 30.0))
    assert gone.action is Reclaim.RESCHEDULE and "'host-c pool'" in gone.reason


def test_the_fence_before_our_label_is_on() -> None:
    """Started, our label not written yet: a label naming another worker may be the
    previous owner's, so it decides nothing (the fence then reads the history); the
    state and a claim mark still do."""
    stale = run(StateType.RUNNING, owner=LOST)
    assert fleet.fence_verdict(True, stale, ME, "claim-a", labelled=False).verdict is Fence.KEEP
    assert fleet.fence_verdict(True, stale, ME, "claim-a").verdict is Fence.LOST
    other = run(StateType.PENDING, owner=LOST, transition="other", message=fleet.claim_message("host-c pool"))
    lost = fleet.fence_verdict(True, other, ME, "claim-a", labelled=False)
    assert lost.verdict is Fence.LOST and "host-c pool" in lost.reason
    back = run(StateType.SCHEDULED, owner=LOST)
    assert fleet.fence_verdict(True, back, ME, "claim-a", labelled=False).verdict is Fence.LOST


def test_claimed_since() -> None:
    ours = state("s1", "t1", "claim-a")
    running = state("s2", "t2", "engine", StateType.RUNNING)
    assert fleet.claimed_since([ours, running], "claim-a") is None
    again = [ours, running, state("s3", "t3", "reclaim", StateType.SCHEDULED), state("s4", "t4", "claim-c")]
    assert fleet.claimed_since(again, "claim-a") == again[-1]
    # an older claim (the previous owner's) is not a later one; ours missing: nothing to judge
    assert fleet.claimed_since([state("s0", "t0", "claim-z"), ours, running], "claim-a") is None
    assert fleet.claimed_since(again, "not-ours") is None


def state(sid: str, ts: str, transition: str | None = None, type_: StateType = StateType.PENDING) -> State:
    return State(type_, id=sid, timestamp=ts, state_details={"transition_id": transition})


def test_reclaim_race_check() -> None:
    read = state("s1", "t1", "claim-a")
    ours = state("s9", "t3", "reclaim", StateType.SCHEDULED)
    # nothing came between our read and our write
    assert (
        fleet.reclaim_raced([state("s0", "t0", type_=StateType.SCHEDULED), read, ours], "reclaim", "s1")
        is None
    )
    # another worker claimed it in between: its claim is the state to put back
    newer = state("s2", "t2", "claim-c")
    assert fleet.reclaim_raced([read, newer, ours], "reclaim", "s1") == newer
    # our write is not in the history: nothing to judge
    assert fleet.reclaim_raced([read, newer], "reclaim", "s1") is None


def test_reclaim_settings_and_the_stable_name_under_systemd(tmp_path: Any) -> None:
    s = settings.load({"pool": "etl"}, environ={})
    assert (s.reclaim_after, s.on_lost) == (300.0, "crash")
    assert s.worker_name.startswith("ProcessWorker ")
    s = settings.load(
        {"pool": "etl"}, environ={"FLOW_WORKER_RECLAIM_AFTER": "0", "FLOW_WORKER_ON_LOST": "reschedule"}
    )
    assert (s.reclaim_after, s.on_lost) == (0.0, "reschedule")
    with pytest.raises(settings.SettingsError, match="'on_lost' = 'later': must be 'crash' or 'reschedule'"):
        settings.load({"pool": "etl"}, environ={"FLOW_WORKER_ON_LOST": "later"})
    with pytest.raises(settings.SettingsError, match="'reclaim_after' = '-1': must be 0"):
        settings.load({"pool": "etl"}, environ={"FLOW_WORKER_RECLAIM_AFTER": "-1"})
    with pytest.raises(settings.SettingsError, match="unknown setting 'service_host'"):
        settings.load({"pool": "etl"}, environ={"FLOW_WORKER_SERVICE_HOST": "x"})
    systemd = {"INVOCATION_ID": "0123"}
    a = settings.load({"pool": "etl"}, environ=systemd)
    b = settings.load({"pool": "etl"}, environ=systemd)
    assert a.worker_name == b.worker_name == f"{a.service_host} etl"
    assert settings.load({"pool": "etl", "once": True}, environ=systemd).worker_name.endswith(" etl once")
    assert settings.load({"pool": "etl", "name": "mine"}, environ=systemd).worker_name == "mine"


def test_the_check_interval() -> None:
    assert check_seconds(settings.Settings(pool="p")) == 5.0  # half the poll interval
    assert check_seconds(settings.Settings(pool="p", query_seconds=1, reclaim_after=12)) == 2.0  # floor
    assert check_seconds(settings.Settings(pool="p", query_seconds=60, reclaim_after=20)) == 20


def test_runs_are_swept_when_a_worker_has_just_gone_silent() -> None:
    workers = [
        WorkerRecord("alive", ago(5)),
        WorkerRecord("just-lost", ago(310)),
        WorkerRecord("long-gone", ago(86400)),
        WorkerRecord("no-beat", None),
    ]
    assert fleet.newly_silent(workers, NOW, 300, 60) == ["just-lost"]
    assert fleet.newly_silent(workers[:1], NOW, 300, 60) == []


def test_a_fresh_unowned_claim_is_not_even_mentioned() -> None:
    # a claim whose owner label is still on its way: not "unowned", just recent
    assert verdict(run(StateType.PENDING, owner=None, changed=1), None).action is Reclaim.LEAVE


class FakeClient:
    def __init__(self, current: FlowRun | None) -> None:
        self.current = current
        self.reads = 0

    async def read_flow_run(self, run_id: str) -> FlowRun | None:
        self.reads += 1
        return self.current


async def test_the_fence_waits_for_a_heartbeat_then_checks_the_claim(autojump_clock: Any) -> None:
    import trio

    from worker.fleet.reclaim import Fencer
    from worker.host.metrics import Metrics

    ours = run(StateType.PENDING, owner=ME, transition="claim-a")
    client = FakeClient(ours)
    fencer = Fencer(settings.Settings(pool="p", name=ME, reclaim_after=10), client, Metrics())  # type: ignore[arg-type]
    claimed = trio.current_time()
    assert await fencer.still_ours("run-1", "claim-a", claimed) == ""
    assert client.reads == 0  # no gap since the claim: nothing to ask

    await trio.sleep(6)  # half of reclaim_after without a heartbeat
    assert fencer.fenced()
    answers: list[str] = []

    async def check() -> None:
        answers.append(await fencer.still_ours("run-1", "claim-a", claimed))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await trio.sleep(30)
        assert answers == [] and client.reads == 0  # waits while fenced
        assert fencer.beat(trio.current_time()) is True  # the gap ends
    assert answers == [""] and client.reads == 1  # still ours: checked once

    # a later check for the same claim reads again (a gap happened since) and finds it taken
    client.current = run(StateType.PENDING, owner="host-c pool", transition="claim-c")
    assert "host-c pool" in await fencer.still_ours("run-1", "claim-a", claimed)
    assert fencer.beat(trio.current_time()) is False  # no new gap


async def test_undisputed_claims_are_those_of_this_process_with_no_gap_since(autojump_clock: Any) -> None:
    import time

    import trio

    from worker.books.ledger import Entry
    from worker.fleet.reclaim import Fencer
    from worker.host.metrics import Metrics

    fencer = Fencer(settings.Settings(pool="p", name=ME, reclaim_after=10), FakeClient(None), Metrics())  # type: ignore[arg-type]

    def claim(at: float | None) -> Entry:
        return Entry("run-1", "r", "p", ME, "started", claimed_at=at)

    before = claim(fencer.since_wall - 1)  # claimed by a previous process: a restart is a gap
    now = claim(time.time())
    assert fencer.undisputed(now) and not fencer.undisputed(before) and not fencer.undisputed(claim(None))
    await trio.sleep(6)  # fenced now: a peer may be about to take it
    assert not fencer.undisputed(now)
    assert fencer.beat(trio.current_time()) is True  # the gap ends: anything claimed before it is disputed
    assert not fencer.undisputed(now)
    assert fencer.undisputed(claim(time.time() + 1))


class HandleStub:
    def __init__(self) -> None:
        self.claim, self.owner, self.lost, self.pid = "claim-a", None, "", 1
        self.log = structlog.get_logger()

    def lose(self, reason: str) -> None:
        self.lost = reason


class GapClient(FakeClient):
    def __init__(self, current: FlowRun, history: list[State]) -> None:
        super().__init__(current)
        self.history = history

    async def filter_flow_runs(self, ids: Any) -> list[FlowRun]:
        assert self.current is not None
        return [self.current]

    async def read_flow_run_states(self, run_id: str) -> list[State]:
        self.reads += 1
        return self.history


@pytest.mark.parametrize("taken", [False, True])
async def test_a_started_run_whose_label_is_not_on_yet_is_judged_by_its_history(taken: bool) -> None:
    """After a gap, a started run still carries its previous owner's label (ours failed):
    the history says whether another claim came after ours."""
    from worker.fleet.reclaim import Fencer
    from worker.host.metrics import Metrics

    history = [state("s1", "t1", "claim-a"), state("s2", "t2", "engine", StateType.RUNNING)]
    if taken:
        history += [state("s3", "t3", "r", StateType.SCHEDULED), state("s4", "t4", "claim-c")]
        history += [state("s5", "t5", "engine-c", StateType.RUNNING)]
    client = GapClient(run(StateType.RUNNING, owner=LOST), history)
    fencer = Fencer(settings.Settings(pool="p", name=ME, reclaim_after=10), client, Metrics())  # type: ignore[arg-type]
    fencer.unlabelled = lambda run_id: True
    handle = HandleStub()
    await fencer.check_live({"run-1": handle})  # type: ignore[dict-item]
    assert client.reads == 1 and bool(handle.lost) is taken
