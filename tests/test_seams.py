"""The supervisor's seams without a server: payloads of every Prefect 3 shape, the poll's
triage, a run's outcome table, the reporter against a failing fake client, reconcile
against a ledger on disk, the outage probe, and the spawn/reaper registry."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from worker.books.ledger import Entry, Ledger, Report
from worker.books.reporter import Reporter
from worker.host.logs import Once
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.prefect.answers import ApiUnavailable
from worker.prefect.outage import PROBE_SECONDS, Outage
from worker.process import reaper
from worker.process.spawned import RunHandle
from worker.rules import decisions
from worker.rules.models import (
    FlowRun,
    OrchestrationResult,
    ProtocolError,
    SetStateStatus,
    State,
    StateType,
    structure,
)
from worker.runs.inhand import InHand
from worker.runs.reconcile import Reconciler

LOG = structlog.get_logger()
NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)


# ---------------------------------------------------------------- payloads of every Prefect 3 server


def test_state_from_state_type_when_state_is_null() -> None:
    """3.0-3.9.0 servers poll with "state": null; state_type/state_name say it."""
    run = structure(
        {
            "id": "r",
            "name": "n",
            "state": None,
            "state_type": "SCHEDULED",
            "state_name": "Late",
            "tags": None,
        },
        FlowRun,
    )
    assert run.state is not None
    assert (run.state.type, run.state.name, run.tags) == (StateType.SCHEDULED, "Late", [])


def test_state_wins_over_state_type_and_unknown_types_are_kept_by_name() -> None:
    full = {"id": "r", "state": {"type": "RUNNING", "name": "Running", "state_details": None}}
    assert structure({**full, "state_type": "SCHEDULED"}, FlowRun).state_type is StateType.RUNNING
    odd = structure({"id": "r", "state": None, "state_type": "SUSPENDED"}, FlowRun)
    assert (odd.state, odd.unknown_state) == (None, "SUSPENDED")
    bare = structure({"id": "r", "state": None, "state_type": None, "parameters": None}, FlowRun)
    assert (bare.state, bare.unknown_state, bare.parameters) == (None, None, {})
    with pytest.raises(ProtocolError):
        structure({"name": "no id"}, FlowRun)


# ---------------------------------------------------------------- the poll's triage


def run(run_id: str, state: StateType | None = StateType.SCHEDULED, start: str | None = None) -> FlowRun:
    return FlowRun(
        run_id,
        name=f"name-{run_id}",
        state=State(state, name=state.value.title()) if state else None,
        next_scheduled_start_time=start,
    )


def test_poll_verdict_table() -> None:
    later = (NOW + datetime.timedelta(seconds=30)).isoformat()
    v = decisions.poll_verdict
    assert v(run("a"), False, NOW, None).verdict is decisions.Verdict.TAKE
    assert v(run("a"), True, NOW, None).verdict is decisions.Verdict.OURS
    pending = v(run("a", StateType.PENDING), False, NOW, None)
    assert (pending.verdict, pending.reason) == (
        decisions.Verdict.SKIP,
        "its state is PENDING (Pending), not SCHEDULED",
    )
    nothing = v(run("a", None), False, NOW, None)
    assert nothing.verdict is decisions.Verdict.SKIP and "no state" in nothing.reason
    unknown = v(FlowRun("a", unknown_state="SUSPENDED"), False, NOW, None)
    assert unknown.verdict is decisions.Verdict.SKIP and "'SUSPENDED'" in unknown.reason
    ahead = v(run("a", start=later), False, NOW, decisions.parse_time(later))
    assert (ahead.verdict, ahead.due_in) == (decisions.Verdict.LATER, 30.0)


def test_triage_takes_due_runs_up_to_the_limit_counting_runs_in_hand() -> None:
    later = (NOW + datetime.timedelta(seconds=5)).isoformat()
    polled = [run("a"), run("b", StateType.RUNNING), run("c"), run("d", start=later), run("e"), run("mine")]
    found = decisions.triage(polled, {"mine"}, NOW, limit=3, active=1)
    assert [r.id for r in found.take] == ["a", "c"]  # 1 in hand + 2 = the limit of 3
    assert [(r.id, level) for r, _, level in found.not_taken] == [("b", "info"), ("e", "debug")]
    assert found.due_in == 5.0
    unlimited = decisions.triage(polled, set(), NOW, limit=None, active=10)
    assert [r.id for r in unlimited.take] == ["a", "c", "e", "mine"]


def test_parse_time() -> None:
    assert decisions.parse_time("2026-11-01 12:00:00") == NOW
    assert decisions.parse_time("2026-11-01T12:00:00+00:00") == NOW
    assert decisions.parse_time("not a time") is None
    assert decisions.parse_time(None) is None


# ---------------------------------------------------------------- a run's end


@pytest.mark.parametrize(
    ("cancel", "stop", "rc", "on_stop", "adopted", "kind", "says"),
    [
        (True, True, -15, "crash", False, "cancelled", "cancelled successfully"),
        (False, True, -15, "crash", False, "crash", "status code: -15"),
        (False, True, None, "reschedule", False, "reschedule", "exit status unknown"),
        (False, False, None, "crash", True, "crash_if_running", "adopted by a restarted worker"),
        (False, False, None, "crash", False, "crash_if_running", "its exit status is unknown"),
        (False, False, 3, "crash", False, "crash", "Process exited with status code: 3."),
        (False, False, 0, "crash", False, "crash_if_running", "exited with status 0"),
    ],
)
def test_run_outcome_table(
    cancel: bool, stop: bool, rc: int | None, on_stop: str, adopted: bool, kind: str, says: str
) -> None:
    got_kind, message = decisions.run_outcome(cancel, stop, rc, on_stop, adopted)
    assert got_kind == kind
    assert says in message
    assert "status code: 0" not in message  # an unknown status is never reported as 0


# ---------------------------------------------------------------- the reporter against a fake client


class FakeClient:
    """Answers like the server for one run; the first ``fail`` calls are an outage."""

    def __init__(self, state: StateType | None, fail: int = 0) -> None:
        self.state, self.fail, self.calls, self.written = state, fail, 0, []

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            raise ApiUnavailable("GET", "/x", None, "ConnectError: refused")

    owner: str | None = None

    async def read_flow_run(self, run_id: str) -> FlowRun | None:
        self._maybe_fail()
        labels = {"prefect.worker.name": self.owner} if self.owner else {}
        return None if self.state is None else FlowRun(run_id, state=State(self.state), labels=labels)

    async def filter_flow_runs(self, ids: list[str]) -> list[FlowRun]:
        return [r for run_id in ids if (r := await self.read_flow_run(run_id)) is not None]

    async def set_flow_run_state(self, run_id: str, state_type: StateType, *args: Any, **kw: Any) -> Any:
        self._maybe_fail()
        self.written.append((state_type, args[1] if len(args) > 1 else None))
        self.state = state_type
        return OrchestrationResult(SetStateStatus.ACCEPT, State(state_type))

    async def probe(self) -> bool:
        return self.fail == 0


def make_reporter(tmp_path: Path, client: FakeClient) -> Reporter:
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    metrics = Metrics()
    return Reporter(client, ledger, Outage(metrics=metrics), metrics, "pool")  # type: ignore[arg-type]


def entry(run_id: str = "r1", phase: str = "started", **kw: Any) -> Entry:
    return Entry(run_id, "name", "pool", "w", phase, **kw)


async def test_reporter_keeps_the_crash_through_an_outage_and_delivers_it_once(tmp_path: Path) -> None:
    client = FakeClient(StateType.RUNNING, fail=20)  # longer than the client's own retries
    reporter = make_reporter(tmp_path, client)
    reporter.ledger.write(entry())
    await reporter.finish(entry(), LOG, "crash", "boom")
    assert "r1" in reporter.owed and reporter.failed_runs == 1
    assert reporter.ledger.entries()[0][0].report is not None, "the owed state is on disk"
    while not await reporter.deliver_owed():
        client.fail = max(0, client.fail - 5)
    assert client.written == [(StateType.CRASHED, "boom")]
    assert reporter.owed == {} and reporter.ledger.entries() == ([], [])
    assert await reporter.deliver_owed() and client.written == [(StateType.CRASHED, "boom")]


async def test_clean_exit_writes_nothing_when_the_engine_finished(tmp_path: Path) -> None:
    client = FakeClient(StateType.COMPLETED)
    reporter = make_reporter(tmp_path, client)
    await reporter.finish(entry(), LOG, "crash_if_running", "exit 0")
    assert client.written == [] and reporter.failed_runs == 0 and reporter.owed == {}


async def test_exit_0_without_a_final_state_counts_as_failed(tmp_path: Path) -> None:
    client = FakeClient(StateType.RUNNING)
    reporter = make_reporter(tmp_path, client)
    await reporter.finish(entry(), LOG, "crash_if_running", "exit 0")
    assert client.written == [(StateType.CRASHED, "exit 0")] and reporter.failed_runs == 1


async def test_nothing_is_written_over_a_run_another_worker_has_taken(tmp_path: Path) -> None:
    client = FakeClient(StateType.RUNNING)
    client.owner = "someone else"
    reporter = make_reporter(tmp_path, client)
    await reporter.finish(entry(), LOG, "crash", "boom")
    assert client.written == [] and reporter.owed == {}
    # a run adopted from a previous name ("w") and relabelled with this worker's is still ours
    client.owner = "new name"
    reporter.worker_name = "new name"
    await reporter.finish(entry(), LOG, "crash", "boom")
    assert client.written == [(StateType.CRASHED, "boom")]


# ---------------------------------------------------------------- reconcile against a ledger on disk


async def test_reconcile_resolves_each_entry_of_a_dead_worker(tmp_path: Path) -> None:
    client = FakeClient(StateType.RUNNING)
    reporter = make_reporter(tmp_path, client)
    lost = entry("lost", pid=os.getpid(), start_time=1, boot_id="another boot")
    owed = entry("owed", report=Report(kind="reschedule", message="back", transition_id="t"))
    other_pool = Entry("theirs", "n", "other-pool", "w", "claimed")
    for e in (lost, owed, other_pool):
        reporter.ledger.write(e)
    settings = Settings(pool="pool", api_url="http://127.0.0.1:9/api")
    reconciler = Reconciler(settings, client, reporter.ledger, reporter, reporter.outage, InHand())  # type: ignore[arg-type]
    async with trio.open_nursery() as runs:
        await reconciler.reconcile(runs)
    assert sorted(client.written, key=str) == sorted(
        [(StateType.CRASHED, decisions.PROCESS_LOST.format(pid=os.getpid())), (StateType.SCHEDULED, "back")],
        key=str,
    )
    left = [e.flow_run_id for e in reporter.ledger.entries()[0]]
    assert left == ["theirs"], "another pool's entries are not ours to touch"


async def test_output_files_are_gone_once_the_reconcile_path_resolved_their_run(tmp_path: Path) -> None:
    """Issue 24: the output of a run resolved after a restart (reported, rescheduled,
    forgotten) is removed, and so are output files the ledger no longer knows of; those of
    an entry that stays (another pool's) are kept."""
    client = FakeClient(StateType.RUNNING)
    reporter = make_reporter(tmp_path, client)
    lost = entry("lost", pid=os.getpid(), start_time=1, boot_id="another boot")
    owed = entry("owed", report=Report(kind="crash", message="boom", transition_id="t"))
    never = entry("never", phase="claimed", transition_id="mine")
    theirs = Entry("theirs", "n", "other-pool", "w", "claimed")
    for e in (lost, owed, never, theirs):
        reporter.ledger.write(e)
    output = reporter.ledger.output_dir
    for run_id in ("lost", "owed", "never", "theirs", "stray"):
        for stream in ("out", "err"):
            (output / f"{run_id}.{stream}").write_text(f"{run_id}: the flow's output, maybe a secret\n")
    settings = Settings(pool="pool", api_url="http://127.0.0.1:9/api")
    reconciler = Reconciler(settings, client, reporter.ledger, reporter, reporter.outage, InHand())  # type: ignore[arg-type]
    async with trio.open_nursery() as runs:
        await reconciler.reconcile(runs)
    assert [e.flow_run_id for e in reporter.ledger.entries()[0]] == ["theirs"]
    assert sorted(p.name for p in output.iterdir()) == ["theirs.err", "theirs.out"]


# ---------------------------------------------------------------- outage: the probe ends the pause


async def test_pause_ends_when_the_probe_finds_the_api_back(autojump_clock: trio.abc.Clock) -> None:
    client = FakeClient(None, fail=3)
    outage = Outage()
    outage.failed(ApiUnavailable("GET", "/x", None, "refused"), "poll")
    assert outage.unreachable
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outage.probe_loop, client)
        began = trio.current_time()
        client.fail = 0
        await outage.pause(60.0)
        assert trio.current_time() - began <= PROBE_SECONDS + 1e-6
        nursery.cancel_scope.cancel()


async def test_an_overloaded_api_is_not_probed(autojump_clock: trio.abc.Clock) -> None:
    outage = Outage()
    outage.failed(ApiUnavailable("GET", "/x", 503, "busy"), "poll")
    assert not outage.unreachable  # a 503 keeps its backoff: the server must not be hammered
    began = trio.current_time()
    await outage.pause(7.0)
    assert trio.current_time() - began == pytest.approx(7.0)


def test_once_says_a_condition_once_until_cleared() -> None:
    said: list[str] = []

    class Logger:
        def info(self, event: str, **fields: Any) -> None:
            said.append(event)

    once = Once(limit=2)
    for _ in range(3):
        once.say("k", Logger(), "info", "e1")
    once.clear("k")
    once.say("k", Logger(), "info", "e2")
    assert said == ["e1", "e2"]


# ---------------------------------------------------------------- spawned children are never orphans


async def test_the_reaper_never_takes_a_spawned_childs_status() -> None:
    """Many children that exit at once, reaped as orphans as eagerly as possible meanwhile:
    every status is still the true one."""
    import structlog

    handles = [RunHandle(f"r{i}", structlog.get_logger(), output_dir=None) for i in range(40)]
    for i, h in enumerate(handles):
        h.config.command = f"{sys.executable} -c 'raise SystemExit({i % 5})'"
        h.config.stream_output = False

    async def reap_eagerly() -> None:
        while True:
            await reaper.CHILDREN.wait_idle()
            reaper.CHILDREN.reap_orphans()
            await trio.sleep(0)

    statuses: dict[int, int | None] = {}

    async def one(i: int, h: RunHandle) -> None:
        await h.start()
        statuses[i] = await h.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reap_eagerly)
        async with trio.open_nursery() as spawns:
            for i, h in enumerate(handles):
                spawns.start_soon(one, i, h)
        nursery.cancel_scope.cancel()
    assert statuses == {i: i % 5 for i in range(40)}
    assert reaper.CHILDREN.spawned == set()


def test_an_orphan_is_still_reaped() -> None:
    orphan = subprocess.Popen(["true"])  # not spawned through CHILDREN: an orphan to the reaper
    orphan_pid = orphan.pid
    os.waitid(os.P_PID, orphan_pid, os.WEXITED | os.WNOWAIT)
    assert orphan_pid in reaper.CHILDREN.reap_orphans()
    orphan.returncode = 0  # reaped above; keep Popen's own __del__ from waiting again


def test_orphans_are_found_among_every_threads_children_and_by_the_full_pass() -> None:
    """On SIGCHLD the reaper looks only at the worker's children (every thread's
    ``/proc/.../children``: a child a thread started, or an orphan re-parented to any
    thread, is listed under that thread); the periodic pass looks at every process."""
    import threading

    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen(["true"])))
    thread.start()
    thread.join()
    by_thread = started[0]
    os.waitid(os.P_PID, by_thread.pid, os.WEXITED | os.WNOWAIT)
    listed = reaper.children()
    if listed is None:
        pytest.skip("this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
    # a snapshot: a child of a thread that exits moves to another thread, which may have been
    # read already (other tests' idle threads exit too: seen once in a whole run); looked again
    deadline = time.monotonic() + 2
    while by_thread.pid not in listed and time.monotonic() < deadline:
        time.sleep(0.05)
        listed = reaper.children() or []
    assert by_thread.pid in listed
    assert by_thread.pid in reaper.CHILDREN.reap_orphans()
    by_thread.returncode = 0
    other = subprocess.Popen(["true"])
    os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOWAIT)
    assert other.pid in reaper.CHILDREN.reap_orphans(everywhere=True)
    other.returncode = 0


def test_a_crash_message_carries_the_stderr_tail() -> None:
    kind, message = decisions.run_outcome(False, False, 1, "crash", stderr_tail="ModuleNotFoundError: x")
    assert kind == "crash"
    assert message.endswith("Last lines of stderr:\nModuleNotFoundError: x")
    _, clean = decisions.run_outcome(False, False, 1, "crash")
    assert "stderr" not in clean


async def test_stderr_tail_keeps_the_newest_lines_within_bounds(tmp_path: Path) -> None:
    from worker.rules.budget import STDERR_TAIL_BYTES, STDERR_TAIL_LINES

    script = tmp_path / "noisy.py"
    script.write_text(
        "import sys\nfor i in range(30): print(f'line {i} ' + 'x' * 300, file=sys.stderr)\nsys.exit(2)\n"
    )
    handle = RunHandle("tail", LOG, output_dir=tmp_path)
    handle.config.command = f"{sys.executable} {script}"
    await handle.start()
    assert await handle.wait() == 2
    tail = handle.stderr_tail()
    lines = tail.splitlines()
    assert len(tail) <= STDERR_TAIL_BYTES and 0 < len(lines) <= STDERR_TAIL_LINES
    assert lines[-1].startswith("line 29 ")
