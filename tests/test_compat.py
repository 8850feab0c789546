"""The compatibility matrix: the end-to-end smoke set against every Prefect 3 release listed
in ``tests/prefect_versions.py``, each server with the flows' engine of the same version.

One server per version (a module-scoped, parametrized fixture: pytest runs every test of
one version before it starts the next server). Servers before 3.9.1 answer
``get_scheduled_flow_runs`` with ``"state": null``; that is what the first test would
have caught.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ENGINE_START,
    Api,
    PrefectServer,
    WorkerProcess,
    flow_worker,
    running_server,
    wait_for,
)
from tests.prefect_versions import VERSIONS, venv_for

# with both polls a minute apart, only the events stream can be this fast
SLOW_POLLS = {
    "FLOW_WORKER_QUERY_SECONDS": "60",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "60",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "5",
}


WARM_VERSIONS = ("3.4.25", "3.8.8", "3.9.1")
"""With warm starts (the session run with ``FLOW_WORKER_TEST_ENGINE_START=warm``): an older
release that forks warm, the newest, and one before 3.6 that must fall back to cold."""


def warm_capable(version: str) -> bool:
    """Prefect 3.6 added ``refresh_global_settings_context``, which a forked run needs."""
    major, minor = (int(p) for p in version.split(".")[:2])
    return (major, minor) >= (3, 6)


@pytest.fixture(
    scope="module",
    params=list(VERSIONS) if ENGINE_START == "cold" else list(WARM_VERSIONS),
    ids=lambda v: f"prefect-{v}",
)
def versioned_server(request: pytest.FixtureRequest) -> Iterator[PrefectServer]:
    with running_server(f"flow-worker-prefect-{request.param}-", venv_for(request.param)) as server:
        yield server


@pytest.fixture
def vapi(versioned_server: PrefectServer) -> Iterator[Api]:
    client = Api(versioned_server)
    yield client
    client.http.close()


def engine_env(server: PrefectServer) -> dict[str, str]:
    """The worker runs flows with the engine of the server's own version."""
    return {
        **server.env,
        "FLOW_WORKER_PYTHON": str(server.bin_dir / "python"),
        "FLOW_WORKER_LOG_FORMAT": "json",
    }


def once(server: PrefectServer, pool: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return flow_worker(
        server, "--pool", pool, "--once", **engine_env(server), FLOW_WORKER_STATE_DIR=str(tmp_path / "s")
    )


def events_of(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


def test_real_flow_completes_with_merged_env(
    versioned_server: PrefectServer, vapi: Api, pool_name: str, tmp_path: Path
) -> None:
    dep = vapi.deployment(pool_name, job_variables={"env": {"FOO": "from-deployment", "BAR": "dep"}})
    out = tmp_path / "out.jsonl"
    run_id = vapi.run(dep, {"name": "compat", "out": str(out)}, {"env": {"BAR": "from-run"}})
    proc = once(versioned_server, pool_name, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert vapi.state_type(run_id) == "COMPLETED", proc.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[0])
    assert (record["FOO"], record["BAR"], record["run_id"]) == ("from-deployment", "from-run", run_id)
    events = events_of(proc)
    started = next(e for e in events if e["event"] == "run.started")
    version = versioned_server.bin_dir.parent.name
    if ENGINE_START == "warm" and warm_capable(version):
        assert started["start"] == "warm"
    else:
        assert started["start"] == "cold"
    if ENGINE_START == "warm" and not warm_capable(version):
        cold = next(e for e in events if e["event"] == "warm_start.cold")
        assert "refresh_global_settings_context" in cold["reason"], cold


def test_crash_is_reported_with_its_status_and_once_exits_1(
    versioned_server: PrefectServer, vapi: Api, pool_name: str, tmp_path: Path
) -> None:
    bad = vapi.run(vapi.deployment(pool_name, job_variables={"command": "sh -c 'exit 3'"}))
    proc = once(versioned_server, pool_name, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    final = vapi.flow_run(bad)
    assert final["state_type"] == "CRASHED"
    assert "Process exited with status code: 3." in final["state"]["message"]


def test_event_pickup_and_cancellation(
    versioned_server: PrefectServer, vapi: Api, pool_name: str, tmp_path: Path
) -> None:
    dep = vapi.deployment(pool_name, entrypoint="hello.py:cancellable", flow_name="cancellable")
    worker = WorkerProcess(
        versioned_server,
        ["--pool", pool_name],
        {**engine_env(versioned_server), **SLOW_POLLS, "FLOW_WORKER_STATE_DIR": str(tmp_path / "s")},
        tmp_path / "w.log",
    )
    try:
        wait_for(lambda: worker.saw("events.connected"), 60, what="the events stream to connect")
        created = time.monotonic()
        run_id = vapi.run(dep, {"sleep": 120})
        # the claim is the pickup (the poll is a minute away); the start may then wait for a
        # warm engine server's first preload, as long as a cold import on a loaded host
        wait_for(lambda: worker.saw("run.claimed", flow_run_id=run_id), 15, what="pickup by event")
        assert time.monotonic() - created < 15
        wait_for(lambda: worker.saw("run.started", flow_run_id=run_id), 120, what="the run's start")
        wait_for(lambda: vapi.state_type(run_id) == "RUNNING", 60, what="the engine to start the flow")
        vapi.cancel(run_id)
        # the cancel poll is a minute away (>= 42 s): the event did it; CANCELLED follows the
        # flow's on_cancellation hooks (a process of the run's runtime, after the kill)
        final = vapi.wait_final(run_id, 40)
        assert final["state_type"] == "CANCELLED", final["state"]
        assert worker.saw("run.cancelling", flow_run_id=run_id, via="event")
        assert worker.stop() == 0
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()


HOOK_VERSIONS = ("3.2.15", "3.9.1") if ENGINE_START == "cold" else ("3.9.1",)
"""The oldest and the newest release whose own worker runs a flow's hooks after a crash
(the warm pass: the newest only)."""


@pytest.mark.parametrize("versioned_server", HOOK_VERSIONS, indirect=True, ids=lambda v: f"prefect-{v}")
def test_hooks_on_the_oldest_and_newest_releases_that_run_them(
    versioned_server: PrefectServer, vapi: Api, pool_name: str, tmp_path: Path
) -> None:
    """Issue 21: on_crashed after a SIGKILL (the worker's CRASHED) and after a crash the engine
    reported itself (its hooks gated by the switch before 3.8, run by it from 3.8), once each;
    on_cancellation for a flow that ignores SIGTERM, then CANCELLED and the runner's event."""
    version = versioned_server.bin_dir.parent.name
    crashy = vapi.deployment(pool_name, entrypoint="crashy.py:crashy", flow_name="crashy")
    cancellable = vapi.deployment(pool_name, entrypoint="crashy.py:cancellable", flow_name="cancellable")
    marks = {name: tmp_path / name for name in ("sigkill", "raise_crash", "cancelled")}
    runs = {
        "sigkill": vapi.run(crashy, {"marker": str(marks["sigkill"]), "how": "sigkill"}),
        "raise_crash": vapi.run(crashy, {"marker": str(marks["raise_crash"]), "how": "raise_crash"}),
        "cancelled": vapi.run(cancellable, {"marker": str(marks["cancelled"]), "how": "ignore_term"}),
    }
    worker = WorkerProcess(
        versioned_server,
        ["--pool", pool_name],
        {
            **engine_env(versioned_server),
            "FLOW_WORKER_QUERY_SECONDS": "1",
            "FLOW_WORKER_CANCEL_POLL_SECONDS": "1",
            "FLOW_WORKER_CANCEL_GRACE_SECONDS": "2",
            "FLOW_WORKER_STATE_DIR": str(tmp_path / "s"),
        },
        tmp_path / "w.log",
    )
    try:
        wait_for(lambda: vapi.state_type(runs["cancelled"]) == "RUNNING", 120, what="the flow to run")
        wait_for(
            lambda: worker.saw("run.output", flow_run_id=runs["cancelled"], line="cancellable started"),
            60,
            what="the flow body to start",
        )
        vapi.cancel(runs["cancelled"])
        for name, run_id in runs.items():
            final = vapi.wait_final(run_id, 120)
            assert final["state_type"] == ("CANCELLED" if name == "cancelled" else "CRASHED"), (name, final)
            wait_for(lambda r=run_id: worker.saw("run.hooks", flow_run_id=r), 90, what=f"{name}'s hooks")
            wait_for(marks[name].exists, 10, what=f"{name}'s marker")
            assert len(marks[name].read_text().splitlines()) == 1, (name, "once, never twice")
        engine_ran = worker.saw("run.hooks", flow_run_id=runs["raise_crash"], result="engine_ran")
        assert engine_ran == (version == "3.9.1"), "3.8+ engines run on_crashed hooks themselves"
        (event,) = wait_for(
            lambda: vapi.call(
                "POST",
                "events/filter",
                {
                    "filter": {
                        "any_resource": {"id": [f"prefect.flow-run.{runs['cancelled']}"]},
                        "event": {"name": ["prefect.runner.cancelled-flow-run"]},
                    }
                },
            )["events"],
            30,
            what="prefect.runner.cancelled-flow-run",
        )
        assert event["resource"]["prefect.resource.id"] == "prefect.runner.standalone"
        assert worker.stop() == 0
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
