"""The reporter's crash reports without a read first (``Reporter._current``): the server's
answer to the proposal says what the read would have, against a fake that orchestrates
as Prefect 3.9.1 does for CRASHED (final → ABORT, CANCELLING → REJECT, a repeated
transition → REJECT, else ACCEPT), and its history."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.books.ledger import Entry, Ledger
from worker.books.reporter import Reads, Reporter
from worker.host.metrics import Metrics
from worker.prefect.answers import ApiNotFound, ApiUnavailable
from worker.prefect.outage import Outage
from worker.rules.models import FlowRun, OrchestrationResult, SetStateStatus, State, StateType

LOG = structlog.get_logger()


class Server:
    """One run's history, orchestrated like the server for the proposals a reporter makes."""

    def __init__(self, type_: StateType | None, owner: str | None = None) -> None:
        self.history = [State(type_, id="s0", timestamp="t0", state_details={"transition_id": "engine"})]
        self.deleted = type_ is None
        self.owner = owner
        self.calls: list[str] = []

    @property
    def current(self) -> State:
        return self.history[-1]

    async def read_flow_run(self, run_id: str) -> FlowRun | None:
        self.calls.append("read")
        labels = {"prefect.worker.name": self.owner} if self.owner else {}
        return None if self.deleted else FlowRun(run_id, state=self.current, labels=labels)

    async def filter_flow_runs(self, ids: list[str]) -> list[FlowRun]:
        self.calls.append("read")
        labels = {"prefect.worker.name": self.owner} if self.owner else {}
        return [] if self.deleted else [FlowRun(i, state=self.current, labels=labels) for i in ids]

    async def read_flow_run_states(self, run_id: str) -> list[State]:
        self.calls.append("history")
        return list(self.history)

    async def set_flow_run_state(
        self, run_id: str, type_: StateType, name: str, message: str | None = None, **kw: Any
    ) -> OrchestrationResult:
        self.calls.append(f"set {type_.value}")
        if self.deleted:
            raise ApiNotFound("POST", f"/flow_runs/{run_id}/set_state", 404, "Flow run not found")
        tid = kw.get("transition_id")
        now = self.current
        if not kw.get("force"):
            if now.state_details.get("transition_id") == tid:
                return OrchestrationResult(SetStateStatus.REJECT, now, {"reason": "already made"})
            if now.type.is_final:
                return OrchestrationResult(SetStateStatus.ABORT, now, {"reason": "terminal"})
            if now.type is StateType.CANCELLING and type_ is not StateType.CANCELLED:
                return OrchestrationResult(SetStateStatus.REJECT, now, {"reason": "cancelling"})
        new = State(
            type_,
            id=f"s{len(self.history)}",
            timestamp=f"t{len(self.history)}",
            message=message,
            state_details={**(kw.get("state_details") or {}), "transition_id": tid},
        )
        self.history.append(new)
        return OrchestrationResult(SetStateStatus.ACCEPT, new)

    async def restore_state(self, run_id: str, state: State) -> OrchestrationResult:
        details = dict(state.state_details)
        tid = details.pop("transition_id", None)
        return await self.set_flow_run_state(
            run_id,
            state.type,
            state.name or "",
            state.message,
            force=True,
            state_details=details,
            transition_id=tid,
        )


def reporter(tmp_path: Path, server: Server, undisputed: bool = True) -> Reporter:
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    metrics = Metrics()
    r = Reporter(server, ledger, Outage(metrics=metrics), metrics, "pool", "w")  # type: ignore[arg-type]
    r.undisputed = lambda entry: undisputed
    return r


def entry() -> Entry:
    return Entry("r1", "name", "pool", "w", "started", pid=123, claimed_at=1.0)


async def test_a_clean_exit_after_the_engine_finished_costs_one_read(tmp_path: Path) -> None:
    """Never a blind proposal: an ABORT would take the server's write lock, a read none."""
    server = Server(StateType.COMPLETED)
    r = reporter(tmp_path, server)
    await r.finish(entry(), LOG, "crash_if_running", "exit 0")
    assert server.calls == ["read"]
    assert server.current.type is StateType.COMPLETED and r.failed_runs == 0 and r.owed == {}
    assert r.metrics.runs_finished["COMPLETED"] == 1


async def test_a_real_crash_is_written_and_reads_only_what_it_replaced(tmp_path: Path) -> None:
    server = Server(StateType.RUNNING)
    r = reporter(tmp_path, server)
    await r.finish(entry(), LOG, "crash", "boom")
    assert server.calls == ["set CRASHED", "history"]
    assert server.current.type is StateType.CRASHED and server.current.message == "boom"
    assert r.metrics.runs_finished["CRASHED"] == 1 and r.owed == {}


async def test_a_cancelling_run_is_cancelled_as_after_a_read(tmp_path: Path) -> None:
    server = Server(StateType.CANCELLING)
    r = reporter(tmp_path, server)
    await r.finish(entry(), LOG, "crash", "boom")
    assert server.calls == ["set CRASHED", "set CANCELLED"]
    assert server.current.type is StateType.CANCELLED


async def test_a_crash_never_stays_over_a_scheduled_state(tmp_path: Path) -> None:
    """SCHEDULED is back in the queue (the engine's own reschedule): a crash report writes
    nothing over it; proposed blind and accepted, it is put back at once."""
    server = Server(StateType.SCHEDULED)
    r = reporter(tmp_path, server)
    await r.finish(entry(), LOG, "crash", "boom")
    assert server.calls == ["set CRASHED", "history", "set SCHEDULED"]
    assert server.current.type is StateType.SCHEDULED


async def test_a_deleted_run_is_not_needed(tmp_path: Path) -> None:
    server = Server(None)
    r = reporter(tmp_path, server)
    await r.finish(entry(), LOG, "crash", "boom")
    assert server.calls == ["set CRASHED"] and r.owed == {}


async def test_a_replayed_delivery_finds_its_own_crash(tmp_path: Path) -> None:
    server = Server(StateType.RUNNING)
    r = reporter(tmp_path, server)
    owed = r.owe(entry(), "crash", "boom")
    await r.deliver(owed)
    r.owed[owed.flow_run_id] = owed  # as if the answer had been lost: delivered again
    done = await r.deliver(owed)
    assert done.found is StateType.CRASHED and done.found_ours and done.proposed is None
    assert [s.type for s in server.history] == [StateType.RUNNING, StateType.CRASHED]


@pytest.mark.parametrize("kind", ["crash", "crash_if_running", "cancelled", "reschedule"])
async def test_after_a_gap_or_for_other_reports_the_run_is_read_first(tmp_path: Path, kind: str) -> None:
    """A peer may have taken the run during a heartbeat gap: read it, and write nothing over
    a peer's run; reports that force their state always read first."""
    server = Server(StateType.RUNNING, owner="someone else")
    r = reporter(tmp_path, server, undisputed=kind not in ("crash", "crash_if_running"))
    await r.finish(entry(), LOG, kind, "boom")
    assert server.calls == ["read"] and server.current.type is StateType.RUNNING


class SlowReads:
    """``filter_flow_runs`` that takes a second, records its batches, and can fail."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail

    async def filter_flow_runs(self, ids: list[str]) -> list[FlowRun]:
        self.batches.append(list(ids))
        await trio.sleep(1)
        if self.fail:
            raise ApiUnavailable("POST", "/flow_runs/filter", 503, "busy")
        return [FlowRun(i, state=State(StateType.COMPLETED)) for i in ids if i != "gone"]


async def test_reads_of_runs_finishing_together_are_one_request(autojump_clock: Any) -> None:
    client = SlowReads()
    reads = Reads(client)  # type: ignore[arg-type]
    found: dict[str, FlowRun | None] = {}

    async def ask(run_id: str) -> None:
        found[run_id] = await reads.read(run_id)

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(ask, f"r{i}")
            await trio.sleep(0.1)  # a finish every 0.1 s, each read takes 1 s
        nursery.start_soon(ask, "gone")
    assert len(client.batches) <= 5 and sorted(i for b in client.batches for i in b) == sorted(found)
    assert found["gone"] is None and all(r is not None for k, r in found.items() if k != "gone")
    assert reads.waiting == {} and not reads.reading


async def test_a_failed_read_fails_its_batch_and_a_cancelled_reader_strands_nobody(
    autojump_clock: Any,
) -> None:
    client = SlowReads(fail=True)
    reads = Reads(client)  # type: ignore[arg-type]
    failed: list[str] = []

    async def ask(run_id: str) -> None:
        try:
            await reads.read(run_id)
        except ApiUnavailable:
            failed.append(run_id)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(ask, f"r{i}")
    assert sorted(failed) == [f"r{i}" for i in range(5)] and reads.waiting == {}

    client.fail = False
    answered: list[str] = []

    async def ask_ok(run_id: str) -> None:
        if await reads.read(run_id) is not None:
            answered.append(run_id)

    leader = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_scoped, leader, reads.read, "first")
        await trio.sleep(0.5)
        for i in range(3):
            nursery.start_soon(ask_ok, f"w{i}")
        await trio.sleep(0.1)
        leader.cancel()  # the reader goes away mid-read: a waiter reads in its place
    assert sorted(answered) == ["w0", "w1", "w2"] and reads.waiting == {}


class FlakyReads:
    """``filter_flow_runs`` that fails at once (a busy server's answer past the deadline)
    or answers after a few scheduler turns, as ``pattern`` says, call by call."""

    def __init__(self, pattern: list[int]) -> None:
        self.pattern = pattern
        self.calls = 0

    async def filter_flow_runs(self, ids: list[str]) -> list[FlowRun]:
        turns = self.pattern[self.calls % len(self.pattern)]
        self.calls += 1
        if turns < 0:
            raise ApiUnavailable("POST", "/flow_runs/filter", 503, "busy")
        for _ in range(turns):
            await trio.sleep(0)
        return [FlowRun(i, state=State(StateType.COMPLETED)) for i in ids]


@given(
    pattern=st.lists(st.integers(min_value=-1, max_value=3), min_size=1, max_size=6),
    arrivals=st.lists(st.integers(min_value=0, max_value=3), min_size=2, max_size=8),
)
@settings(max_examples=150)
def test_every_reader_is_answered_whatever_fails_and_when(pattern: list[int], arrivals: list[int]) -> None:
    """Review of issue 22's shared reads: a read that failed while a woken waiter had not
    run yet left that waiter "lead" of nothing, and every later read waited for ever. Any
    mix of failures, answer delays and arrival turns: every asker gets an answer or the
    error, and nothing is left waiting."""

    async def main() -> None:
        reads = Reads(FlakyReads(pattern))  # type: ignore[arg-type]
        ended: list[str] = []

        async def ask(run_id: str, turns: int) -> None:
            for _ in range(turns):
                await trio.sleep(0)
            try:
                await reads.read(run_id)
            except ApiUnavailable:
                pass
            ended.append(run_id)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i, turns in enumerate(arrivals):
                    nursery.start_soon(ask, f"r{i}", turns)
            with contextlib.suppress(ApiUnavailable):  # (a later read is not stuck behind a stale reader)
                await reads.read("after")
        assert len(ended) == len(arrivals) and reads.waiting == {} and not reads.reading

    trio.run(main)


async def _scoped(scope: trio.CancelScope, read: Any, run_id: str) -> None:
    with scope:
        await read(run_id)


# ---------------------------------------------------------------- the labels: once, after the start


async def test_a_label_write_is_tried_once_and_again_on_the_next_pass(autojump_clock: Any) -> None:
    """A 503 (SQLite busy under a burst) is not retried in step with every other run's
    label write: the write is tried once, and again on the reporter loop's next pass, once
    an essential request has found the server calm again (``throttle.py``)."""
    import httpx

    from tests.test_answers import client
    from worker.host.settings import Settings
    from worker.rules.models import WorkPool
    from worker.runs.inhand import InHand
    from worker.runs.labels import Labeller

    sent: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        return httpx.Response(503 if len(sent) == 1 else 204, json={"detail": "busy"})

    in_hand = InHand()
    in_hand.live["r1"] = None
    labeller = Labeller(client(handler), Settings(pool="pool", api_url="http://x/api"), in_hand, {})
    pool = WorkPool("pool-id", "pool")
    labeller.writing.add("r1")  # (as the runner does at the start)
    await labeller.label(FlowRun("r1"), LOG, pool)
    assert len(sent) == 1 and labeller.unconfirmed("r1"), "one try, no retry"
    await labeller.relabel(pool)  # the server is still said busy: the write does not go out
    assert len(sent) == 1 and labeller.unconfirmed("r1")
    await labeller.client.request("GET", "work_pools/pool")  # essential: the probe, answered
    await labeller.relabel(pool)
    assert len(sent) == 3 and not labeller.unconfirmed("r1")


async def test_a_deleted_run_does_not_turn_the_labels_off(autojump_clock: Any) -> None:
    """A 404 naming the flow run (deleted before its label write) drops that run; only a 404
    of the endpoint itself (a server before 3.1) turns labels off for the worker's life."""
    import httpx

    from tests.test_answers import client
    from worker.host.settings import Settings
    from worker.rules.models import WorkPool
    from worker.runs.inhand import InHand
    from worker.runs.labels import Labeller

    def handler(request: httpx.Request) -> httpx.Response:
        if "gone" in request.url.path:
            return httpx.Response(404, json={"detail": "Flow run with id gone not found"})
        return httpx.Response(404, json={"detail": "Not Found"})

    labeller = Labeller(client(handler), Settings(pool="pool", api_url="http://x/api"), InHand(), {})
    pool = WorkPool("pool-id", "pool")
    await labeller.label(FlowRun("gone"), LOG, pool)
    assert not labeller.unsupported and not labeller.unconfirmed("gone")
    await labeller.label(FlowRun("r1"), LOG, pool)
    assert labeller.unsupported
    labeller.unlabelled["r2"] = FlowRun("r2")  # (put there before it was known)
    labeller.ended["r3"] = (FlowRun("r3"), 0)
    await labeller.relabel(pool)
    assert labeller.unlabelled == {} and labeller.ended == {}, "nothing to write, ever: none kept"


async def test_label_writes_go_one_at_a_time_and_a_waiting_one_goes_later(autojump_clock: Any) -> None:
    """Fifty runs started together sent fifty label writes at once, and a busy SQLite server
    refused each 4-5 times (the burst bench): one write is out at a time; a run's write that
    would wait goes to the relabel loop, and so does the write a run ends without: its end
    waits for no write (1,000 runs in a row left a hundred ended runs waiting their turn);
    the loop gives ended runs their essential writes, one at a time, then the live ones."""
    import httpx

    from tests.test_answers import client
    from worker.host.settings import Settings
    from worker.rules.models import WorkPool
    from worker.runs.inhand import InHand
    from worker.runs.labels import LAST_TRIES, Labeller

    out, most = 0, 0
    written: list[str] = []
    release = trio.Event()
    refuse = {"r4"}

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal out, most
        out += 1
        most = max(most, out)
        await release.wait()
        out -= 1
        run_id = request.url.path.split("/")[-2]
        written.append(run_id)
        return httpx.Response(500 if run_id in refuse else 204)

    in_hand = InHand()
    in_hand.live.update({"r1": None, "r2": None, "r3": None, "r4": None})
    labeller = Labeller(client(handler), Settings(pool="pool", api_url="http://x/api"), in_hand, {})
    pool = WorkPool("pool-id", "pool")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(labeller.label, FlowRun("r1"), LOG, pool)
        await trio.sleep(0.1)
        for run_id in ("r2", "r3", "r4"):  # r1's write is out: theirs go later
            assert not await labeller.label(FlowRun(run_id), LOG, pool)
            assert labeller.unconfirmed(run_id)
        del in_hand.live["r3"]  # r3 ends: its end waits for nothing
        with trio.fail_after(0.01):
            labeller.later(FlowRun("r3"))
        assert written == [] and most == 1
        release.set()
    assert written == ["r1"] and not labeller.unconfirmed("r1")
    await labeller.relabel(pool)  # the pass: the ended run first, then the live ones, one at a time
    assert written == ["r1", "r3", "r2", "r4"] and most == 1
    assert not labeller.unconfirmed("r2") and not labeller.unconfirmed("r3") and labeller.unconfirmed("r4")
    del in_hand.live["r4"]  # r4 ends, its writes failing: an essential write a pass, LAST_TRIES passes
    for tries in range(1, LAST_TRIES + 1):
        assert labeller.unconfirmed("r4"), f"given up after {tries - 1} passes"
        before = written.count("r4")
        await labeller.relabel(pool)
        assert written.count("r4") > before, "one essential write (with its retries) each pass"
    assert not labeller.unconfirmed("r4")
    given_up = written.count("r4")
    await labeller.relabel(pool)
    assert written.count("r4") == given_up, "no write after it is given up"
    assert labeller.ended == {} and labeller.unlabelled == {}
