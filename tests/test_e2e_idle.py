"""What an idle worker costs its server (issue 22), against the real server, counted by a proxy.

Prefect 3.9.1's worker, idle, makes one request per poll interval (6 a minute with the
default 10 s): it heartbeats over its worker channel and learns of cancellations from
events. flow-worker made 22 (a look at its peers every 5 s, a REST heartbeat and a pool
read every 30 s). Now the same, and a cancel still arrives by event at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import Api, PrefectServer, WorkerProcess, wait_for
from tests.cut_proxy import CutProxy

IDLE_PER_MINUTE = 8
"""Prefect's worker's 6 polls a minute (10 s, jittered by up to 30 %: as many as 8 in a
given minute), and the look at the pool's workers (every 150 s) that it does not make:
the counted minute holds at most 8 requests."""


@pytest.mark.no_engine_run
def test_an_idle_worker_costs_one_poll_an_interval_and_cancels_by_event(
    api: Api, pool_name: str, prefect_server: PrefectServer, start_worker: Callable[..., WorkerProcess]
) -> None:
    dep = api.deployment(pool_name, job_variables={"command": "sh -c 'sleep 300'"})
    with CutProxy(prefect_server.port) as proxy:
        worker = start_worker("--pool", pool_name, PREFECT_API_URL=f"{proxy.url}/api")
        wait_for(lambda: worker.saw("events.connected"), 60, what="the event subscription")
        wait_for(lambda: worker.saw("channel.connected"), 60, what="the worker channel")
        t0 = time.monotonic()
        counted = wait_for(
            lambda: (time.monotonic() - t0 >= 60 or proxy.count(t0) > IDLE_PER_MINUTE) and proxy.count(t0),
            90,
            1.0,
            "a minute of idling",
        )
        paths = [p for t, p in proxy.requests if t >= t0]
        print(f"idle: {counted} requests in {time.monotonic() - t0:.0f} s: {paths}")
        assert counted <= IDLE_PER_MINUTE, paths
        # heartbeats over the channel; over REST only while it was down (a busy SQLite server
        # may close it: 1011 heartbeat_persistence_failed), and then it says so
        rest = any(p.endswith("/workers/heartbeat") for p in paths)
        assert not rest or worker.saw("channel.disconnected"), "heartbeats over the channel"
        record = next(w for w in api.call("POST", f"work_pools/{pool_name}/workers/filter", {}) if w["name"])
        assert record["status"] == "ONLINE"

        run_id = api.run(dep)
        wait_for(lambda: worker.saw("run.started", flow_run_id=run_id), 60, what="the run to start")
        api.call(
            "POST",
            f"flow_runs/{run_id}/set_state",
            {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
        )
        # the cancel poll is backed off to 120 s while the stream is up: only the event explains
        # a cancel begun within 30 s; CANCELLED follows once the flow's on_cancellation hooks'
        # process (it imports Prefect: many seconds on a loaded host) is done (issue 21)
        by_event = lambda: worker.saw("run.cancelling", flow_run_id=run_id, via="event")  # noqa: E731
        wait_for(by_event, 30, what="the cancel by event")
        assert api.wait_final(run_id, 120)["state_type"] == "CANCELLED"
