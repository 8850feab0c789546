"""Strange answers against the real server (issue 19): a proxy answers web pages, truncated
JSON or JSON of the wrong type; the daemon stays up, says each episode once, runs every run
exactly once; a forged CANCELLING event stops nothing."""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Api, PrefectServer, WorkerProcess, wait_for
from tests.strange_proxy import FAMILIES, StrangeProxy
from worker.prefect.outage import REPEAT_SECONDS

FAST = {
    "FLOW_WORKER_QUERY_SECONDS": "1",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "1",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "5",
    "FLOW_WORKER_RECLAIM_AFTER": "15",  # the reclaim loop reads flow_runs/filter too
}
LOOPS = ("work_pools read", "heartbeat", "get_scheduled_flow_runs")
"""Endpoint families the worker's loops call whether or not a run comes."""
RACES_ONLY = ("flow_run_states",)
"""Endpoint families a run meets only in a race (issue 22: the claim's race check reads the
history only when the claim's answer does not show it replaced a SCHEDULED state)."""
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SOAK_SECONDS = float(os.environ.get("FLOW_WORKER_TEST_STRANGE_SECONDS", "180"))
"""How long the proxy corrupts a share of the answers while runs go through."""


def through(
    proxy: StrangeProxy, server: PrefectServer, tmp_path: Path, pool: str, **env: str
) -> WorkerProcess:
    """A daemon whose API is the proxy (the flows themselves talk to the server)."""
    env = {**FAST, "PREFECT_API_URL": proxy.url + "/api", "FLOW_WORKER_STATE_DIR": str(tmp_path / "s"), **env}
    return WorkerProcess(server, ["--pool", pool], env, tmp_path / "w.log")


def warnings(worker: WorkerProcess) -> list[dict[str, object]]:
    return [e for e in worker.events() if e.get("level") in ("warning", "error", "critical")]


def api_warnings(worker: WorkerProcess) -> list[dict[str, object]]:
    return [e for e in warnings(worker) if str(e.get("event", "")).startswith("api.")]


def settled(worker: WorkerProcess) -> int:
    """How many API warnings the worker has said, once none came for 2 s: the line about a
    corrupted answer can trail the answer by a moment on a loaded machine (in CI the last
    family's line landed in the next family's count)."""
    last, since = len(api_warnings(worker)), time.monotonic()
    deadline = since + 30.0
    while time.monotonic() - since < 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = len(api_warnings(worker))
        if now != last:
            last, since = now, time.monotonic()
    return last


def executions(out: Path) -> list[str]:
    return [json.loads(line)["run_id"] for line in out.read_text().splitlines()] if out.exists() else []


def test_a_web_page_from_each_endpoint_in_turn(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    env = {"env": {"PREFECT_API_URL": prefect_server.api_url}}
    with StrangeProxy(f"http://127.0.0.1:{prefect_server.port}") as proxy:
        worker = through(proxy, prefect_server, tmp_path, pool_name)
        try:
            wait_for(lambda: worker.saw("worker.synced"), 60, what="the first sync")
            runs = []
            for family in (f for f in FAMILIES if f not in RACES_ONLY):
                before = settled(worker)
                proxy.family = family
                if family not in LOOPS:  # an endpoint of a run's life: a run meets it
                    dep = api.deployment(pool_name, job_variables=env)  # (new: not in the worker's cache)
                    runs.append(api.run(dep, {"name": family, "out": str(out)}))
                wait_for(
                    lambda f=family: proxy.corrupted[f] >= 1, 90, what=f"the worker to meet {family}'s page"
                )
                proxy.family = None
                if family not in LOOPS:
                    assert api.wait_final(runs[-1], 120)["state_type"] == "COMPLETED", family
                said = api_warnings(worker)[before:]
                assert len(said) <= 1, (family, said)  # once per episode, not per call
                assert worker.proc.poll() is None, family
            assert len(api_warnings(worker)) >= 6  # each family that a loop reads was said
            hinted = [e for e in api_warnings(worker) if e["event"] == "api.unexpected_answer"]
            assert all("the API is under /api" in str(e["hint"]) for e in hinted)
        finally:
            assert worker.stop() == 0
    assert sorted(executions(out)) == sorted(runs), "each run executed exactly once"
    assert "Traceback" not in worker.log_path.read_text()


@pytest.mark.soak
def test_a_fifth_of_all_answers_corrupted_while_30_runs_go_through(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """Three minutes (``FLOW_WORKER_TEST_STRANGE_SECONDS``); `scripts/test` runs it beside the rest."""
    out = tmp_path / "out.jsonl"
    dep = api.deployment(pool_name, job_variables={"env": {"PREFECT_API_URL": prefect_server.api_url}})
    with StrangeProxy(f"http://127.0.0.1:{prefect_server.port}") as proxy:
        proxy.rate = 0.2
        worker = through(proxy, prefect_server, tmp_path, pool_name)
        runs: list[str] = []
        try:
            began = time.monotonic()
            for i in range(30):  # spread over the soak
                wait_for(lambda i=i: time.monotonic() - began >= i * SOAK_SECONDS / 30, SOAK_SECONDS, 0.5)
                runs.append(api.run(dep, {"name": f"strange{i}", "out": str(out)}))
            wait_for(lambda: time.monotonic() - began >= SOAK_SECONDS, SOAK_SECONDS, 0.5)
            corrupted = sum(proxy.corrupted.values())
            proxy.rate = 0.0
            states = {r: api.wait_final(r, 240)["state_type"] for r in runs}
            assert worker.proc.poll() is None
            print(f"corrupted {corrupted} answers of {corrupted + proxy.forwarded}: {dict(proxy.corrupted)}")
            assert corrupted > 50, "the proxy really corrupted answers"
        finally:
            assert worker.stop() == 0
    assert states == dict.fromkeys(runs, "COMPLETED"), "every run COMPLETED"
    counted = {r: executions(out).count(r) for r in runs}
    assert counted == dict.fromkeys(runs, 1), "each run executed exactly once"
    assert "Traceback" not in worker.log_path.read_text()
    said = collections.Counter(
        re.sub(UUID, "{id}", str(e["error"]).split(" answered")[0])
        for e in api_warnings(worker)
        if e["event"] == "api.unexpected_answer"
    )
    assert max(said.values()) <= 1 + SOAK_SECONDS // REPEAT_SECONDS, (
        said
    )  # an endpoint's story, not its calls


@pytest.mark.no_engine_run
@pytest.mark.parametrize("answer", ["json 404", "web page"])
def test_the_ui_address_without_api_is_said_in_one_line(
    prefect_server: PrefectServer, pool_name: str, tmp_path: Path, answer: str
) -> None:
    """Prefect 3.9's server answers an API client at its UI's address (no /api) with a JSON
    404 that names no object; a browser-like answer is the UI's page (served by the proxy)."""
    with StrangeProxy(f"http://127.0.0.1:{prefect_server.port}") as proxy:
        proxy.ui = answer == "web page"
        url = proxy.url if proxy.ui else f"http://127.0.0.1:{prefect_server.port}"
        worker = through(
            proxy, prefect_server, tmp_path, pool_name, PREFECT_API_URL=url, FLOW_WORKER_LOG_LEVEL="debug"
        )
        try:
            said = wait_for(lambda: warnings(worker), 60, what="the worker to say what is wrong")
            again = ("api.still_unavailable", "api.still_unexpected")
            tries = lambda: [e for e in worker.events() if e.get("event") in again]  # noqa: E731
            wait_for(lambda: len(tries()) >= 3, 60, what="the sync loop to try again, three times")
            assert worker.proc.poll() is None
            assert warnings(worker) == said and len(said) == 1, said
            assert f"/work_pools/{'' if answer == 'json 404' else pool_name}" in str(said[0]["error"])
            assert "is PREFECT_API_URL the UI's address? the API is under /api" in str(said[0]["hint"])
        finally:
            assert worker.stop() == 0
    assert "Traceback" not in worker.log_path.read_text()


def test_a_forged_cancelling_event_leaves_a_running_run_running(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    dep = api.deployment(pool_name)
    worker = start_worker("--pool", pool_name, FLOW_WORKER_QUERY_SECONDS="1")
    wait_for(lambda: worker.saw("events.connected"), 60, what="the event subscription")
    run_id = api.run(dep, {"name": "forged", "sleep": 8})
    wait_for(lambda: api.state_type(run_id) == "RUNNING", 60, 0.2, "the run to be RUNNING")
    pool_id = api.call("GET", f"work_pools/{pool_name}")["id"]
    forged = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.datetime.now(datetime.UTC).isoformat(),
        "event": "prefect.flow-run.Cancelling",
        "resource": {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.state-type": "CANCELLING",
            "prefect.state-name": "Cancelling",
        },
        "related": [
            {"prefect.resource.id": f"prefect.work-pool.{pool_id}", "prefect.resource.role": "work-pool"}
        ],
    }
    api.call("POST", "events", [forged])
    wait_for(
        lambda: worker.saw("events.cancel_not_confirmed", flow_run_id=run_id, state="RUNNING"),
        30,
        what="the worker to check the event against the run's state",
    )
    assert api.wait_final(run_id, 60)["state_type"] == "COMPLETED"
    assert not worker.saw("run.cancelling", flow_run_id=run_id)
