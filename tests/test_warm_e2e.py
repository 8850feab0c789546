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
from pathlib import Path
from typing import Any

from tests.conftest import Api, PrefectServer, WorkerProcess, flow_worker, wait_for


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
    for record in (cold, warm_):
        assert record["env"] == env
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
    assert path(cold)[start + 1] == str(probe_dir), "PYTHONPATH right after the start directory"
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
