"""A flow's hooks without a server (issue 21): the pure tables (``rules/hookrules.py``), the
reporter's hook points, and the hook runner's process (``process/hookproc.py``)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio

from tests.test_seams import FakeClient, entry, make_reporter
from worker.books.ledger import Entry
from worker.host.settings import Settings
from worker.prefect.ui import Uplink
from worker.process import hookproc
from worker.rules import hookrules
from worker.rules.hookrules import Crashed, Delivered
from worker.rules.models import SetStateStatus, StateType
from worker.runs.hooks import NO_HOOKS_TTL, HookContext, Hooks
from worker.runs.inhand import InHand

LOG = structlog.get_logger()
ACCEPT, REJECT = SetStateStatus.ACCEPT, SetStateStatus.REJECT
C, R, X = StateType.CRASHED, StateType.RUNNING, StateType.COMPLETED


@pytest.mark.parametrize(
    ("delivered", "expected"),
    [
        (Delivered("crash", R, proposed=C, status=ACCEPT), Crashed.WORKER),
        (Delivered("crash_if_running", R, proposed=C, status=ACCEPT), Crashed.WORKER),
        (Delivered("crash", R, proposed=C, status=REJECT), Crashed.NONE),
        (Delivered("crash", C), Crashed.ENGINE),
        (Delivered("crash_if_running", C), Crashed.ENGINE),
        (Delivered("crash", C, found_ours=True), Crashed.WORKER),  # our own earlier attempt
        (Delivered("crash_if_running", X), Crashed.NONE),
        (Delivered("crash", C, taken=True), Crashed.NONE),
        (Delivered("crash", R, proposed=C, status=ACCEPT, started=False), Crashed.NONE),  # never started
        (Delivered("crash", None), Crashed.NONE),
        (Delivered("reschedule", R, proposed=StateType.SCHEDULED, status=ACCEPT), Crashed.NONE),
        (Delivered("cancelled", C, proposed=StateType.CANCELLED, status=ACCEPT), Crashed.NONE),
    ],
)
def test_crashed_hooks_table(delivered: Delivered, expected: Crashed) -> None:
    assert hookrules.crashed_hooks(delivered) is expected


def test_cancellation_hooks_and_the_event() -> None:
    assert hookrules.cancellation_hooks(StateType.CANCELLED, already_ran=False)
    assert not hookrules.cancellation_hooks(StateType.CANCELLED, already_ran=True)
    assert not hookrules.cancellation_hooks(StateType.CRASHED, already_ran=False)
    cancelled = StateType.CANCELLED
    assert hookrules.cancelled_event(Delivered("cancelled", R, proposed=cancelled, status=ACCEPT))
    assert not hookrules.cancelled_event(Delivered("cancelled", R, proposed=cancelled, status=REJECT))
    assert hookrules.cancelled_event(Delivered("cancelled", cancelled, found_ours=True))
    assert not hookrules.cancelled_event(Delivered("cancelled", cancelled))  # someone else's CANCELLED


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/python", "-m", "prefect.engine"], ["/venv/bin/python"]),
        (["python3", "-X", "dev", "-m", "prefect.engine"], ["python3", "-X", "dev"]),
        (["uv", "run", "python", "-m", "prefect.flow_engine"], ["uv", "run", "python"]),
        (["sh", "-c", "exit 3"], ["/default/python"]),
        (["python", "-m", "mymodule"], ["/default/python"]),
    ],
)
def test_the_runs_interpreter(argv: list[str], expected: list[str]) -> None:
    assert hookrules.interpreter(argv, "/default/python") == expected


def test_the_runners_outcome_from_its_line_or_its_status() -> None:
    line = b'noise\n{"hook_runner": 1, "result": "ok", "hooks": [{"name": "h", "ok": true}], "error": null}\n'
    outcome = hookproc.outcome_of(line, 0, 1.5)
    assert (outcome.result, outcome.report["hooks"][0]["name"], outcome.error) == ("ok", "h", "")
    assert hookproc.outcome_of(b"", 5, 1.0).result == "load_failed"  # died before its line
    died = hookproc.outcome_of(b"Traceback...", 1, 1.0)
    assert died.result == "failed" and "status 1" in died.error
    assert hookproc.outcome_of(b"", -9, 1.0).result == "failed"


# ---------------------------------------------------------------- the reporter's hook points


class Sink:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.calls: list[tuple[str, Any]] = []

    async def before_cancelled(self, entry: Entry, run_log: Any) -> None:
        self.calls.append(("before_cancelled", list(self.client.written)))

    async def delivered(self, entry: Entry, run_log: Any, delivered: Delivered) -> None:
        self.calls.append(("delivered", delivered))


async def test_cancellation_hooks_run_before_cancelled_and_once(tmp_path: Path) -> None:
    client = FakeClient(StateType.CANCELLING)
    reporter = make_reporter(tmp_path, client)
    reporter.hooks = sink = Sink(client)
    original = client.set_flow_run_state

    async def refused_once(*args: Any, **kw: Any) -> Any:
        client.set_flow_run_state = original  # type: ignore[method-assign]
        client.fail = 20  # the CANCELLED is lost in an outage, after the hooks ran
        client._maybe_fail()

    client.set_flow_run_state = refused_once  # type: ignore[method-assign]
    await reporter.finish(entry(), LOG, "cancelled", "cancel")
    assert sink.calls == [("before_cancelled", [])], "the hooks ran before any state was written"
    assert reporter.ledger.entries()[0][0].hooks_ran, "the ledger remembers they ran"
    client.fail = 0
    assert await reporter.deliver_owed()
    assert client.written == [(StateType.CANCELLED, "Flow run was cancelled successfully.")]
    assert [c[0] for c in sink.calls] == ["before_cancelled", "delivered"], "not run again on the retry"
    done = sink.calls[-1][1]
    assert hookrules.cancelled_event(done) and hookrules.crashed_hooks(done) is Crashed.NONE


async def test_a_report_being_delivered_is_left_alone_by_the_loop(tmp_path: Path) -> None:
    client = FakeClient(StateType.RUNNING)
    reporter = make_reporter(tmp_path, client)
    reporter.owe(entry(pid=4242), "crash", "boom")
    reporter.delivering.add("r1")
    assert await reporter.deliver_owed() and client.written == []
    reporter.delivering.clear()
    reporter.hooks = sink = Sink(client)
    assert await reporter.deliver_owed() and client.written == [(StateType.CRASHED, "boom")]
    assert hookrules.crashed_hooks(sink.calls[-1][1]) is Crashed.WORKER


# ---------------------------------------------------------------- the runner's process


async def test_a_runner_past_its_time_is_killed_with_its_session_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "stuck.py"
    pids = tmp_path / "pids"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, subprocess, sys, time
            child = subprocess.Popen(["sleep", "300"])
            open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}} {{os.getcwd()}}")
            print("stuck hook says hello", file=sys.stderr, flush=True)
            time.sleep(300)
            """
        )
    )
    monkeypatch.setattr(hookproc, "SCRIPT", script)
    monkeypatch.setattr(hookproc, "KILL_MARGIN", 0.5)
    err = tmp_path / "out" / "r1.hooks.err"
    with structlog.testing.capture_logs() as said, trio.fail_after(30):
        log = structlog.get_logger().bind(flow_run_id="r1")
        outcome = await hookproc.run_hooks(
            [sys.executable],
            "crashed",
            "r1",
            env=dict(os.environ),
            cwd=None,
            timeout=2,
            log=log,
            err_path=err,
        )
    assert outcome.result == "killed" and "did not finish within 2 s" in outcome.error
    runner, child, cwd = pids.read_text().split()
    for pid in (int(runner), int(child)):  # the runner reaped, what it started killed
        deadline = trio.current_time() + 10
        while Path(f"/proc/{pid}").exists() and not _zombie(pid):
            assert trio.current_time() < deadline, f"{pid} still alive"
            await trio.sleep(0.05)
    assert not Path(cwd).exists() and not err.exists(), "its temporary directory and stderr file removed"
    output = [e for e in said if e.get("event") == "run.output"]
    assert output and output[0]["line"] == "stuck hook says hello" and output[0]["source"] == "hooks"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return False


async def test_a_flow_without_hooks_is_remembered_for_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[str] = []

    async def fake_run_hooks(prefix: list[str], kind: str, run_id: str, **kw: Any) -> hookproc.HookOutcome:
        spawned.append(f"{kind}:{run_id}")
        return hookproc.HookOutcome("no_hooks" if run_id != "has" else "ok")

    monkeypatch.setattr(hookproc, "run_hooks", fake_run_hooks)
    settings = Settings(pool="pool", api_url="http://127.0.0.1:9/api")
    hooks = Hooks(settings, Uplink(None, "w"), InHand(), tmp_path, rebuild=None)  # type: ignore[arg-type]
    context = HookContext(["python"], {}, None, [], flow_key="dep@t1")
    for run_id in ("a", "b", "c"):
        await hooks._run(run_id, LOG, context, "crashed", [])
    await hooks._run("d", LOG, context, "cancellation", [])
    await hooks._run("e", LOG, attrs.evolve(context, flow_key="dep@t2"), "crashed", [])  # redeployed
    assert spawned == ["crashed:a", "cancellation:d", "crashed:e"]
    hooks.no_hooks = {k: t - NO_HOOKS_TTL for k, t in hooks.no_hooks.items()}  # a minute later
    await hooks._run("f", LOG, context, "crashed", [])
    assert spawned[-1] == "crashed:f"
