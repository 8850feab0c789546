"""A flow's hooks run by the worker (issue 21), against the real server: ``on_cancellation``
after the process is gone (also past the kill grace, also for a flow that ignores SIGTERM),
then CANCELLED, then ``prefect.runner.cancelled-flow-run``; ``on_crashed`` once per crash,
also when the engine reported the crash itself, after a restart and for an adopted run;
hooks bounded by ``hook_timeout_seconds``. (The side-by-side comparison with Prefect's
worker is in ``test_side_by_side.py``; the oldest and newest releases in ``test_compat.py``.)"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Api, WorkerProcess, wait_for
from worker.process import reaper

FAST = {
    "PREFECT_LOGGING_LEVEL": "INFO",  # the hooks' INFO lines reach the run's logs
    "FLOW_WORKER_QUERY_SECONDS": "1",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "1",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "5",
}
CANCELLED_EVENT = "prefect.runner.cancelled-flow-run"


def run_lines(api: Api, run_id: str) -> list[str]:
    logs = api.call(
        "POST", "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
    )
    return [entry["message"] for entry in logs]


def events_named(api: Api, name: str, run_id: str) -> list[dict[str, Any]]:
    found = api.call(
        "POST",
        "events/filter",
        {"filter": {"any_resource": {"id": [f"prefect.flow-run.{run_id}"]}, "event": {"name": [name]}}},
    )
    return list(found["events"])


def marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def cancel(api: Api, run_id: str) -> None:
    api.cancel(run_id)


def started(worker: WorkerProcess, api: Api, run_id: str) -> None:
    wait_for(lambda: api.state_type(run_id) == "RUNNING", 120, what=f"run {run_id} to be RUNNING")
    wait_for(
        lambda: any(
            e.get("event") == "run.output"
            and e.get("flow_run_id") == run_id
            and "started" in e.get("line", "")
            for e in worker.events()
        ),
        60,
        what="the flow body to start",
    )


def test_on_cancellation_hooks_complete_past_the_grace_and_for_a_flow_ignoring_sigterm(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker("--pool", pool_name, FLOW_WORKER_CANCEL_GRACE_SECONDS="2", **FAST)
    dep = api.deployment(pool_name, entrypoint="crashy.py:cancellable", flow_name="cancellable")
    slow_hook, ignores = tmp_path / "slow-hook", tmp_path / "ignores-term"
    runs = {
        slow_hook: api.run(dep, {"marker": str(slow_hook), "how": "sleep", "hook_sleep": 6}),
        ignores: api.run(dep, {"marker": str(ignores), "how": "ignore_term"}),
    }
    for run_id in runs.values():
        started(worker, api, run_id)
    for run_id in runs.values():
        cancel(api, run_id)
    for marker, run_id in runs.items():
        final = api.wait_final(run_id, 90)
        assert final["state_type"] == "CANCELLED", final["state"]
        assert final["state"]["message"] == "Flow run was cancelled successfully."
        # the hook ran to its end before CANCELLED was written, once
        (line,) = marker_lines(marker)
        assert line.startswith("CANCELLING|Cancelling|"), line
        (event,) = wait_for(lambda r=run_id: events_named(api, CANCELLED_EVENT, r), 30, what="the event")
        assert event["resource"]["prefect.resource.id"] == "prefect.runner.standalone"
        assert event["resource"]["prefect.resource.name"] == "standalone"
        roles = [r["prefect.resource.role"] for r in event["related"]]
        assert roles[:3] == ["deployment", "flow", "flow-run"], roles
        assert event["payload"] == {}
        assert worker.saw("run.hooks", flow_run_id=run_id, kind="cancellation", result="ok")
        wait_for(
            lambda r=run_id: any("hook write_marker saw Cancelling" in m for m in run_lines(api, r)),
            30,
            what="the hook's line in the run's logs",
        )
    assert worker.saw("run.killing", flow_run_id=runs[ignores])  # SIGTERM ignored: SIGKILL after 2 s
    hooked = [e for e in worker.events() if e.get("event") == "run.hooks"]
    assert {e["flow_run_id"] for e in hooked} == set(runs.values()) and len(hooked) == 2
    # the hooks' own prints reach the worker's log as the run's output does
    assert worker.saw(
        "run.output", flow_run_id=runs[slow_hook], source="hooks", line="write_marker printed this"
    )


def test_on_crashed_hooks_run_once_whoever_reported_the_crash_and_are_bounded(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker("--pool", pool_name, FLOW_WORKER_HOOK_TIMEOUT_SECONDS="20", **FAST)
    dep = api.deployment(pool_name, entrypoint="crashy.py:crashy", flow_name="crashy")
    by_engine, stuck = tmp_path / "by-engine", tmp_path / "stuck"
    engine_run = api.run(dep, {"marker": str(by_engine), "how": "raise_crash"})
    stuck_run = api.run(dep, {"marker": str(stuck), "how": "exit3", "hook_sleep": 120})
    assert api.wait_final(engine_run, 120)["state_type"] == "CRASHED"
    wait_for(lambda: worker.saw("run.hooks", flow_run_id=engine_run), 60, what="the engine-reported hooks")
    # the engine (3.9.1) wrote CRASHED and ran its hooks itself: the worker's runner did not
    assert worker.saw("run.hooks", flow_run_id=engine_run, result="engine_ran")
    assert len(marker_lines(by_engine)) == 1
    # a hook that outlives hook_timeout_seconds is stopped, and the run's logs say so
    wait_for(lambda: worker.saw("run.hooks", flow_run_id=stuck_run), 90, what="the stuck hook to be stopped")
    assert worker.saw("run.hooks", flow_run_id=stuck_run, result="timed_out")
    assert not stuck.exists()
    wait_for(
        lambda: any("did not run to their end" in m for m in run_lines(api, stuck_run)),
        30,
        what="the worker's line about the stopped hooks in the run's logs",
    )
    wait_for(lambda: not reaper.run_processes(stuck_run, None), 10, what="nothing left of the hook runner")


def test_on_crashed_hooks_after_a_restart_adopted_or_resolved(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    state_dir = str(tmp_path / "ledger")
    dep = api.deployment(pool_name, entrypoint="crashy.py:crashy", flow_name="crashy")
    adopted, lost = tmp_path / "adopted", tmp_path / "lost"
    first = start_worker("--pool", pool_name, FLOW_WORKER_STATE_DIR=state_dir, **FAST)
    adopted_run = api.run(dep, {"marker": str(adopted), "how": "exit3", "delay": 25})
    lost_run = api.run(dep, {"marker": str(lost), "how": "sleep"})
    for run_id in (adopted_run, lost_run):
        started(first, api, run_id)
    first.proc.kill()
    first.proc.wait()
    # its process dies while no worker watches (by the ledger's pid: a warm-forked run's
    # /proc/PID/environ is its engine server's, so it is not found by its run id)
    pgid = json.loads((Path(state_dir) / "runs" / f"{lost_run}.json").read_text())["pgid"]
    os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not reaper.run_processes(lost_run, pgid), 10, what="the lost run's process to be gone")

    second = start_worker("--pool", pool_name, FLOW_WORKER_STATE_DIR=state_dir, **FAST)
    wait_for(lambda: second.saw("run.adopted", flow_run_id=adopted_run), 30, what="the adoption")
    for marker, run_id in ((lost, lost_run), (adopted, adopted_run)):
        assert api.wait_final(run_id, 120)["state_type"] == "CRASHED"
        wait_for(marker.exists, 60, what=f"the on_crashed hook of {marker.name}")
        wait_for(lambda r=run_id: second.saw("run.hooks", flow_run_id=r), 30, what="run.hooks")
        assert len(marker_lines(marker)) == 1
        assert second.saw("run.hooks", flow_run_id=run_id, kind="crashed", result="ok")


def test_on_crashed_hooks_after_an_exit_0_without_a_final_state_and_a_stop(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker("--pool", pool_name, FLOW_WORKER_CANCEL_GRACE_SECONDS="5", **FAST)
    dep = api.deployment(pool_name, entrypoint="crashy.py:crashy", flow_name="crashy")
    quiet, stopped = tmp_path / "exit0", tmp_path / "stopped"
    quiet_run = api.run(dep, {"marker": str(quiet), "how": "exit0"})
    stopped_run = api.run(dep, {"marker": str(stopped), "how": "sleep"})
    final = api.wait_final(quiet_run, 120)
    assert "exited with status 0 without reporting a final state" in final["state"]["message"]
    wait_for(quiet.exists, 60, what="the hook after an exit 0 without a final state")
    started(worker, api, stopped_run)
    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: worker.saw("worker.stopping"), 10, what="the drain to begin")
    worker.proc.send_signal(signal.SIGTERM)  # the second: the run is stopped, CRASHED
    assert worker.proc.wait(120) == 0  # ... once its hooks have run
    assert api.flow_run(stopped_run)["state"]["message"].startswith("The worker stopped before")
    for marker in (quiet, stopped):
        (line,) = marker_lines(marker)
        assert line.startswith("CRASHED|Crashed|"), line
