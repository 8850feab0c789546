"""Event-driven pickup and cancellation against the real server's /api/events/out.

The poll intervals are set far above the deadlines, so a pass can only come from events.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Api, WorkerProcess, wait_for

SLOW_POLLS = {
    "FLOW_WORKER_QUERY_SECONDS": "60",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "120",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "30",
}


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
    api.call(
        "POST",
        f"flow_runs/{run_id}/set_state",
        {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
    )
    assert api.wait_final(run_id, 20)["state_type"] == "CANCELLED"
    assert worker.saw("run.cancelling", flow_run_id=run_id, via="event")


def test_events_off_still_works(api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]) -> None:
    dep = api.deployment(pool_name, job_variables={"command": "true"})
    worker = start_worker("--pool", pool_name, FLOW_WORKER_EVENTS="false", FLOW_WORKER_QUERY_SECONDS="1")
    run_id = api.run(dep)
    assert api.wait_final(run_id, 60)["state_type"] == "CRASHED"  # `true` is no engine: honest report
    assert not worker.saw("events.connected")
