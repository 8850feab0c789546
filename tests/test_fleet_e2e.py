"""A fleet on one PostgreSQL-backed Prefect server: many workers, a dead host, a partition.

Everything is real: Debian's PostgreSQL as a throwaway cluster on a loopback port, a
Prefect 3.9.1 server on it, `flow-worker` daemons with distinct names (as systemd gives
them: ``<hostname> <pool>``), and real flows (``python -m prefect.engine``) that leave
one marker file per execution, so "run exactly once" is counted, not assumed.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import postgres
from tests.conftest import Api, PrefectServer, WorkerProcess, running_server, wait_for
from tests.cut_proxy import CutProxy
from worker.rules import fleet as fleet_rules

pytestmark = pytest.mark.skipif(
    postgres.bin_dir() is None, reason="PostgreSQL is not installed (apt-get install postgresql)"
)

QUERY = 2.0
"""Poll (and reclaim check) interval of every worker here, seconds."""
HEARTBEAT = 2
OWNER = "prefect.worker.name"


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PrefectServer]:
    with postgres.cluster() as url, running_server("flow-worker-pg-prefect-", database_url=url) as server:
        yield server


class Fleet:
    """Named workers on one pool of the PostgreSQL-backed server, and the runs' markers."""

    def __init__(self, server: PrefectServer, tmp_path: Path) -> None:
        self.server = server
        self.tmp = tmp_path
        self.api = Api(server)
        self.pool = f"fleet-{uuid.uuid4().hex[:8]}"
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.deployment = self.api.deployment(self.pool, entrypoint="hello.py:fleet", flow_name="fleet")
        self.workers: list[WorkerProcess] = []

    def name(self, host: str) -> str:
        return f"{host} {self.pool}"

    def state_dir(self, host: str) -> Path:
        return self.tmp / f"state-{host}"

    def start(self, host: str, reclaim_after: float, **env: str) -> WorkerProcess:
        env = {
            "FLOW_WORKER_NAME": self.name(host),
            "FLOW_WORKER_STATE_DIR": str(self.state_dir(host)),
            "FLOW_WORKER_RECLAIM_AFTER": str(reclaim_after),
            "PREFECT_WORKER_QUERY_SECONDS": str(QUERY),
            "PREFECT_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT),
            "FLOW_WORKER_CANCEL_GRACE_SECONDS": "5",
            **env,
        }
        log = self.tmp / f"worker-{host}-{len(self.workers)}.log"
        worker = WorkerProcess(self.server, ["--pool", self.pool], env, log)
        self.workers.append(worker)
        wait_for(lambda: worker.saw("worker.synced"), 60, what=f"{host} to sync")
        return worker

    def run(self, **parameters: Any) -> str:
        return self.api.run(self.deployment, {"marks": str(self.marks), **parameters})

    def executions(self) -> collections.Counter[str]:
        return collections.Counter(p.name.split(".")[0] for p in self.marks.iterdir())

    def running_on(self, run_id: str, host: str) -> bool:
        r = self.api.flow_run(run_id)
        return r["state_type"] == "RUNNING" and r["labels"].get(OWNER) == self.name(host)

    def said(self, event: str) -> list[dict[str, Any]]:
        """Every worker's ``event`` lines, each with ``said_by``: the worker's log file."""
        return [
            {**e, "said_by": w.log_path.name}
            for w in self.workers
            for e in w.events()
            if e.get("event") == event
        ]

    def story(self, run_id: str) -> list[tuple[str, str, str, str]]:
        """What each worker said of one run, in time order: (timestamp, worker's log,
        event, state or action): the evidence a failed assertion needs."""
        lines = [
            (
                e.get("timestamp", ""),
                w.log_path.name,
                e["event"],
                str(e.get("state") or e.get("action") or ""),
            )
            for w in self.workers
            for e in w.events()
            if e.get("flow_run_id") == run_id and e.get("event") != "run.output"
        ]
        return sorted(lines)

    def stop_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.stop(timeout=90)


@pytest.fixture
def fleet(pg_server: PrefectServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(pg_server, tmp_path)
    yield f
    f.stop_all()
    f.api.http.close()


def lost_states(api: Api, run_id: str) -> list[dict[str, Any]]:
    """The states in a run's history written by a reclaim."""
    return [s for s in api.states(run_id) if "was lost" in (s.get("message") or "")]


def wait_all_final(api: Api, runs: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    return {r: api.wait_final(r, max(1.0, deadline - time.monotonic())) for r in runs}


def test_three_workers_sixty_runs_each_executed_once(fleet: Fleet) -> None:
    runs = [fleet.run() for _ in range(60)]
    # three "hosts" share this machine's 2 cores: each takes 3 runs at a time, as a user
    # would size a host (60 engines at once starve every process here, the server's too)
    for host in ("host-a", "host-b", "host-c"):
        fleet.start(host, reclaim_after=60, FLOW_WORKER_LIMIT="3")
    finals = wait_all_final(fleet.api, runs, 600)
    assert {r: f["state_type"] for r, f in finals.items()} == dict.fromkeys(runs, "COMPLETED")
    assert fleet.executions() == collections.Counter(runs)  # each exactly once
    owners = collections.Counter(f["labels"].get(OWNER) for f in finals.values())
    print("runs per worker:", dict(owners))
    assert set(owners) <= {fleet.name(h) for h in ("host-a", "host-b", "host-c")}
    assert not fleet.said("run.reclaimed") and not fleet.said("run.lost_to_peer")


@pytest.mark.parametrize("on_lost", ["crash", "reschedule"])
def test_a_dead_hosts_runs_are_resolved_by_its_peers(fleet: Fleet, on_lost: str) -> None:
    reclaim_after, query = 20.0, 10.0  # Prefect's default poll interval: the bound is in polls
    a = fleet.start("host-a", reclaim_after)
    long = [fleet.run(first_sleep=600) for _ in range(2)]
    wait_for(lambda: all(fleet.running_on(r, "host-a") for r in long), 90, what="host-a to run both")
    for host in ("host-b", "host-c"):
        fleet.start(host, reclaim_after, FLOW_WORKER_ON_LOST=on_lost, PREFECT_WORKER_QUERY_SECONDS=str(query))

    # host-a dies: the worker and its flows are SIGKILLed, its state dir is gone
    pids = [int(fleet.api.flow_run(r)["infrastructure_pid"]) for r in long]
    a.proc.kill()
    a.proc.wait()
    for pid in pids:
        os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(fleet.state_dir("host-a"))
    quick = []
    for _ in range(20):  # created meanwhile, one every half second
        quick.append(fleet.run())
        time.sleep(0.5)

    left = wait_for(
        lambda: all(fleet.api.state_type(r) != "RUNNING" for r in long),
        reclaim_after + 60,
        what="both runs of the dead host to leave RUNNING",
    )
    assert left
    records = fleet.api.call("POST", f"work_pools/{fleet.pool}/workers/filter", {})
    last_seen = next(w for w in records if w["name"] == fleet.name("host-a"))["last_heartbeat_time"]
    bound = reclaim_after + 2 * query
    said = fleet.said("run.reclaimed")
    reclaimed = {e["flow_run_id"]: e for e in said}
    history = {
        r: [
            (s["type"], s["timestamp"], s["state_details"].get("transition_id"), s.get("message"))
            for s in fleet.api.states(r)
        ]
        for r in long
    }
    stories = {r: fleet.story(r) for r in long}
    assert sorted(reclaimed) == sorted(long) and len(said) == 2, (said, history, stories)  # one peer each
    for r in long:
        reclaim = lost_states(fleet.api, r)
        assert len(reclaim) == 1, reclaim
        assert fleet.name("host-a") in reclaim[0]["message"] and last_seen in reclaim[0]["message"]
        decided = reclaimed[r]["silent_seconds"]  # host-a's silence when the peer decided (server clock)
        written = _seconds_between(last_seen, reclaim[0]["timestamp"])
        print(
            f"{r}: decided {decided} s, written {written:.1f} s after host-a was last seen (bound {bound:g})"
        )
        assert decided <= bound
        assert written <= bound + 15  # the server's own latency, on 2 cores busy with 20 engines

    finals = wait_all_final(fleet.api, long + quick, 300)
    executions = fleet.executions()
    if on_lost == "crash":
        assert [finals[r]["state_type"] for r in long] == ["CRASHED", "CRASHED"]
        assert all(executions[r] == 1 for r in long)
    else:
        assert [finals[r]["state_type"] for r in long] == ["COMPLETED", "COMPLETED"]
        assert all(executions[r] == 2 for r in long)  # host-a's, then one peer's
    assert all(finals[r]["state_type"] == "COMPLETED" and executions[r] == 1 for r in quick)
    assert not any(lost_states(fleet.api, r) for r in quick)  # the reclaim touched none of them


def _seconds_between(earlier: str, later: str) -> float:
    from worker.rules.decisions import parse_time

    a, b = parse_time(earlier), parse_time(later)
    assert a is not None and b is not None
    return (b - a).total_seconds()


def test_a_claim_left_by_a_vanished_worker_runs_once(fleet: Fleet) -> None:
    ghost = fleet.name("ghost")
    api = fleet.api
    api.call(
        "POST", f"work_pools/{fleet.pool}/workers/heartbeat", {"name": ghost, "heartbeat_interval_seconds": 2}
    )
    run = fleet.run()
    claim = {"type": "PENDING", "name": "Pending", "state_details": {"transition_id": str(uuid.uuid4())}}
    assert api.call("POST", f"flow_runs/{run}/set_state", {"state": claim})["status"] == "ACCEPT"
    api.call("PATCH", f"flow_runs/{run}/labels", {OWNER: ghost, "prefect.worker.type": "process"})

    b = fleet.start("host-b", reclaim_after=8)
    final = api.wait_final(run, 120)
    assert final["state_type"] == "COMPLETED"
    assert fleet.executions()[run] == 1
    assert b.saw("run.reclaimed", action="reschedule", lost_worker=ghost)
    types = [s["type"] for s in api.states(run)]
    assert types[-5:] == ["PENDING", "SCHEDULED", "PENDING", "RUNNING", "COMPLETED"], types


def test_a_claim_names_its_worker_before_the_start_waits(fleet: Fleet, tmp_path: Path) -> None:
    """A run a lost worker left (a rescheduled one) is labelled with that worker until its
    next claimer labels it, after its start. Here the claimer's start waits (its interpreter
    check takes 25 s; on a loaded host, any slow step): its peer must not take the claim for
    the lost worker's and reschedule it. The claim itself names its worker (the PENDING
    state's message), and the peer's reclaim loop reads it in the pool's runs. (CI,
    2026-11-30: a rescheduled run was reclaimed a second time when nothing named the
    claimer before the start.)"""
    ghost = fleet.name("ghost")
    api = fleet.api
    api.call(
        "POST", f"work_pools/{fleet.pool}/workers/heartbeat", {"name": ghost, "heartbeat_interval_seconds": 2}
    )
    run = fleet.run()
    api.call("PATCH", f"flow_runs/{run}/labels", {OWNER: ghost, "prefect.worker.type": "process"})
    slow = tmp_path / "slow-python"
    slow.write_text(
        f'#!/bin/sh\n[ "$1" = -c ] && sleep 25  # the interpreter check only\nexec {sys.executable} "$@"\n'
    )
    slow.chmod(0o755)

    d = fleet.start("host-d", reclaim_after=6, FLOW_WORKER_PYTHON=str(slow))
    wait_for(lambda: d.saw("run.claimed", flow_run_id=run), 30, what="host-d to claim the run")
    claim = api.flow_run(run)
    assert claim["state"]["message"] == fleet_rules.claim_message(fleet.name("host-d"))
    assert claim["labels"][OWNER] == ghost, "no label write before the start"
    e = fleet.start("host-e", reclaim_after=6)  # sees a PENDING run labelled for the silent ghost
    time.sleep(12)  # two reclaim_after: e has looked at the pool's runs since
    assert not d.saw("run.started", flow_run_id=run), "still waiting for its start"
    assert not e.saw("run.reclaimed") and not lost_states(api, run)
    wait_for(lambda: d.saw("run.started", flow_run_id=run), 60, what="host-d to start it")
    wait_for(lambda: api.flow_run(run)["labels"].get(OWNER) == fleet.name("host-d"), 30, what="labels")
    assert api.wait_final(run, 120)["state_type"] == "COMPLETED"
    assert fleet.executions()[run] == 1
    assert not e.saw("run.reclaimed") and not lost_states(api, run)


def test_a_cut_off_worker_stops_the_run_its_peer_crashed(fleet: Fleet) -> None:
    reclaim_after = 12.0
    server = fleet.server
    with CutProxy(server.port) as proxy:
        p = fleet.start(
            "host-p",
            reclaim_after,
            PREFECT_API_URL=f"{proxy.url}/api",
            PREFECT_API_REQUEST_TIMEOUT="2",
        )
        run = fleet.run(first_sleep=600)
        wait_for(lambda: fleet.running_on(run, "host-p"), 90, what="host-p to run it")
        pid = int(fleet.api.flow_run(run)["infrastructure_pid"])
        q = fleet.start("host-q", reclaim_after)

        proxy.cut()
        crashed = wait_for(
            lambda: (r := fleet.api.flow_run(run))["state_type"] == "CRASHED" and r,
            reclaim_after + 60,
            what="host-q to crash the cut-off worker's run",
        )
        assert fleet.name("host-p") in crashed["state"]["message"]
        wait_for(
            lambda: q.saw("run.reclaimed", action="crash", lost_worker=fleet.name("host-p")),
            30,
            what="host-q to log its reclaim (after its race check)",
        )
        assert _alive(pid)  # cut off, the flow itself still runs
        proxy.heal()

        wait_for(lambda: p.saw("run.lost_to_peer"), 60, what="host-p to find its run taken")
        wait_for(lambda: not _alive(pid), 60, what="host-p to stop the flow's processes")
        wait_for(lambda: p.saw("run.not_reported"), 60, what="host-p to report nothing")
        lost = next(e for e in p.events() if e.get("event") == "run.lost_to_peer")
        assert lost["level"] == "warning" and "CRASHED" in lost["reason"]

    after = fleet.api.flow_run(run)
    assert after["state_type"] == "CRASHED"
    assert after["state"]["id"] == crashed["state"]["id"]  # the peer's state stands
    assert fleet.executions()[run] == 1


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.soak
def test_a_soak_of_rolling_restarts_reclaims_nothing(fleet: Fleet) -> None:
    """Five minutes; `scripts/test` runs it beside the rest of the suite (it mostly waits),
    so reclaim_after is a minute: a restart takes seconds, a loaded machine must not
    make a live worker look lost."""
    soak, every, reclaim_after = 300.0, 40.0, 60.0
    hosts = ["host-a", "host-b", "host-c"]
    current = {h: fleet.start(h, reclaim_after) for h in hosts}
    runs: list[str] = []
    began = time.monotonic()
    restarts = 0
    while (elapsed := time.monotonic() - began) < soak:
        runs.append(fleet.run(sleep=float(len(runs) % 4)))
        if elapsed >= every * (restarts + 1):
            host = hosts[restarts % len(hosts)]
            assert current[host].stop(timeout=120) == 0  # SIGTERM: drain, then exit
            current[host] = fleet.start(host, reclaim_after)
            restarts += 1
        time.sleep(2.5)
    finals = wait_all_final(fleet.api, runs, 300)
    print(f"soak: {len(runs)} runs, {restarts} restarts")
    assert restarts >= 7
    assert {r: f["state_type"] for r, f in finals.items()} == dict.fromkeys(runs, "COMPLETED")
    assert fleet.executions() == collections.Counter(runs)
    assert not fleet.said("run.reclaimed") and not fleet.said("run.lost_to_peer")
    active = fleet.api.call(
        "POST",
        "flow_runs/filter",
        {
            "work_pools": {"name": {"any_": [fleet.pool]}},
            "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "SCHEDULED"]}}},
        },
    )
    assert active == []
