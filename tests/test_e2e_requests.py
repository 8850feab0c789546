"""One run's requests against a real Prefect 3.9.1 server (SQLite), counted at the wire, and
the server behaviour that lets the worker spare the others.

* The claim names its worker in the PENDING state's message (``fleet.claim_message``), and
  the reclaim loop's read of the pool's runs (``POST /flow_runs/filter``) shows it.
* The accepted claim carries the SCHEDULED state's ``scheduled_time`` (the server's
  ``CopyScheduledTime``), and none when it replaced a final state: the race check's read
  is needed only then (``decisions.claimed_from_scheduled``).
* A CRASHED proposal answers with the current state (ABORT over a final one, REJECT over
  CANCELLING), which is what the reporter's read would have said.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.compare import CountingProxy
from tests.conftest import FLOWS, Api, PrefectServer, WorkerProcess, wait_for
from worker.rules import decisions, fleet
from worker.rules.models import FlowRun, OrchestrationResult, structure


def propose(api: Api, run_id: str, type_: str, message: str | None = None, force: bool = False) -> Any:
    state = {
        "type": type_,
        "name": type_.title(),
        "message": message,
        "state_details": {"transition_id": str(uuid.uuid4())},
    }
    return api.call("POST", f"flow_runs/{run_id}/set_state", {"state": state, "force": force})


def test_the_server_shows_what_the_worker_relies_on(api: Api, pool_name: str) -> None:
    deployment = api.deployment(pool_name)
    name = 'host "a" ' + pool_name

    run = api.run(deployment)
    claim = propose(api, run, "PENDING", fleet.claim_message(name))
    assert claim["status"] == "ACCEPT"
    assert decisions.claimed_from_scheduled(structure(claim, OrchestrationResult))
    body = {
        "work_pools": {"name": {"any_": [pool_name]}},
        "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}},
        "limit": 50,
        "offset": 0,
    }
    (row,) = api.call("POST", "flow_runs/filter", body)
    assert fleet.owner(structure(row, FlowRun)) == name, row["state"]

    # a stale claim over a run another worker finished: no scheduled_time, so the history is read
    raced = api.run(deployment)
    for type_ in ("PENDING", "RUNNING", "COMPLETED"):
        assert propose(api, raced, type_)["status"] == "ACCEPT"
    again = propose(api, raced, "PENDING", fleet.claim_message(name))
    assert again["status"] == "ACCEPT", again
    assert not decisions.claimed_from_scheduled(structure(again, OrchestrationResult))

    # CRASHED proposed over a final state, and over CANCELLING: the answer carries the state
    assert propose(api, raced, "RUNNING")["status"] == "ACCEPT"
    assert propose(api, raced, "COMPLETED")["status"] == "ACCEPT"
    aborted = propose(api, raced, "CRASHED")
    assert aborted["status"] == "ABORT" and aborted["state"]["type"] == "COMPLETED", aborted
    cancelling = api.run(deployment)
    for type_ in ("PENDING", "RUNNING", "CANCELLING"):
        assert propose(api, cancelling, type_)["status"] == "ACCEPT"
    rejected = propose(api, cancelling, "CRASHED")
    assert rejected["status"] == "REJECT" and rejected["state"]["type"] == "CANCELLING", rejected


def test_one_runs_requests(prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path) -> None:
    """Every request the worker sends about one run, counted at the wire (its engine, a
    stand-in that reports RUNNING and COMPLETED, talks to the server directly)."""
    command = f"{sys.executable} {FLOWS / 'fake_engine.py'}"
    env = {"FAKE_ENGINE_API_URL": prefect_server.api_url}
    deployment = api.deployment(pool_name, job_variables={"command": command, "env": env})
    proxy = CountingProxy(prefect_server.port)
    worker = WorkerProcess(
        prefect_server,
        ["--pool", pool_name],
        {"PREFECT_API_URL": proxy.api_url, "FLOW_WORKER_STATE_DIR": str(tmp_path / "state")},
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: worker.saw("worker.synced"), 60, what="the worker to sync")
        run = api.run(deployment)
        t0 = time.monotonic()
        assert api.wait_final(run, 120)["state_type"] == "COMPLETED"
        wait_for(lambda: worker.saw("run.finished", flow_run_id=run), 30, what="the worker to see it end")
        labels = wait_for(lambda: api.flow_run(run)["labels"].get(fleet.OWNER_LABEL), 30, what="labels")
        claim = next(s for s in api.states(run) if s["type"] == "PENDING")
    finally:
        worker.stop()
    with proxy.lock:
        seen = [path for t, path in proxy.requests if t >= t0]
    about_run = [p for p in seen if run in p]
    assert labels and claim["message"] == fleet.claim_message(labels), claim
    # the claim, the labels (after the start), the pid; nothing else names the run:
    # no race check (the claim replaced SCHEDULED), no read of the run before the report
    suffixes = [p.split(run)[-1] or "/" for p in about_run]
    assert sorted(set(suffixes)) == ["/", "/labels", "/set_state"], seen
    # one of each; more label writes only if a busy server refused the first (then once more,
    # essential, at the run's end, and its retry)
    assert suffixes.count("/") == suffixes.count("/set_state") == 1 and suffixes.count("/labels") <= 3, seen
    # the report's read: one POST /flow_runs/filter (no cancellation poll or reclaim sweep
    # runs in so short a time: the events stream watches cancellations)
    assert sum(p.startswith("/api/flow_runs/filter") for p in seen) <= 2, seen
