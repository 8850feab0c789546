"""The fleet's pure tables (``worker.fleet``): every row of the reclaim and fence tables."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

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
