"""One chatty run costs that run, not the worker (issue 19): `timeout 30 yes` beside a
sleeping run, against the real Prefect 3.9.1 server and a real daemon.

While `yes` floods its output for 30 s:
* ``/health`` answers within 0.5 s at every probe (one every 0.5 s);
* a cancel of the sleeping run stops it within 2 s (its process exited; CANCELLED follows
  once the flow's ``on_cancellation`` hooks have run, issue 21: a process of its own that
  imports Prefect, so its time is the host's, not the worker's);
* heartbeats go out on time (no heartbeat older than twice the interval);
* the worker's RSS grows by at most 20 MiB;
* the output file holds on disk at most ``output.FILE_CAP`` plus what `yes` writes in
  ``REACTION`` (output.py: a flood holds its rate times the worker's reaction), and the
  worker's log grows by no more than the output budget's worth of lines
  (``budget.LINES_PER_SECOND``, burst ``budget.LINE_BURST``).

The numbers measured are printed (``-s``). On 2 shared cores `yes` takes one; the bounds
are the issue's, not loosened.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Api, WorkerProcess, free_port, wait_for
from worker.process import output
from worker.rules import budget

FLOOD_SECONDS = 30
FLOOD = f"timeout {FLOOD_SECONDS} yes"
HEARTBEAT = 5
PROBE_EVERY = 0.5
PROBE_TIMEOUT = 0.5
CANCEL_WITHIN = 2.0
RSS_GROWTH = 20 * 2**20
RECORD = 400
"""Bytes of one ``run.output`` JSON line in the worker's log, at most, for a line of
``yes`` (the run's id, name, pool, pid, time stamp and a one-character line: ~250)."""
LOG_SLACK = 2**20
"""The worker's other lines meanwhile (polls, heartbeats, the cancel, the reports)."""
REACTION = 0.25
"""Seconds of a flood's output a file may hold on disk beyond ``FILE_CAP``: the worker's
look (20 ms) and release (the file's lock, the freeing), and the CPU it waits for on 2
shared cores. Measured: ~0.03 s typically, ~0.15 s at worst."""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def parse_time(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Sampler(threading.Thread):
    """Calls ``sample()`` every ``every`` seconds until stopped; keeps what it returns."""

    def __init__(self, every: float, sample: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.every, self.sample = every, sample
        self.values: list[Any] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self.values.append(self.sample())
            next_at += self.every
            self.stopping.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> list[Any]:
        self.stopping.set()
        self.join(10)
        return self.values


@pytest.mark.no_engine_run
def test_a_flood_beside_a_sleeping_run_costs_the_worker_nothing(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    port = free_port()
    state_dir = tmp_path / "state"
    worker = start_worker(
        "--pool",
        pool_name,
        "--with-healthcheck",
        PREFECT_WORKER_WEBSERVER_PORT=str(port),
        FLOW_WORKER_STATE_DIR=str(state_dir),
        FLOW_WORKER_QUERY_SECONDS="1",
        FLOW_WORKER_CANCEL_POLL_SECONDS="1",
        FLOW_WORKER_HEARTBEAT_SECONDS=str(HEARTBEAT),
    )
    health = f"http://127.0.0.1:{port}/health"

    def healthy() -> bool:
        try:
            return httpx.get(health, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 60, what="/health to answer 200")
    sleeper = api.run(api.deployment(pool_name, job_variables={"command": "sleep 120"}))
    wait_for(lambda: worker.saw("run.started", flow_run_id=sleeper), 60, what="the sleeping run to start")
    time.sleep(2)  # settled: the baseline is the worker with one run, before the flood
    pid = worker.proc.pid
    rss_before, log_before, cpu_before = rss(pid), worker.log_path.stat().st_size, cpu_seconds(pid)

    def probe() -> tuple[float, float, int | None]:
        t0 = time.monotonic()
        try:
            status: int | None = httpx.get(health, timeout=PROBE_TIMEOUT).status_code
        except httpx.HTTPError:
            status = None
        return t0, time.monotonic() - t0, status

    def files() -> tuple[int, int]:
        """The most disk (blocks) and the longest length of the output files now."""
        disk = length = 0
        for path in (state_dir / "output").glob("*"):
            try:
                found = path.stat()
            except FileNotFoundError:  # the sleeping run's, removed when it ends
                continue
            disk, length = max(disk, found.st_blocks * 512), max(length, found.st_size)
        return disk, length

    def heartbeat() -> float | None:
        try:
            rows = httpx.post(f"{api.server.api_url}/work_pools/{pool_name}/workers/filter", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        beats = [parse_time(r["last_heartbeat_time"]) for r in rows if r.get("last_heartbeat_time")]
        return time.time() - max(beats) if beats else None

    flood = api.run(api.deployment(pool_name, job_variables={"command": FLOOD}))
    wait_for(lambda: worker.saw("run.started", flow_run_id=flood), 60, 0.05, what="the flood to start")
    started = time.monotonic()
    samplers = {
        "probe": Sampler(PROBE_EVERY, probe),
        "rss": Sampler(0.25, lambda: rss(pid)),
        "files": Sampler(0.1, files),
        "heartbeat": Sampler(1.0, heartbeat),
    }
    for sampler in samplers.values():
        sampler.start()

    time.sleep(FLOOD_SECONDS / 3)  # mid-flood: cancel the sleeping run
    api.cancel(sleeper)
    asked = time.monotonic()
    wait_for(lambda: worker.saw("run.exited", flow_run_id=sleeper), 60, 0.05, what="the sleeping run to stop")
    cancelled_in = time.monotonic() - asked
    wait_for(
        lambda: api.state_type(sleeper) == "CANCELLED", 120, 0.2, what="the sleeping run to be CANCELLED"
    )

    final = api.wait_final(flood, FLOOD_SECONDS + 60)
    flood_seconds = time.monotonic() - started
    values = {name: sampler.stop() for name, sampler in samplers.items()}
    user, system = (after - before for after, before in zip(cpu_seconds(pid), cpu_before, strict=True))
    log_growth = worker.log_path.stat().st_size - log_before

    probes = values["probe"]
    worst_probe = max(latency for _, latency, _ in probes)
    failed = [(round(t - started, 1), round(latency, 3), s) for t, latency, s in probes if s != 200]
    rss_growth = max(values["rss"]) - rss_before
    disk, length = max(d for d, _ in values["files"]), max(n for _, n in values["files"])
    rate = length / flood_seconds  # holes are punched: the length is all `yes` wrote
    ages = [age for age in values["heartbeat"] if age is not None]
    events = worker.events()
    logged = sum(1 for e in events if e.get("event") == "run.output" and e.get("flow_run_id") == flood)
    dropped = [e for e in events if e.get("event") == "run.output_dropped" and e.get("flow_run_id") == flood]
    print(
        f"\nflood {flood_seconds:.1f} s ({final['state_type']}): {len(probes)} /health probes, worst"
        f" {worst_probe * 1000:.0f} ms, failed {failed}; cancel → stopped in {cancelled_in:.2f} s;"
        f" heartbeat age worst {max(ages):.1f} s ({len(ages)} reads); RSS {rss_before / 2**20:.1f} MiB"
        f" +{rss_growth / 2**20:.1f} MiB; output file at most {disk / 2**20:.1f} MiB on disk"
        f" (`yes` wrote {length / 2**30:.2f} GiB, {rate / 2**20:.0f} MiB/s); worker log"
        f" +{log_growth / 2**20:.2f} MiB,"
        f" {logged} lines of the flood logged, {len(dropped)} drop reports"
        f" ({sum(d['lines'] for d in dropped)} lines, {sum(d['bytes'] for d in dropped) / 2**30:.2f} GiB);"
        f" worker CPU {user:.1f} s user + {system:.1f} s system ({(user + system) / flood_seconds:.0%}"
        " of a core)"
    )
    assert final["state_type"] == "CRASHED"  # `timeout` exits 124
    assert len(probes) >= FLOOD_SECONDS / PROBE_EVERY * 0.9
    assert not failed and worst_probe <= PROBE_TIMEOUT, "/health answered at every probe"
    assert cancelled_in <= CANCEL_WITHIN
    assert len(ages) >= FLOOD_SECONDS / 2 and max(ages) <= 2 * HEARTBEAT, "heartbeats on time"
    assert rss_growth <= RSS_GROWTH
    assert disk <= output.FILE_CAP + rate * REACTION
    budget_lines = budget.LINE_BURST + budget.LINES_PER_SECOND * flood_seconds
    assert logged <= budget_lines
    assert log_growth <= budget_lines * RECORD + LOG_SLACK
    assert dropped and all(
        d["detail"].endswith("dropped: over the output budget (200 lines/s, 256 KiB/s)") for d in dropped
    )
    assert len(dropped) <= flood_seconds / budget.REPORT_SECONDS + 2, "said per episode, not per line"
