"""A run is the unit of failure (issue 19): what one run brings costs that run, never the
daemon or the runs beside it. Real Prefect 3.9.1 server, real flows, the daemon as a daemon.

* Job variables the OS refuses: each run CRASHED naming the variable, once.
* A bug met while handling one run (an exception injected into its task): that run
  CRASHED "internal error", the others untouched, the worker serves on.
* Descriptors: ``ulimit -n 64`` with 40 runs due: runs that could not start run later.
* Disk: the state directory on a small tmpfs that fills up (root): runs stay SCHEDULED
  with a clear WARNING, and all run once there is room again.
"""

from __future__ import annotations

import collections
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import FLOWS, Api, PrefectServer, WorkerProcess, wait_for
from worker.books.ledger import Ledger
from worker.host import settings as settings_mod
from worker.prefect.api import PrefectClient
from worker.runs.run import Runner
from worker.service.supervisor import Supervisor

FAST = {
    "FLOW_WORKER_QUERY_SECONDS": "1",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "1",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "5",
}
FAKE_ENGINE = f"{sys.executable} {FLOWS / 'fake_engine.py'}"


def claims(worker: WorkerProcess) -> collections.Counter[str]:
    return collections.Counter(e["flow_run_id"] for e in worker.events() if e.get("event") == "run.claimed")


def pendings(api: Api, run_id: str) -> int:
    return sum(1 for s in api.states(run_id) if s["type"] == "PENDING")


def loose_env_pool(api: Api, pool: str) -> None:
    """A pool whose ``env`` variable has no value type, as a customised template may have:
    the server then stores any JSON in a run's ``env`` (a list, an object)."""
    api.create_pool_with_cli(pool)
    template = api.call("GET", f"work_pools/{pool}")["base_job_template"]
    template["variables"]["properties"]["env"] = {"title": "Environment Variables", "type": "object"}
    api.call("PATCH", f"work_pools/{pool}", {"base_job_template": template})


def test_bad_job_variables_crash_their_own_runs_and_nothing_else(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    loose_env_pool(api, pool_name)
    worker = start_worker("--pool", pool_name, **FAST)
    good = api.deployment(pool_name)
    beside = api.run(good, {"name": "beside", "sleep": 8})
    cases = [
        ({"env": {"A=B": "1"}}, "'env.A=B': a variable name cannot contain '='"),
        ({"env": {"": "1"}}, "has an empty variable name"),
        ({"env": {"X": "a\u0000b"}}, "'env.X': the value contains a NUL character"),
        ({"command": "true\u0000"}, "'command' contains a NUL character"),
        ({"working_dir": "/tmp/a\u0000b"}, "'working_dir' contains a NUL character"),
        ({"env": {"X": ["a", "b"]}}, "'env.X' must be a string or null, got list"),
        ({"env": {"X": "v" * (1024 * 1024)}}, "'env.X' is 1048579 bytes"),
    ]
    bad = {
        api.run(api.deployment(pool_name, job_variables=variables)): expected for variables, expected in cases
    }
    for run_id, expected in bad.items():
        final = api.wait_final(run_id, 90)
        assert final["state_type"] == "CRASHED", (expected, final["state"])
        assert expected in final["state"]["message"], final["state"]["message"]
        assert len(final["state"]["message"]) < 1000, "the variable is named, its value not echoed"
    assert api.wait_final(beside, 120)["state_type"] == "COMPLETED"
    after = api.run(good, {"name": "after"})
    assert api.wait_final(after, 120)["state_type"] == "COMPLETED"
    assert worker.proc.poll() is None, "the daemon must keep running"
    counted = claims(worker)
    for run_id in [*bad, beside, after]:
        assert counted[run_id] == 1 and pendings(api, run_id) == 1, f"run {run_id} claimed more than once"
    assert not any("Traceback" in str(e) for e in worker.events())


@pytest.mark.no_engine_run
async def test_a_bug_in_one_runs_task_crashes_that_run_only(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor in this process against the real server, with one run's task made
    to raise (the seam: ``Runner.configure``, patched to fail for one run's name)."""
    good = api.deployment(pool_name, job_variables={"command": FAKE_ENGINE})
    doomed = api.run(good, {"name": "doomed"})
    neighbours = [api.run(good, {"name": f"n{i}"}) for i in range(3)]
    configure = Runner.configure

    async def faulty(self: Runner, flow_run: Any, deployment: Any) -> Any:
        if flow_run.id == doomed:
            raise KeyError("injected fault")
        return await configure(self, flow_run, deployment)

    monkeypatch.setattr(Runner, "configure", faulty)
    settings = settings_mod.validated(
        settings_mod.load(
            {"pool": pool_name, "state_dir": str(tmp_path / "state"), "events": False},
            environ={**prefect_server.env, **FAST},
        )
    )
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    client = PrefectClient.from_settings(settings)
    supervisor = Supervisor(settings, client, ledger)

    async def until(states: dict[str, str], timeout: float) -> None:
        seen = lambda: {r: api.state_type(r) for r in states}  # noqa: E731
        with trio.fail_after(timeout):
            while await trio.to_thread.run_sync(seen) != states:
                await trio.sleep(0.5)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run, False)
            await until({doomed: "CRASHED", **dict.fromkeys(neighbours, "COMPLETED")}, 120)
            # serving on: a run created now still runs, and the doomed one is not taken again
            later = await trio.to_thread.run_sync(lambda: api.run(good, {"name": "later"}))
            await until({later: "COMPLETED"}, 60)
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        ledger.close()
    final = api.flow_run(doomed)
    assert final["state"]["message"].startswith("Flow run could not be supervised: internal error")
    assert "KeyError: 'injected fault'" in final["state"]["message"]
    assert [api.state_type(r) for r in neighbours] == ["COMPLETED"] * 3
    assert pendings(api, doomed) == 1, "a run that met a bug is not claimed again"
    assert doomed in supervisor.runner.faults.shunned
    assert supervisor.metrics.runs_internal_errors == 1


@pytest.mark.no_engine_run
def test_forty_runs_due_with_64_descriptors_all_run(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """``ulimit -n 64`` (soft and hard): starting 40 runs at once runs out of descriptors.
    No exit; a run that could not start is not CRASHED but returned to the queue, and runs
    later; every run COMPLETED (the fake engine reports it), each once."""
    ran = tmp_path / "ran"
    env = {"FAKE_ENGINE_LOG": str(ran), "FAKE_ENGINE_SLEEP": "10"}  # all 40 overlap
    dep = api.deployment(pool_name, job_variables={"command": FAKE_ENGINE, "env": env})
    worker = start_worker("--pool", pool_name, **FAST, FLOW_WORKER_MEMORY_RESERVE="0")
    wait_for(lambda: worker.saw("worker.synced"), 60, what="the worker to sync")
    # as `ulimit -n 64` would have it (the worker's start-up raises only a soft limit)
    resource.prlimit(worker.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    runs = [api.run(dep) for _ in range(40)]
    for run_id in runs:
        assert api.wait_final(run_id, 300)["state_type"] == "COMPLETED"
    assert worker.proc.poll() is None, "the daemon must keep running"
    executions = collections.Counter(line.split()[0] for line in ran.read_text().splitlines())
    assert set(executions) == set(runs) and set(executions.values()) == {1}, "each run executed once"
    said = [e for e in worker.events() if e.get("event") == "host.short"]
    assert 1 <= len(said) <= 2, f"running short is said once per episode, not per run: {said}"


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="flow-worker-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.no_engine_run
def test_a_full_state_directory_delays_runs_and_loses_none(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], small_tmpfs: Path, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    dep = api.deployment(
        pool_name, job_variables={"command": FAKE_ENGINE, "env": {"FAKE_ENGINE_LOG": str(ran)}}
    )
    state = small_tmpfs / "state"
    worker = start_worker("--pool", pool_name, **FAST, FLOW_WORKER_STATE_DIR=str(state))
    wait_for(lambda: worker.saw("worker.synced"), 60, what="the worker to sync")
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill it to the last block
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    runs = [api.run(dep) for _ in range(5)]
    wait_for(lambda: worker.saw("host.short"), 60, what="the worker to say the disk is full")
    assert all(api.state_type(r) == "SCHEDULED" for r in runs), [api.state_type(r) for r in runs]
    assert worker.proc.poll() is None
    short = next(e for e in worker.events() if e.get("event") == "host.short")
    assert short["level"] == "warning" and "no space left on device" in short["short"]
    filler.unlink()
    for run_id in runs:
        assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED"
    executions = collections.Counter(line.split()[0] for line in ran.read_text().splitlines())
    assert set(executions) == set(runs) and set(executions.values()) == {1}
    said = [e for e in worker.events() if e.get("event") == "host.short"]
    assert len(said) == 1, "one WARNING for the episode, not one per run or poll"
    assert not any("Traceback" in str(e) for e in worker.events())
