"""Event-driven pickup and cancellation against the real server's /api/events/out.

The poll intervals are set far above the deadlines, so a pass can only come from events.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Api, WorkerProcess, free_port, wait_for

SLOW_POLLS = {
    "FLOW_WORKER_QUERY_SECONDS": "60",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "120",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "30",
}


@pytest.mark.no_engine_run
def test_pickup_and_cancel_by_event(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    dep = api.deployment(pool_name, job_variables={"command": "sh -c 'sleep 300'"})
    worker = start_worker("--pool", pool_name, **SLOW_POLLS)
    wait_for(lambda: worker.saw("events.connected"), 30, what="the event subscription")
    wait_for(lambda: worker.saw("worker.synced"), 30, what="the first sync")
    run_id = api.run(dep)
    # the next regular poll is >= 42 s away (60 s -30 %): only the event can explain a claim now
    wait_for(lambda: worker.saw("run.started", flow_run_id=run_id), 15, what="a claim triggered by the event")
    api.cancel(run_id)
    # the cancel poll is >= 42 s away; CANCELLED follows the flow's on_cancellation hooks
    assert api.wait_final(run_id, 40)["state_type"] == "CANCELLED"
    assert worker.saw("run.cancelling", flow_run_id=run_id, via="event")


@pytest.mark.no_engine_run
def test_events_off_still_works(api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]) -> None:
    dep = api.deployment(pool_name, job_variables={"command": "true"})
    worker = start_worker("--pool", pool_name, FLOW_WORKER_EVENTS="false", FLOW_WORKER_QUERY_SECONDS="1")
    run_id = api.run(dep)
    assert api.wait_final(run_id, 60)["state_type"] == "CRASHED"  # `true` is no engine: honest report
    assert not worker.saw("events.connected")


RESUME_BOUND = 10.0
"""The next regular poll is at least 42 s away (60 s, jittered by up to 30 %): runs started
within 10 s of the resume were started by its event. How fast (issue 10: within 1 s) is a
speed figure, measured by ``bench/compare`` (its "queue resume" row, beside Prefect's
worker), and printed here."""


@pytest.mark.no_engine_run
def test_resumed_queue_starts_its_runs_at_once(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    dep = api.deployment(pool_name, job_variables={"command": "sleep 1"})
    queue = api.call("GET", f"work_pools/{pool_name}/queues/default")
    api.call("PATCH", f"work_queues/{queue['id']}", {"is_paused": True})
    worker = start_worker("--pool", pool_name, **SLOW_POLLS)
    wait_for(lambda: worker.saw("events.connected"), 30, what="the event subscription")
    runs = [api.run(dep) for _ in range(5)]
    # their SCHEDULED events make the worker poll; the paused queue gives it nothing
    assert all(api.state_type(r) == "SCHEDULED" for r in runs), "a paused queue holds its runs"
    assert not any(worker.saw("run.started", flow_run_id=r) for r in runs)
    resumed = time.time()
    api.call("PATCH", f"work_queues/{queue['id']}", {"is_paused": False})
    started = [
        wait_for(lambda r=r: first(worker, "run.started", flow_run_id=r), 15, 0.1, "pickup on resume")
        for r in runs
    ]
    late = max(logged_at(e) for e in started) - resumed
    print(f"resume: 5 runs started within {late:.2f}s of the queue's resume")
    assert late < RESUME_BOUND, f"the last run started {late:.2f}s after the resume: not by its event"


def first(worker: WorkerProcess, event: str, **fields: Any) -> dict[str, Any] | None:
    return next((e for e in worker.events() if e.get("event") == event and fields.items() <= e.items()), None)


def logged_at(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def looks(port: int) -> int:
    """The worker's reads of its pool's workers so far (its /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith("flow_worker_fleet_looks_total ")]
    return int(float(line.split()[1]))


@pytest.mark.no_engine_run
def test_a_lone_worker_looks_at_its_pool_when_the_stream_tells_of_a_claim_not_its_own(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Issue 22 (idle requests): alone in its pool with the stream up, a worker does not
    read its pool's workers every ``reclaim_after``; a claim (PENDING) of a run it does
    not hold, as a newcomer peer's, brings the look at once."""
    port = free_port()
    dep = api.deployment(pool_name, job_variables={"command": "true"})
    worker = start_worker(
        "--pool",
        pool_name,
        FLOW_WORKER_RECLAIM_AFTER="5",
        FLOW_WORKER_WITH_HEALTHCHECK="true",
        FLOW_WORKER_WEBSERVER_PORT=str(port),
        **SLOW_POLLS,
    )
    wait_for(lambda: worker.saw("events.connected"), 30, what="the event subscription")
    wait_for(lambda: looks(port) == 1, 30, what="the first look at the pool")
    time.sleep(20)  # four times reclaim_after: a worker with no stream looked four more times
    assert looks(port) == 1
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    state = {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}
    run_id = str(api.call("POST", f"deployments/{dep}/create_flow_run", {"state": state})["id"])
    claim = {"state": {"type": "PENDING", "name": "Pending"}}  # a peer's claim, as it sends it
    assert api.call("POST", f"flow_runs/{run_id}/set_state", claim)["status"] == "ACCEPT"
    wait_for(lambda: looks(port) == 2, 10, what="a look after the claim event")
    api.call("POST", f"flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLED"}, "force": True})
