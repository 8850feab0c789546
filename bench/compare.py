"""flow-worker vs `prefect worker start --type process`, side by side on one local server.

Run through ``bench/compare`` (it bootstraps the venv). Each scenario runs both workers,
one after the other (the order alternates between scenarios), each on a fresh pool of the
same server. The workers talk to the server through a counting TCP proxy (websockets pass
through untouched), so API requests are counted per worker; flow runs talk to the server
directly. The proxy also counts the answers' status lines (``503`` per worker) and the
websockets it carries. Prints a table of ratios flow-worker / prefect, writes it to
``bench/results/latest.md`` (or ``--out DIR``) and a plot of pickup latencies to
``bench/results/pickup.png``. One scenario runs on a second server backed by a throwaway
PostgreSQL cluster; one ("runs in a row") runs flow-worker alone.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import spy  # noqa: E402
from tests import postgres  # noqa: E402  (the fleet tests' throwaway PostgreSQL cluster)
from tests.conftest import FLOWS, Api, PrefectServer, running_server, wait_for  # noqa: E402
from worker.process.usage import tree, tree_pss  # noqa: E402  (the worker's own /metrics measures)

BIN = Path(sys.executable).parent
# flow-worker as it is deployed: its own venv, without prefect (bench/compare builds it);
# its flow runs use this venv's python, which has prefect
FW_BIN = Path(os.environ.get("FLOW_WORKER_BIN", str(BIN / "flow-worker")))
KINDS = ("flow-worker", "prefect")
WARM = "flow-worker warm"
"""flow-worker with ``warm_start = true``: run beside the other two in the real-flow scenarios."""
ALL_KINDS = (*KINDS, WARM)
LATE_START = "worker started 15 s before the API: API back → registered (s)"
RESUME = "queue resumed with 5 runs waiting: resume → last claimed (s)"
IDLE_REQUESTS = "idle API requests per minute"
IDLE_SPAN = "idle API requests per minute, the polls' rate from their span"
IDLE_STREAM = "idle: events websocket up (% of the window)"
POLL = "get_scheduled_flow_runs"
"""flow-worker's ``/api/events/out`` stream, which lets it back off its cancellation poll.
Prefect 3.9.1's worker opens none by default (``PREFECT_WORKER_ENABLE_CANCELLATION`` is
false; the flow's runner watches for cancellation): 0 there, and no ratio."""
NO_RATIO = {IDLE_STREAM}
ON_PG = " on PostgreSQL"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
REQUEST_LINE = re.compile(rb"(?:GET|POST|PATCH|PUT|DELETE) (/api/[^ ]*) HTTP/1\.[01]\r\n")
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def endpoint(path: str) -> str:
    """A request's path without its query, ids as ``{id}``: what the breakdowns count by."""
    return UUID.sub("{id}", path.split("?")[0])


# ---------------------------------------------------------------- counting proxy


class Connection:
    """One client connection through the proxy: its last request's path, and whether it
    became a websocket (after which its bytes are frames, not HTTP, and are not parsed)."""

    def __init__(self) -> None:
        self.path = ""
        self.websocket: list[Any] | None = None
        """``[path, opened, closed or None]``, shared with :attr:`CountingProxy.websockets`."""


class CountingProxy:
    """A byte-level TCP forwarder that records the HTTP request lines clients send, the
    status lines of the answers, and the websockets opened through it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str]] = []
        self.responses: list[tuple[float, int, str]] = []
        """(when, status, the path of the request it answers: HTTP/1.1 answers in order)"""
        self.websockets: list[list[Any]] = []
        self.open: set[socket.socket] = set()
        self.restore()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def cut(self) -> None:
        """An API outage as the workers see a stopped server: the port refuses connections
        and every open one is dropped."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            dropped, self.open = self.open, set()
        for s in dropped:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        """Listen (again, on the same port after a :meth:`cut`)."""
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.open |= {client, upstream}
            conn = Connection()
            threading.Thread(target=self._pipe, args=(client, upstream, conn, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, conn, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, conn: Connection, requests: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if conn.websocket is None:
                    window = tail + data
                    pattern = REQUEST_LINE if requests else STATUS_LINE
                    found = [m.group(1) for m in pattern.finditer(window) if m.end() > len(tail)]
                    if found:
                        now = time.monotonic()
                        with self.lock:
                            if requests:
                                self.requests.extend((now, path.decode()) for path in found)
                                conn.path = found[-1].decode()
                            else:
                                self.responses.extend((now, int(status), conn.path) for status in found)
                                if found[-1] == b"101":  # switching protocols: a websocket
                                    conn.websocket = [conn.path, now, None]
                                    self.websockets.append(conn.websocket)
                    tail = window[-200:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                if conn.websocket is not None and conn.websocket[2] is None:
                    conn.websocket[2] = time.monotonic()
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def quiet_for(self, seconds: float) -> bool:
        """No request went through for ``seconds``."""
        with self.lock:
            last = self.requests[-1][0] if self.requests else -math.inf
        return time.monotonic() - last >= seconds

    def count(self, since: float, until: float | None = None) -> int:
        with self.lock:
            return sum(1 for t, _ in self.requests if t >= since and (until is None or t <= until))

    def statuses(self, status: int, since: float, until: float | None = None) -> int:
        """How many answers with this HTTP status went back to clients in the window."""
        with self.lock:
            return sum(
                1
                for t, s, _ in self.responses
                if s == status and t >= since and (until is None or t <= until)
            )

    def breakdown(
        self, since: float, status: int = 503, until: float = math.inf
    ) -> dict[str, tuple[int, int]]:
        """Per request (path and method-less, ids as ``{id}``): requests sent since ``since``,
        and answers with ``status`` among them: where a scenario's requests went."""
        sent: collections.Counter[str] = collections.Counter()
        answered: collections.Counter[str] = collections.Counter()
        with self.lock:
            sent.update(endpoint(path) for t, path in self.requests if since <= t <= until)
            answered.update(
                endpoint(path) for t, s, path in self.responses if since <= t <= until and s == status
            )
        return {key: (sent[key], answered[key]) for key in sorted(sent | answered, key=lambda k: -sent[k])}

    def websocket_seconds(self, pattern: str, since: float, until: float) -> float:
        """For how much of ``[since, until]`` a websocket whose path contains ``pattern`` was
        open through the proxy (overlapping ones counted once)."""
        with self.lock:
            spans = sorted(
                (max(o, since), min(c if c is not None else until, until))
                for p, o, c in self.websockets
                if pattern in p
            )
        covered, reach = 0.0, since
        for start, end in spans:
            start = max(start, reach)
            if end > start:
                covered += end - start
                reach = end
        return covered

    def first(self, since: float, pattern: str) -> float | None:
        with self.lock:
            return next((t for t, p in self.requests if t >= since and pattern in p), None)


# ---------------------------------------------------------------- /proc sampling


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def proc_cpu_all(pid: int) -> float:
    """utime + stime + cutime + cstime: the process and its children already reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICK


def tree_sum(pid: int, of: Callable[[int], float]) -> float:
    """``of(p)`` summed over the live processes of ``pid``'s tree (those that vanish
    meanwhile count 0)."""
    total = 0.0
    for p in tree(pid):
        try:
            total += of(p)
        except (OSError, ValueError):
            pass
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree: every live process and every child it reaped (a
    live process's CPU is in no one's cutime yet, a reaped one's only in its reaper's)."""
    return tree_sum(pid, proc_cpu_all)


def tree_rss(pid: int) -> int:
    return int(tree_sum(pid, proc_rss))


# ---------------------------------------------------------------- workers


class Worker:
    def __init__(
        self, kind: str, pool: str, proxy: CountingProxy, home: Path, extra_env: dict[str, str]
    ) -> None:
        self.kind = kind
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLOW_WORKER_"))}
        env.update(
            PREFECT_API_URL=proxy.api_url,
            PREFECT_HOME=str(home / "prefect-home"),
            FLOW_WORKER_STATE_DIR=str(home / f"state-{uuid.uuid4().hex[:6]}"),
            FLOW_WORKER_LOG_FORMAT="json",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            **extra_env,
        )
        if kind in ("flow-worker", WARM):
            cmd = [str(FW_BIN), "--pool", pool]
            env["FLOW_WORKER_PYTHON"] = sys.executable
            env["FLOW_WORKER_WARM_START"] = "true" if kind == WARM else "false"
        else:
            cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        self.log = (home / f"{kind}-{pool}.log").open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.kind == "prefect" else signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- scenarios


def ts(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def state_time(api: Api, run_id: str, state_type: str) -> float | None:
    times = [ts(s["timestamp"]) for s in api.states(run_id) if s["type"] == state_type]
    return min(times) if times else None


class Bench:
    def __init__(
        self, server: PrefectServer, proxy: CountingProxy, home: Path, quick: bool, idle_minutes: float = 2.0
    ) -> None:
        self.server, self.proxy, self.home, self.quick = server, proxy, home, quick
        self.idle_minutes = idle_minutes
        self.api = Api(server)
        self.results: dict[str, dict[str, float]] = {k: {} for k in ALL_KINDS}
        self.pickups: dict[str, dict[str, list[float]]] = {k: {} for k in ALL_KINDS}
        self.stack = contextlib.ExitStack()
        """What :meth:`on_postgres` started (a PostgreSQL cluster, a server on it): closed last."""
        self.pg: Bench | None = None
        self.py_spy: Path | None = None
        """A static py-spy binary (``--profile``): flow-worker sampled during the bursts."""
        self.profiles: dict[str, str] = {}
        self.requests_by_path: dict[str, dict[str, tuple[int, int]]] = {}

    def on_postgres(self) -> Bench:
        """A second bench on a Prefect server backed by a throwaway PostgreSQL cluster (a temp
        dir, loopback; ``tests/postgres.py``, as the fleet tests use), started on first use.
        Its results go into this bench's table."""
        if self.pg is None:
            url = self.stack.enter_context(postgres.cluster())
            server = self.stack.enter_context(running_server("flow-worker-bench-pg-", database_url=url))
            self.pg = Bench(server, CountingProxy(server.port), self.home, self.quick)
            self.pg.results = self.results
            self.pg.py_spy, self.pg.profiles = self.py_spy, self.profiles
            self.pg.requests_by_path = self.requests_by_path
        return self.pg

    def pool(self, kind: str, scenario: str) -> str:
        return f"bench-{scenario}-{kind.replace(' ', '-')}-{uuid.uuid4().hex[:4]}"

    def fake_deployment(self, pool: str, sleep: float = 0.0) -> str:
        command = f"{sys.executable} {FLOWS / 'fake_engine.py'}"
        env = {"FAKE_ENGINE_API_URL": self.server.api_url, "FAKE_ENGINE_SLEEP": str(sleep)}
        return self.api.deployment(pool, job_variables={"command": command, "env": env})

    def start(self, kind: str, pool: str, **env: str) -> Worker:
        w = Worker(kind, pool, self.proxy, self.home, env)
        try:
            wait_for(
                lambda: self.proxy.first(w.started, f"/work_pools/{pool}/get_scheduled_flow_runs"),
                120,
                0.05,
                f"{kind} to poll",
            )
        except BaseException:
            w.stop()  # a failed run of the bench leaves no daemon behind
            raise
        return w

    def each(self, index: int, kinds: tuple[str, ...] = KINDS) -> tuple[str, ...]:
        return kinds if index % 2 == 0 else kinds[::-1]

    def startup_and_idle(self, kind: str) -> None:
        pool = self.pool(kind, "idle")
        self.api.create_pool_with_cli(pool)
        w = self.start(kind, pool)
        first = self.proxy.first(w.started, "get_scheduled_flow_runs")
        assert first is not None
        self.results[kind]["start → first poll (s)"] = first - w.started
        time.sleep(5)  # let start-up settle before measuring idle cost
        # one fixed window, after the first poll and the settling: RSS, CPU, and the
        # requests the idle worker sends (with its events websocket up, which is checked)
        cpu0, t0 = proc_cpu(w.proc.pid), time.monotonic()
        idle = 60 * self.idle_minutes
        rss = []
        while time.monotonic() - t0 < idle:
            rss.append(tree_rss(w.proc.pid))
            time.sleep(min(1.0, max(0.0, t0 + idle - time.monotonic())))
        t1 = t0 + idle  # the same window for both workers: equal counts give a ratio of 1
        self.results[kind]["idle RSS of the process tree (MiB)"] = statistics.median(rss) / 2**20
        self.results[kind]["idle CPU (% of a core)"] = 100 * (proc_cpu(w.proc.pid) - cpu0) / (t1 - t0)
        self.results[kind][IDLE_REQUESTS] = 60 * self.proxy.count(t0, t1) / (t1 - t0)
        self.results[kind][IDLE_SPAN] = self.idle_rate(t0, t1)
        where_to = self.proxy.breakdown(t0, until=t1)
        self.requests_by_path[f"idle, {kind}"] = where_to
        print(
            f"{kind}'s requests while idle (per minute):\n"
            + "\n".join(f"  {60 * sent / (t1 - t0):6.2f}  {p}" for p, (sent, _) in where_to.items()),
            flush=True,
        )
        stream = self.proxy.websocket_seconds("/events/out", t0, t1)
        self.results[kind][IDLE_STREAM] = 100 * stream / (t1 - t0)
        w.stop()

    def idle_rate(self, t0: float, t1: float) -> float:
        """Requests per minute in ``[t0, t1]``, a second estimate beside the count: the
        polls' rate from the span between the first and the last poll in the window (n - 1
        intervals), the other requests counted. A count of polls moves by one (about 3 % in
        5 minutes) with where the window falls in the jittered interval, for both workers
        alike; the span does not, though the jitter's draw still moves it by a few percent."""
        with self.proxy.lock:
            polls = [t for t, p in self.proxy.requests if t0 <= t <= t1 and POLL in p]
        others = self.proxy.count(t0, t1) - len(polls)
        if len(polls) >= 3:
            poll_rate = 60 * (len(polls) - 1) / (polls[-1] - polls[0])
        else:
            poll_rate = 60 * len(polls) / (t1 - t0)
        return poll_rate + 60 * others / (t1 - t0)

    def burst(self, kind: str, n: int = 50, where: str = "") -> None:
        """``n`` cheap runs created at once; ``where`` names the server in the rows (e.g.
        " on PostgreSQL"; its rows: throughput, requests and 503 answers)."""
        pool = self.pool(kind, "burst")
        dep = self.fake_deployment(pool)
        w = self.start(kind, pool)
        time.sleep(2)
        cpu0, req0 = proc_cpu(w.proc.pid), time.monotonic()
        peak = proc_rss(w.proc.pid)
        sampled = (
            spy.Recording(self.py_spy, w.proc.pid, self.home / f"burst-{kind}.txt")
            if self.py_spy is not None and kind != "prefect"
            else None
        )
        runs = [self.api.run(dep) for _ in range(n)]

        def all_running() -> bool:
            nonlocal peak
            peak = max(peak, proc_rss(w.proc.pid))
            return all(self.api.state_type(r) in ("RUNNING", "COMPLETED") for r in runs[-5:]) and all(
                self.api.state_type(r) in ("RUNNING", "COMPLETED", "CRASHED", "FAILED") for r in runs
            )

        wait_for(all_running, 600, 0.2, f"{kind}: all {n} runs started")
        created = [ts(self.api.flow_run(r)["created"]) for r in runs]
        started = [state_time(self.api, r, "RUNNING") for r in runs]
        span = max(t for t in started if t is not None) - min(created)
        final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        wait_for(lambda: all(self.api.state_type(r) in final for r in runs), 600, 0.5, f"{kind}: burst done")
        # Prefect's worker crashes a run whose label write got a 503 ("Failed to submit flow
        # run to infrastructure"): counted, not waited for
        lost = sum(self.api.state_type(r) != "COMPLETED" for r in runs)
        # what the worker still writes about the burst (labels, logs) counts too: until it
        # has sent nothing for 3 s (its idle polls come every 10 s)
        wait_for(lambda: self.proxy.quiet_for(3.0), 120, 0.2, f"{kind}: quiet after the burst")
        requests, busy = self.proxy.count(req0), self.proxy.statuses(503, req0)
        cpu = proc_cpu(w.proc.pid) - cpu0
        where_to = self.proxy.breakdown(req0)
        self.requests_by_path[f"burst of {n}{where}, {kind}"] = where_to
        print(
            f"{kind}'s requests in the burst{where} (per run; 503 answers per run):\n"
            + "\n".join(f"  {sent / n:6.2f} {busy / n:6.2f}  {p}" for p, (sent, busy) in where_to.items()),
            flush=True,
        )
        if sampled is not None:
            summary = sampled.stop()
            self.profiles[f"burst of {n}{where}, {kind}"] = summary
            print(f"where {kind}'s CPU went in the burst{where}:\n{summary}", flush=True)
        w.stop()
        self.results[kind][f"burst of {n}{where}: runs started per second"] = n / span
        self.results[kind][f"API requests per run{where}"] = requests / n
        self.results[kind][f"503 answers per run{where}"] = busy / n
        self.results[kind][f"burst of {n}{where}: runs not COMPLETED"] = lost
        ABSOLUTE[f"burst of {n}{where}: runs not COMPLETED"] = (0, "runs")
        if not where:
            self.results[kind]["worker CPU per run (ms)"] = 1000 * cpu / n
            self.results[kind]["peak RSS during the burst (MiB)"] = peak / 2**20

    def growth(self, kind: str, n: int, batch: int = 10) -> None:
        """``n`` cheap runs in a row through one worker, ``batch`` at a time (each batch done
        and its flow processes gone before the next): the worker tree's RSS at the end, and
        the worker's CPU per run over the last ``window`` runs against the first."""
        pool = self.pool(kind, "growth")
        dep = self.fake_deployment(pool)
        w = self.start(kind, pool)
        time.sleep(2)
        window = max(batch, min(100, n // 10) // batch * batch)
        final = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
        cpu = [proc_cpu(w.proc.pid)]  # after each batch
        sizes: list[int] = []
        rss_first = 0
        done = 0
        while done < n:
            runs = [self.api.run(dep) for _ in range(min(batch, n - done))]
            flt = {"flow_runs": {"id": {"any_": runs}, "state": {"type": {"any_": final}}}}
            wait_for(
                lambda f=flt, k=runs: self.api.call("POST", "flow_runs/count", f) == len(k),
                300,
                0.1,
                f"{kind}: runs {done + 1}-{done + len(runs)} of {n}",
            )
            self.settle(w)
            done += len(runs)
            sizes.append(len(runs))
            cpu.append(proc_cpu(w.proc.pid))
            if done == window:
                rss_first = tree_rss(w.proc.pid)
            if done % 100 == 0 or done == n:
                k = min(len(sizes), 10)  # the last 100 runs (10 batches)
                recent = 1000 * (cpu[-1] - cpu[-1 - k]) / sum(sizes[-k:])
                rss_now = tree_rss(w.proc.pid) / 2**20
                print(
                    f"[{time.strftime('%H:%M:%S')}]   {done} of {n} runs done; worker CPU per run over "
                    f"the last {sum(sizes[-k:])}: {recent:.1f} ms; RSS {rss_now:.1f} MiB",
                    flush=True,
                )
        time.sleep(2)
        rss_end = tree_rss(w.proc.pid)
        completed = self.api.call(
            "POST",
            "flow_runs/count",
            {"flow_runs": {"deployment_id": {"any_": [dep]}, "state": {"type": {"any_": ["COMPLETED"]}}}},
        )
        w.stop()
        per_batch = [b - a for a, b in itertools.pairwise(cpu)]
        k = window // batch
        n_first, n_last = sum(sizes[:k]), sum(sizes[-k:])  # a short last batch: a few runs fewer
        first, last = sum(per_batch[:k]) / n_first, sum(per_batch[-k:]) / n_last
        label = f"{n:,} runs in a row"
        r = self.results[kind]
        r[f"{label}: runs not COMPLETED"] = n - int(completed)
        r[f"{label}: worker RSS after the first {window} (MiB)"] = rss_first / 2**20
        r[f"{label}: worker RSS at the end (MiB)"] = rss_end / 2**20
        r[f"{label}: worker CPU per run, first {n_first} (ms)"] = 1000 * first
        r[f"{label}: worker CPU per run, last {n_last} (ms)"] = 1000 * last
        ratio = f"{label}: worker CPU per run, last {n_last} / first {n_first}"
        r[ratio] = last / first if first else float("nan")
        ABSOLUTE[f"{label}: worker RSS at the end (MiB)"] = (60.0, "MiB")
        BAND[ratio] = (0.9, 1.1)

    def pickup(self, kind: str, label: str, n: int, gap: float, **env: str) -> None:
        pool = self.pool(kind, "pickup")
        dep = self.fake_deployment(pool)
        w = self.start(kind, pool, **env)
        time.sleep(3)
        rng = random.Random(42)
        runs = []
        for _ in range(n):
            time.sleep(rng.uniform(0, gap))
            runs.append(self.api.run(dep))
        wait_for(
            lambda: all(self.api.state_type(r) == "COMPLETED" for r in runs), 300, 0.5, f"{kind}: pickups"
        )
        w.stop()
        latencies = []
        for r in runs:
            pending = state_time(self.api, r, "PENDING")
            assert pending is not None
            latencies.append(pending - ts(self.api.flow_run(r)["created"]))
        latencies.sort()
        self.pickups[kind][label] = latencies
        self.results[kind][f"pickup p50, {label} (s)"] = statistics.median(latencies)
        self.results[kind][f"pickup p95, {label} (s)"] = latencies[
            min(len(latencies) - 1, int(0.95 * len(latencies)))
        ]

    def outage(self, kind: str, seconds: float, n: int) -> None:
        """Default intervals (poll every 10 s). The API is cut off for ``seconds`` (the
        proxy refuses connections, as a stopped server's port does), then a run is created
        the moment it answers again: created → PENDING, median of ``n`` outages. And a
        worker started while the API is cut off: the API's return → the worker's first
        heartbeat that gets through (registered)."""
        pool = self.pool(kind, "outage")
        dep = self.fake_deployment(pool)
        w = self.start(kind, pool)
        pickups = []
        for _ in range(n):
            time.sleep(3)
            self.proxy.cut()
            time.sleep(seconds)
            self.proxy.restore()
            run = self.api.run(dep)
            wait_for(lambda r=run: self.api.state_type(r) == "COMPLETED", 120, 0.2, f"{kind}: outage run")
            pending = state_time(self.api, run, "PENDING")
            assert pending is not None
            pickups.append(pending - ts(self.api.flow_run(run)["created"]))
        w.stop()
        self.results[kind][f"pickup after a {seconds:g} s API outage (s)"] = statistics.median(pickups)

        pool = self.pool(kind, "late-api")
        self.api.create_pool_with_cli(pool)
        self.proxy.cut()
        late = Worker(kind, pool, self.proxy, self.home, {})
        try:
            time.sleep(15)
            self.proxy.restore()
            back = time.monotonic()
            heartbeat = f"/work_pools/{pool}/workers/heartbeat"
            # a worker that gave up (exited) while the API was away never registers: NaN
            registered = wait_for(
                lambda: self.proxy.first(back, heartbeat) or (late.proc.poll() is not None and math.nan),
                120,
                0.05,
                f"{kind} to register",
            )
        finally:
            late.stop()
        self.results[kind][LATE_START] = registered - back

    def resume(self, kind: str, n: int, rounds: int) -> None:
        """Default intervals (poll every 10 s). The pool's queue is paused, ``n`` runs are
        created in it, and 3 s later (the worker has seen them, or polled, and taken
        nothing) it is resumed: resume → the last of them PENDING, median of ``rounds``."""
        pool = self.pool(kind, "resume")
        dep = self.fake_deployment(pool)
        queue = self.api.call("GET", f"work_pools/{pool}/queues/default")
        w = self.start(kind, pool)
        spans = []
        for _ in range(rounds):
            self.api.call("PATCH", f"work_queues/{queue['id']}", {"is_paused": True})
            runs = [self.api.run(dep) for _ in range(n)]
            time.sleep(3)
            resumed = time.time()
            self.api.call("PATCH", f"work_queues/{queue['id']}", {"is_paused": False})
            wait_for(
                lambda rs=runs: all(self.api.state_type(r) == "COMPLETED" for r in rs),
                120,
                0.2,
                f"{kind}: resumed",
            )
            claimed = [state_time(self.api, r, "PENDING") for r in runs]
            spans.append(max(t for t in claimed if t is not None) - resumed)
        w.stop()
        self.results[kind][RESUME] = statistics.median(spans)

    def cancel(self, kind: str, n: int) -> None:
        pool = self.pool(kind, "cancel")
        dep = self.api.deployment(pool, entrypoint="hello.py:cancellable", flow_name="cancellable")
        w = self.start(kind, pool)
        to_gone, to_cancelled = [], []
        for _ in range(n):
            run = self.api.run(dep, {"sleep": 300})
            wait_for(lambda r=run: self.api.state_type(r) == "RUNNING", 120, 0.2, "RUNNING")
            pid = int(wait_for(lambda r=run: self.api.flow_run(r)["infrastructure_pid"], 30, 0.2, "pid"))
            time.sleep(1)
            t0 = time.time()
            self.api.call(
                "POST",
                f"flow_runs/{run}/set_state",
                {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
            )
            wait_for(
                lambda p=pid: (
                    not Path(f"/proc/{p}").exists()
                    or Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                ),
                120,
                0.02,
                "gone",
            )
            to_gone.append(time.time() - t0)
            wait_for(lambda r=run: self.api.state_type(r) == "CANCELLED", 300, 0.1, "CANCELLED")
            cancelled = state_time(self.api, run, "CANCELLED")
            assert cancelled is not None
            to_cancelled.append(cancelled - t0)
        w.stop()
        self.results[kind]["CANCELLING → process gone (s)"] = statistics.median(to_gone)
        self.results[kind]["CANCELLING → CANCELLED (s)"] = statistics.median(to_cancelled)

    def real_flow(self, kind: str, n: int) -> None:
        """Real flows one at a time: latency, and the worker tree's CPU per flow. The first
        run is left out of both (it pays a warm worker's one-time preload; said apart)."""
        pool = self.pool(kind, "real")
        dep = self.api.deployment(pool)
        w = self.start(kind, pool)
        times, cpu_marks = [], []
        for i in range(n):
            run = self.api.run(dep, {"name": f"bench{i}"})
            wait_for(lambda r=run: self.api.state_type(r) == "COMPLETED", 180, 0.2, "COMPLETED")
            completed, pending = state_time(self.api, run, "COMPLETED"), state_time(self.api, run, "PENDING")
            assert completed is not None and pending is not None
            times.append(completed - pending)
            self.settle(w)
            cpu_marks.append(tree_cpu(w.proc.pid))
        w.stop()
        self.results[kind]["real flow: PENDING → COMPLETED, first run (s)"] = times[0]
        self.results[kind]["real flow: PENDING → COMPLETED (s)"] = statistics.median(times[1:])
        self.results[kind]["worker host CPU per real flow (s)"] = (cpu_marks[-1] - cpu_marks[0]) / (n - 1)

    def settle(self, w: Worker) -> None:
        """Wait until the worker's tree holds no flow process (the engine exits a moment
        after it reports COMPLETED): only the worker and an engine server are left."""

        def flows_left() -> bool:
            return len(tree(w.proc.pid)) <= (2 if w.kind == WARM else 1)

        wait_for(flows_left, 60, 0.05, "flow processes to exit")

    def sleeping(self, kind: str, n: int) -> None:
        """``n`` real flows sleeping at once: the proportional set size of the worker's tree."""
        pool = self.pool(kind, "sleeping")
        dep = self.api.deployment(pool)
        w = self.start(kind, pool)
        runs = [self.api.run(dep, {"name": f"sleeper{i}", "sleep": 45.0}) for i in range(n)]
        wait_for(lambda: all(self.api.state_type(r) == "RUNNING" for r in runs), 300, 0.5, "all RUNNING")
        time.sleep(3)  # the engines are in the flow's sleep now
        samples = [tree_pss(w.proc.pid)]
        for _ in range(4):
            time.sleep(1)
            samples.append(tree_pss(w.proc.pid))
        self.results[kind][f"{n} sleeping real flows: PSS of the worker's tree (MiB)"] = (
            statistics.median(samples) / 2**20
        )
        wait_for(lambda: all(self.api.state_type(r) == "COMPLETED" for r in runs), 300, 0.5, "all done")
        w.stop()


GOALS: dict[str, tuple[str, float]] = {
    # issue 22: fast with every feature on
    "idle RSS of the process tree (MiB)": ("<=", 0.45),
    "start → first poll (s)": ("<=", 0.2),
    IDLE_REQUESTS: ("<=", 1.0),
    "API requests per run": ("<=", 0.5),
    "503 answers per run": ("<=", 0.5),
    "worker CPU per run (ms)": ("<=", 0.2),
    "burst of 50: runs started per second": (">=", 3.5),
    "CANCELLING → CANCELLED (s)": ("<=", 0.5),
}
WARM_GOALS: dict[str, float] = {
    # warm / cold, both flow-worker (issue 13)
    "real flow: PENDING → COMPLETED (s)": 0.6,
    "worker host CPU per real flow (s)": 0.5,
    "10 sleeping real flows: PSS of the worker's tree (MiB)": 0.6,
}
ABSOLUTE: dict[str, tuple[float, str]] = {
    "pickup p50, default settings (s)": (0.15, "s"),
    "pickup p95, default settings (s)": (0.5, "s"),
    # issue 8: within 2 s of the API answering again
    "pickup after a 30 s API outage (s)": (2.0, "s"),
    LATE_START: (2.0, "s"),
    # issue 10: a resumed queue's runs start within 1 s
    RESUME: (1.0, "s"),
    # issue 22's 1,000 runs in a row: Bench.growth adds its RSS row (the name holds the count)
}
BAND: dict[str, tuple[float, float]] = {}
"""flow-worker's own value within [low, high]: Bench.growth adds its CPU-per-run ratio
(issue 22: the last 100 runs within 10 % of the first 100)."""


def table(bench: Bench, meta: str) -> str:
    rows = [
        "| metric | flow-worker | flow-worker warm | prefect | ratio fw/prefect | ratio warm/cold "
        "| goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for metric in bench.results["flow-worker"]:
        fw, pf = bench.results["flow-worker"][metric], bench.results["prefect"].get(metric, nan)
        warm = bench.results[WARM].get(metric, nan)
        ratio = fw / pf if pf else (nan if fw == 0 or pf != pf else math.inf)
        if metric in NO_RATIO:
            ratio = nan
        warm_ratio = warm / fw if fw else nan
        goals, mets = [], []
        if metric in GOALS:
            op, bound = GOALS[metric]
            goals.append(f"ratio {op} {bound}")
            # none on either side (e.g. no 503 answers) meets an upper bound
            met = (ratio <= bound or fw == pf == 0) if op == "<=" else ratio >= bound
            mets.append("yes" if met else "NO")
        if metric in WARM_GOALS:
            goals.append(f"warm/cold <= {WARM_GOALS[metric]}")
            mets.append("yes" if warm_ratio <= WARM_GOALS[metric] else "NO")
        if metric in ABSOLUTE:
            bound, unit = ABSOLUTE[metric]
            goals.append(f"flow-worker <= {bound:g} {unit}")
            mets.append("yes" if fw <= bound else "NO")
        if metric in BAND:
            low, high = BAND[metric]
            goals.append(f"flow-worker in [{low:g}, {high:g}]")
            mets.append("yes" if low <= fw <= high else "NO")

        def cell(v: float) -> str:
            return "" if v != v else f"{v:.3g}"  # NaN: not measured

        rows.append(
            f"| {metric} | {cell(fw)} | {cell(warm)} | {cell(pf)} | {cell(ratio)} | {cell(warm_ratio)} "
            f"| {'; '.join(goals)} | {'; '.join(mets)} |"
        )
    return meta + "\n\n" + "\n".join(rows) + "\n"


def plot(bench: Bench, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(bench.pickups["flow-worker"])
    fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for kind in KINDS:
            data = bench.pickups[kind].get(label, [])
            if data:
                ax.step(data, [(i + 1) / len(data) for i in range(len(data))], where="post", label=kind)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("pickup latency: created → PENDING (s)")
        ax.set_ylabel("fraction of runs")
        ax.set_title(f"pickup latency, {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO[,...]",
        help="run only the scenarios whose name contains one of these (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--growth",
        type=int,
        default=None,
        metavar="N",
        help="runs in the 'runs in a row' scenario (default 1000; 100 with --quick)",
    )
    parser.add_argument(
        "--idle-minutes",
        type=float,
        default=None,
        metavar="M",
        help="the idle window of 'start-up and idle' (default 5, which holds one look of a lone "
        "flow-worker at its pool, every reclaim_after = 300 s; 0.5 with --quick)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        metavar="DIR",
        help="where the results go (default bench/results; a scratch dir keeps smoke runs out of it)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="PY_SPY",
        help="a static py-spy binary (the py-spy wheel's): sample flow-worker during the bursts; "
        "the summaries go to DIR/burst-profile.md",
    )
    args = parser.parse_args()
    if args.growth is not None and args.growth < 20:
        parser.error("--growth takes 20 runs at least (two windows of 10)")
    only = [o.strip() for arg in args.only for o in arg.split(",") if o.strip()]
    growth = args.growth if args.growth is not None else (100 if args.quick else 1000)
    idle_minutes = args.idle_minutes if args.idle_minutes is not None else (0.5 if args.quick else 5.0)
    home = Path(tempfile.mkdtemp(prefix="flow-worker-bench-"))
    server = PrefectServer(home)
    print(f"starting a Prefect server ({server.api_url}) ...", flush=True)
    server.start()
    proxy = CountingProxy(server.port)
    bench = Bench(server, proxy, home, args.quick, idle_minutes)
    bench.py_spy = args.profile
    n_pick = 8 if args.quick else 20
    n_burst = 20 if args.quick else 50
    steps: list[tuple[str, Callable[[str], None], tuple[str, ...]]] = [
        ("start-up and idle", bench.startup_and_idle, KINDS),
        ("burst of 50 cheap runs", lambda k: bench.burst(k, n_burst), KINDS),
        ("PostgreSQL burst", lambda k: bench.on_postgres().burst(k, n_burst, ON_PG), KINDS),
        ("pickup, default settings", lambda k: bench.pickup(k, "default settings", n_pick, 3.0), KINDS),
        (
            "pickup, query interval 1 s",
            lambda k: bench.pickup(k, "query interval 1 s", n_pick, 2.0, PREFECT_WORKER_QUERY_SECONDS="1"),
            KINDS,
        ),
        ("cancel latency", lambda k: bench.cancel(k, 2 if args.quick else 3), KINDS),
        ("API outage", lambda k: bench.outage(k, 30.0, 1 if args.quick else 3), KINDS),
        ("queue resume", lambda k: bench.resume(k, 5, 1 if args.quick else 3), KINDS),
        ("real flow", lambda k: bench.real_flow(k, 4 if args.quick else 6), ALL_KINDS),
        ("sleeping real flows", lambda k: bench.sleeping(k, 10), ALL_KINDS),
        ("growth: runs in a row", lambda k: bench.growth(k, growth), ("flow-worker",)),
    ]
    steps = [s for s in steps if not only or any(o in s[0] for o in only)]
    try:
        for index, (name, step, kinds) in enumerate(steps):
            for kind in bench.each(index, kinds):
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {kind}", flush=True)
                step(kind)
    finally:
        bench.stack.close()  # the PostgreSQL-backed server and its cluster, if started
        server.stop()
    versions = subprocess.run(
        [str(BIN / "prefect"), "--version"], capture_output=True, text=True
    ).stdout.strip()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    pg_bin = postgres.bin_dir()
    on_pg = f"; rows '{ON_PG.strip()}' on PostgreSQL {pg_bin.parts[-2]}" if bench.pg and pg_bin else ""
    meta = (
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}, Prefect {versions} (server on SQLite{on_pg}), "
        f"flow-worker {__import__('worker').__version__}{' (quick run)' if args.quick else ''}."
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if only:
        meta += f" Only the scenarios matching {only}."
    text = table(bench, meta)
    stem = "latest" if not only else "latest-partial"  # a partial run keeps the full table
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "results": bench.results,
                "pickups": bench.pickups,
                "requests_by_path": bench.requests_by_path,
            },
            indent=1,
        )
    )
    if bench.profiles:
        (out / "burst-profile.md").write_text(
            meta
            + "\n\nflow-worker sampled by py-spy (--nonblocking, 50 Hz) from the burst's first run "
            + "created to its last COMPLETED: the frames most often on the stack, then on its top.\n"
            + "".join(f"\n## {name}\n\n```\n{summary}\n```\n" for name, summary in bench.profiles.items())
        )
    if bench.pickups["flow-worker"]:
        plot(bench, out / "pickup.png")
    print("\n" + text)
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
