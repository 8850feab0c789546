"""Warm engine starts against the real server, with real flows (issue 13).

The rest of the end-to-end suite runs both ways (``scripts/test`` runs it again with
``FLOW_WORKER_TEST_ENGINE_START=warm``); these tests are about what only the warm path
has: the same process from inside as a cold start, runs that outlive their engine
server, and the fallbacks to a cold start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Final

from tests.conftest import FLOWS, Api, PrefectServer, WorkerProcess, flow_worker, wait_for


def events_of(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


def run_logs(api: Api, run_id: str) -> list[str]:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
    return [str(entry["message"]) for entry in api.call("POST", "logs/filter", body)]


def test_a_deployments_logging_level_and_pythonpath_reach_the_run_warm_as_cold(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "warm_probe_module.py").write_text('VALUE = "from PYTHONPATH"\n')
    env = {"PREFECT_LOGGING_LEVEL": "DEBUG", "PYTHONPATH": str(probe_dir), "FOO": "bar"}
    dep = api.deployment(
        pool_name, entrypoint="hello.py:introspect", flow_name="introspect", job_variables={"env": env}
    )
    records: dict[str, dict[str, Any]] = {}
    for mode, warm in (("cold", "false"), ("warm", "true")):
        out = tmp_path / f"{mode}.json"
        run_id = api.run(dep, {"out": str(out)})
        proc = flow_worker(
            prefect_server,
            "--pool",
            pool_name,
            "--once",
            FLOW_WORKER_WARM_START=warm,
            FLOW_WORKER_LOG_FORMAT="json",
            FLOW_WORKER_STATE_DIR=str(tmp_path / f"state-{mode}"),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert api.state_type(run_id) == "COMPLETED", proc.stderr[-3000:]
        started = next(e for e in events_of(proc) if e["event"] == "run.started")
        assert started["start"] == mode
        records[mode] = json.loads(out.read_text())
        assert any("a debug line from the introspect flow" in m for m in run_logs(api, run_id)), (
            f"{mode}: the DEBUG line reached the run's logs"
        )
    cold, warm_ = records["cold"], records["warm"]
    print(json.dumps(records, indent=1))
    for record in (cold, warm_):  # PYTHONPATH as Prefect 3.9.1 sets it: the flow's directory first
        assert record["env"] == {**env, "PYTHONPATH": os.pathsep.join([str(FLOWS), str(probe_dir)])}
        assert record["probe"] == "from PYTHONPATH"
        assert record["settings_logging_level"] == "DEBUG"
        assert record["prefect_logger_level"] == 10
        assert record["run_logger_effective_level"] == 10
        assert record["session_leader"] and record["group_leader"]
        assert record["stdin"] == "/dev/null"

    # each process starts in a temporary directory of its own (python -m's sys.path[0], after
    # which the pull step's directory is inserted); otherwise the paths are equal
    def path(record: dict[str, Any]) -> list[str]:
        return ["<start>" if Path(p).name.startswith("flow-worker-") else p for p in record["sys_path"]]

    assert path(cold) == path(warm_)
    start = path(cold).index("<start>")
    assert path(cold)[start + 1 : start + 3] == [str(FLOWS), str(probe_dir)], "PYTHONPATH after the start"
    assert (cold["argv"], cold["main"]) == (warm_["argv"], warm_["main"])


def _venv_with_prefect(where: Path) -> Path:
    """A venv whose own site-packages (empty but for a .pth pointing at this venv's) is a
    ``sys.path`` entry of its own: touching it makes only its engine server stale."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(where)], check=True)  # type: ignore[attr-defined]
    site = where / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "flow_worker_test.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin" / "python"


def test_runs_outlive_their_engine_server_and_fallbacks_start_cold(
    prefect_server: PrefectServer,
    api: Api,
    pool_name: str,
    tmp_path: Path,
    start_worker: Any,
) -> None:
    python = _venv_with_prefect(tmp_path / "venv")
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    dep = api.deployment(pool_name)
    # the engine, but not exactly `<python> -m prefect.engine`: cold
    custom = api.deployment(pool_name, job_variables={"command": f"{python} -u -m prefect.engine"})
    worker: WorkerProcess = start_worker(
        "--pool",
        pool_name,
        FLOW_WORKER_WARM_START="true",
        FLOW_WORKER_PYTHON=str(python),
        FLOW_WORKER_QUERY_SECONDS="1",
    )

    def seen(event: str, run_id: str) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: next(
                    (
                        e
                        for e in worker.events()
                        if e.get("event") == event and e.get("flow_run_id") == run_id
                    ),
                    None,
                ),
                120,
                what=f"{event} of run {run_id}",
            )
        )

    def started(run_id: str) -> dict[str, Any]:
        return seen("run.started", run_id)

    # three sleeping runs forked from one server, which is then killed: all still COMPLETED
    sleepers = [api.run(dep, {"name": f"s{i}", "sleep": 8}) for i in range(3)]
    assert all(started(r)["start"] == "warm" for r in sleepers)
    ready = [e for e in worker.events() if e.get("event") == "warm_start.ready"]
    assert len(ready) == 1, "one engine server for one interpreter"
    os.kill(ready[0]["pid"], signal.SIGKILL)
    for run_id in sleepers:
        assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED"
        assert seen("run.exited", run_id)["returncode"] == 0, "the true exit status, read by the worker"

    def cold_then_warm_again(name: str, servers: int) -> None:
        """A run now starts cold; once the ``servers``-th server is ready, runs are warm."""
        cold = api.run(dep, {"name": name})
        assert started(cold)["start"] == "cold"
        assert api.wait_final(cold, 120)["state_type"] == "COMPLETED"
        wait_for(
            lambda: len([e for e in worker.events() if e.get("event") == "warm_start.ready"]) == servers,
            120,
            what=f"engine server number {servers}",
        )
        warm = api.run(dep, {"name": f"{name}-then-warm"})
        assert started(warm)["start"] == "warm"
        assert api.wait_final(warm, 120)["state_type"] == "COMPLETED"

    # the server is dead: the next run starts cold (the reason said once), later ones warm
    cold_then_warm_again("after-death", 2)
    # site-packages changed (an install): that run cold, then warm again from a fresh server
    os.utime(site)
    cold_then_warm_again("stale", 3)

    # a custom command always starts cold, said once however many runs
    customs = [api.run(custom) for _ in range(2)]
    for run_id in customs:
        assert started(run_id)["start"] == "cold"
        assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED"
    reasons = [e["reason"] for e in worker.events() if e.get("event") == "warm_start.cold"]
    assert reasons.count("the run's command is not `<python> -m prefect.engine`") == 1
    assert any("exited" in r for r in reasons), reasons
    assert any(r.startswith("stale") for r in reasons), reasons
    assert worker.stop() == 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "venv")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "the engine server ends with the worker"


TZ_RUNS: Final = 30
"""Runs of the engine-server cap test, each with a TZ of its own (a start key of its own)."""
TZ_LIMIT: Final = 6
"""The worker's ``--limit`` there: above the cap, so first runs of new keys sometimes find
every server busy preloading (cold, said once), and most find an idle one to retire."""


class ServerCensus(threading.Thread):
    """Samples, every 20 ms, how many engine servers of a worker are alive: the pids its
    log announced (``warm_start.starting``, written as each is spawned) that are still the
    worker's children running the engine server, not zombies. (A command line alone cannot
    tell: a run forked from a server shows the server's.)"""

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.pids: list[int] = []
        self.most = 0
        self.samples = 0
        self.done = threading.Event()
        self._offset = 0
        self._partial = b""

    def _read_log(self) -> None:
        with self.worker.log_path.open("rb") as f:
            f.seek(self._offset)
            data = self._partial + f.read()
        self._offset += len(data) - len(self._partial)
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if b'"warm_start.starting"' in line:
                self.pids.append(int(json.loads(line)["pid"]))

    def alive(self) -> list[int]:
        found = []
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z" and int(ppid) == self.worker.proc.pid and b"engine_server.py" in cmdline:
                found.append(pid)
        return found

    def zombies(self) -> list[int]:
        out = []
        for pid in self.pids:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    out.append(pid)
            except OSError:
                continue
        return out

    def run(self) -> None:
        while not self.done.is_set():
            self._read_log()
            self.most = max(self.most, len(self.alive()))
            self.samples += 1
            time.sleep(0.02)


def test_thirty_time_zones_never_make_more_engine_servers_than_the_cap(
    prefect_server: PrefectServer, api: Api, pool_name: str, start_worker: Any
) -> None:
    """Issue 19: a run per TZ value used to leave a preloaded server per value. Now at most
    ``MAX_SERVERS`` are alive at any time: the least recently used idle one is retired
    (by EOF, reaped) to make room, or the run starts cold; runs forked from a retired
    server go on, and every run completes."""
    from worker.process.warm import MAX_SERVERS

    zones = [f"Etc/GMT+{i}" for i in range(12)] + [f"Etc/GMT-{i}" for i in range(1, 15)]
    zones += ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]
    assert len(set(zones[:TZ_RUNS])) == TZ_RUNS
    dep = api.deployment(pool_name)
    runs = {
        api.run(dep, {"name": f"tz{i}", "sleep": 2}, {"env": {"TZ": zone}}): zone
        for i, zone in enumerate(zones[:TZ_RUNS])
    }
    began = time.monotonic()
    worker: WorkerProcess = start_worker(
        "--pool",
        pool_name,
        "--limit",
        str(TZ_LIMIT),
        FLOW_WORKER_WARM_START="true",
        FLOW_WORKER_QUERY_SECONDS="1",
    )
    census = ServerCensus(worker)
    census.start()
    try:
        finals = {run_id: api.wait_final(run_id, 600)["state_type"] for run_id in runs}
    finally:
        census.done.set()
        census.join()
    took = time.monotonic() - began
    events = worker.events()
    retired = [e for e in events if e.get("event") == "warm_start.retired"]
    started = [e for e in events if e.get("event") == "run.started"]
    cold = [e["reason"] for e in events if e.get("event") == "warm_start.cold"]
    print(
        f"{TZ_RUNS} runs in {took:.0f} s; servers started {len(census.pids)}, retired {len(retired)}, "
        f"most alive {census.most} ({census.samples} samples); warm runs "
        f"{sum(e['start'] == 'warm' for e in started)}; said cold: {cold}"
    )
    assert set(finals.values()) == {"COMPLETED"}, finals
    assert [e for e in events if e.get("level") in ("error", "critical")] == []
    assert len(started) == TZ_RUNS, "each run started once"
    assert 1 <= census.most <= MAX_SERVERS, f"{census.most} engine servers alive at once"
    assert census.samples > 100
    assert len(census.pids) > MAX_SERVERS and len(retired) >= len(census.pids) - MAX_SERVERS, (
        "servers were retired to make room for later keys"
    )
    assert sum(e["start"] == "warm" for e in started) > MAX_SERVERS, (
        "later keys forked warm, from new servers"
    )
    assert cold.count(f"engine server cap reached ({MAX_SERVERS})") <= 1, "said once"
    assert census.zombies() == [], "retired servers are reaped"
    assert len(census.alive()) <= MAX_SERVERS
    assert all(r["reason"].startswith("least recently used") for r in retired), retired
    assert worker.stop() == 0
    assert census.alive() == [] and census.zombies() == []
