"""``Runner.run`` when something goes wrong inside one run's task (issue 19), without a server:
a fake API that keeps the run's state, a real ledger and real child processes.

Where the run was when it went wrong decides what it is owed:

=================================  ==================================================
went wrong                         the run
=================================  ==================================================
after the PENDING proposal,        resolved as a lost claim (back to SCHEDULED while
before the claim is recorded       still ours), never left PENDING
claimed, not started, host short   back to SCHEDULED (deferred), not CRASHED
started, host short or a bug       never back to SCHEDULED (it may have run): its
                                   process stopped and reaped, CRASHED
=================================  ==================================================
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from worker.books.ledger import Ledger
from worker.books.reporter import Reporter
from worker.fleet.reclaim import Fencer
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.prefect.outage import Outage
from worker.process import reaper
from worker.rules import decisions
from worker.rules.job import ProcessJobConfiguration
from worker.rules.models import FlowRun, OrchestrationResult, SetStateStatus, State, StateType, WorkPool
from worker.runs.control import ControlChannel
from worker.runs.inhand import InHand
from worker.runs.reconcile import Reconciler
from worker.runs.run import Runner


class FakeApi:
    """One run's state, as the server keeps it."""

    def __init__(self) -> None:
        self.state = StateType.SCHEDULED
        self.transition: str | None = None
        self.written: list[tuple[StateType, str | None]] = []

    async def set_flow_run_state(
        self, run_id: str, state_type: StateType, name: str, message: str | None = None, **kw: Any
    ) -> OrchestrationResult:
        self.state, self.transition = state_type, kw.get("transition_id")
        self.written.append((state_type, message))
        details = {"transition_id": self.transition}
        return OrchestrationResult(SetStateStatus.ACCEPT, State(state_type, state_details=details))

    async def read_flow_run(self, run_id: str) -> FlowRun:
        details = {"transition_id": self.transition}
        return FlowRun(run_id, "r", state=State(self.state, state_details=details))

    async def read_flow_run_states(self, run_id: str) -> list[State]:
        return []

    async def filter_flow_runs(self, ids: list[str]) -> list[FlowRun]:
        return [await self.read_flow_run(run_id) for run_id in ids]

    async def update_labels(self, run_id: str, labels: dict[str, str], **kw: Any) -> None:
        pass

    async def set_infrastructure_pid(self, run_id: str, pid: int) -> None:
        pass


def runner(tmp_path: Path, api: FakeApi) -> tuple[Runner, Reconciler]:
    settings = Settings(pool="pool", api_url="http://127.0.0.1:9/api", cancel_grace_seconds=5)
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    metrics, outage, in_hand = Metrics(), Outage(), InHand()
    reporter = Reporter(api, ledger, outage, metrics, "pool", settings.worker_name)  # type: ignore[arg-type]
    reconciler = Reconciler(settings, api, ledger, reporter, outage, in_hand)  # type: ignore[arg-type]
    template = ProcessJobConfiguration.default_base_job_template()
    r = Runner(
        settings,
        api,  # type: ignore[arg-type]
        ledger,
        reporter,
        outage,
        metrics,
        ControlChannel(),
        in_hand,
        reconciler.pending,
        Fencer(settings, api, metrics),  # type: ignore[arg-type]
        pool=WorkPool("pool-id", "pool", base_job_template=template),
    )
    return r, reconciler


def flow_run(command: str) -> FlowRun:
    return FlowRun("run-1", "r", state=State(StateType.SCHEDULED), job_variables={"command": command})


async def test_a_bug_after_the_claim_was_proposed_returns_the_run_to_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi()
    r, reconciler = runner(tmp_path, api)

    def bug(*args: Any) -> Any:
        raise KeyError("a bug in the claim table")

    monkeypatch.setattr(decisions, "claim_outcome", bug)
    run = flow_run("true")
    r.in_hand.live[run.id] = None
    await r.run(run)
    assert api.state is StateType.PENDING and "run-1" in reconciler.pending, "resolved later, not forgotten"
    assert "run-1" in r.faults.shunned and r.metrics.runs_internal_errors == 1
    assert await reconciler.resolve_pending()
    assert api.state is StateType.SCHEDULED, "back in the queue, for a peer"


async def test_a_claimed_run_the_host_cannot_start_goes_back_to_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi()
    r, _ = runner(tmp_path, api)

    async def no_room(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(trio.lowlevel, "open_process", no_room)
    run = flow_run("sleep 30")
    r.in_hand.live[run.id] = None
    await r.run(run)
    assert api.state is StateType.SCHEDULED
    assert r.metrics.runs_deferred == 1 and not r.faults.shunned
    assert [t for t, _ in api.written] == [StateType.PENDING, StateType.SCHEDULED]


@pytest.mark.parametrize(
    "fault", [OSError(errno.ENOSPC, "No space left on device"), KeyError("a bug")], ids=["short", "bug"]
)
async def test_a_started_run_that_meets_a_fault_is_reaped_and_crashed_never_requeued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    api = FakeApi()
    r, _ = runner(tmp_path, api)
    started: list[int] = []

    def facts(pid: int) -> Any:  # right after the spawn, before the wait
        started.append(pid)
        raise fault

    monkeypatch.setattr(reaper, "process_facts", facts)
    run = flow_run("sleep 300")
    r.in_hand.live[run.id] = None
    with trio.fail_after(30):
        await r.run(run)
    assert started, "the child was started"
    assert not os.path.exists(f"/proc/{started[0]}"), "its process was stopped and reaped"
    assert api.state is StateType.CRASHED
    assert StateType.SCHEDULED not in [t for t, _ in api.written]
    message = api.written[-1][1] or ""
    assert message.startswith("Flow run could not be supervised: internal error")
    assert run.id not in r.in_hand.live


async def test_due_runs_wait_while_the_host_is_short(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """After a deferral, due runs stay SCHEDULED until a started run ends, or SHORT_HOLD."""
    from worker.service.poller import SHORT_HOLD
    from worker.service.supervisor import Supervisor

    ledger = Ledger(tmp_path / "state")
    ledger.open()
    supervisor = Supervisor(Settings(pool="pool", api_url="http://127.0.0.1:9/api"), FakeApi(), ledger)  # type: ignore[arg-type]
    due = [flow_run("true")]
    assert supervisor.poller._while_short(due) == due, "no shortage: nothing held"
    supervisor.runner.faults.short_at = trio.current_time()
    assert supervisor.poller._while_short(due) == [] and supervisor.poller.short_held == 1
    supervisor.in_hand.live["deferred"] = None
    supervisor.in_hand.release("deferred")  # a deferred run leaving eases nothing
    assert not supervisor.poller.wake.is_set() and supervisor.poller._while_short(due) == []
    await trio.sleep(1)
    supervisor.in_hand.live["started"] = object()  # type: ignore[assignment]
    supervisor.in_hand.release("started")  # a started run ended: look again now
    assert supervisor.poller.wake.is_set() and supervisor.poller._while_short(due) == due
    await trio.sleep(1)
    supervisor.runner.faults.short_at = trio.current_time()
    assert supervisor.poller._while_short(due) == []
    await trio.sleep(SHORT_HOLD)
    assert supervisor.poller._while_short(due) == due, "at most SHORT_HOLD seconds"
