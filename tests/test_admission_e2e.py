"""Admission by memory and the cost of each run, with real flows on the real server.

The reserve is set from the memory this machine has available when the test starts, so
that a given number of runs fit whatever the machine; a run here (`hello.py:hold`, 100 MiB
held for 10 s) takes its engine (~100-120 MiB resident) plus those 100 MiB.
"""

from __future__ import annotations

import collections
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Api, WorkerProcess, flow_worker, wait_for
from worker.host import memory
from worker.rules.admission import MIB

FAST = {"FLOW_WORKER_QUERY_SECONDS": "1", "FLOW_WORKER_HEARTBEAT_SECONDS": "5"}
RUN_MIB = 195
"""What one `hold(100)` run's tree takes here, resident (measured: 193 MiB with 3.9.1)."""


def reserve_for(runs: float) -> str:
    """A ``memory_reserve`` that leaves room for about ``runs`` runs on this machine now."""
    return str(int(memory.read().available - runs * RUN_MIB * MIB))


def states(api: Api, deployment: str) -> collections.Counter[str]:
    body = {"deployments": {"id": {"any_": [deployment]}}, "limit": 200}
    return collections.Counter(r["state_type"] for r in api.call("POST", "flow_runs/filter", body))


def watch_backlog(api: Api, deployment: str, total: int, timeout: float) -> tuple[int, bool]:
    """Until all ``total`` runs are COMPLETED: the most runs PENDING or RUNNING at once, and
    whether runs were seen waiting SCHEDULED while others ran."""
    most, held = 0, False
    deadline = time.monotonic() + timeout
    while True:
        seen = states(api, deployment)
        assert set(seen) <= {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"}, seen
        active = seen["PENDING"] + seen["RUNNING"]
        most = max(most, active)
        held = held or bool(seen["SCHEDULED"] and active)
        if seen["COMPLETED"] == total:
            return most, held
        assert time.monotonic() < deadline, f"backlog not done in {timeout}s: {seen}"
        time.sleep(0.3)


def most_processes_at_once(worker: WorkerProcess) -> int:
    """From the worker's own log: the most run processes alive at once."""
    changes = []
    for e in worker.events():
        if e.get("event") in ("run.started", "run.exited"):
            at = datetime.datetime.fromisoformat(e["timestamp"])
            changes.append((at, 1 if e["event"] == "run.started" else -1))
    alive = most = 0
    for _, change in sorted(changes):
        alive += change
        most = max(most, alive)
    return most


def test_a_backlog_is_admitted_as_memory_allows(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    dep = api.deployment(pool_name, entrypoint="hello.py:hold", flow_name="hold")
    runs = [api.run(dep, {"mib": 100, "seconds": 10}) for _ in range(30)]
    worker = start_worker("--pool", pool_name, FLOW_WORKER_MEMORY_RESERVE=reserve_for(4), **FAST)
    most, held = watch_backlog(api, dep, len(runs), 600)
    processes = most_processes_at_once(worker)
    print(f"most runs active at once: {most} (API), {processes} processes (worker log)")
    assert most <= 7 and processes <= 7
    assert processes >= 3  # admission held the backlog, it did not serialise it
    assert held  # the waiting runs stayed SCHEDULED, not PENDING
    assert all(api.state_type(r) == "COMPLETED" for r in runs)
    short = next(e for e in worker.events() if e.get("event") == "memory.short")
    assert short["held"] > 0 and short["available_mib"] > short["reserve_mib"]
    exits = wait_for(
        lambda: len(e := [e for e in worker.events() if e.get("event") == "run.exited"]) == 30 and e,
        60,
        what="the worker to see every process exit",
    )
    assert all(e["peak_memory_mib"] >= 100 for e in exits)


def test_a_worker_without_room_leaves_the_backlog_to_one_with_room(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    dep = api.deployment(pool_name, entrypoint="hello.py:hold", flow_name="hold")
    runs = [api.run(dep, {"mib": 100, "seconds": 10}) for _ in range(30)]
    full = start_worker("--pool", pool_name, "--name", "no-room", FLOW_WORKER_MEMORY_RESERVE="100%", **FAST)
    roomy = start_worker(
        "--pool", pool_name, "--name", "roomy", FLOW_WORKER_MEMORY_RESERVE=reserve_for(9), **FAST
    )
    watch_backlog(api, dep, len(runs), 600)
    claimed = {e["flow_run_id"] for e in roomy.events() if e.get("event") == "run.claimed"}
    assert claimed == set(runs)
    assert full.saw("memory.short") and not full.saw("run.claimed")


def test_once_leaves_what_does_not_fit_scheduled(api: Api, pool_name: str, prefect_server: Any) -> None:
    dep = api.deployment(pool_name, entrypoint="hello.py:hold", flow_name="hold")
    runs = [api.run(dep, {"mib": 1, "seconds": 0}) for _ in range(2)]
    began = time.monotonic()
    done = flow_worker(prefect_server, "--pool", pool_name, "--once", FLOW_WORKER_MEMORY_RESERVE="100%")
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - began < 60
    assert "memory.short" in done.stdout + done.stderr
    assert [api.state_type(r) for r in runs] == ["SCHEDULED", "SCHEDULED"]


def test_peak_memory_and_cpu_of_a_run_are_reported(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    dep = api.deployment(pool_name, entrypoint="hello.py:measured", flow_name="measured")
    out = tmp_path / "truth.json"
    run = api.run(dep, {"out": str(out), "mib": 200, "cpu": 3.0, "seconds": 2.0})
    worker = start_worker("--pool", pool_name, **FAST)
    assert api.wait_final(run, 120)["state_type"] == "COMPLETED"
    truth: dict[str, Any] = json.loads(out.read_text())
    exited = wait_for(
        lambda: next((e for e in worker.events() if e.get("event") == "run.exited"), None),
        30,
        what="the worker to see the process exit",
    )
    peak, cpu = exited["peak_memory_mib"] * MIB, exited["cpu_seconds"]
    hwm, true_cpu = truth["hwm"], truth["cpu"]
    print(f"peak {peak / MIB:.0f} MiB vs VmHWM {hwm / MIB:.0f} MiB; CPU {cpu} s vs {true_cpu:.2f} s")
    assert truth["held"] == 200 * MIB
    assert abs(peak - truth["hwm"]) <= 0.2 * truth["hwm"]
    assert abs(cpu - truth["cpu"]) <= 0.2 * truth["cpu"]
    body = {"logs": {"flow_run_id": {"any_": [run]}}, "limit": 200}
    wait_for(  # in the run's logs in the UI (the worker ships its lines in batches)
        lambda: any("peak memory" in line["message"] for line in api.call("POST", "logs/filter", body)),
        30,
        what="the worker's exit line with the run's cost in the run's logs",
    )
