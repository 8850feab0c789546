"""Side by side with Prefect's own worker: what each leaves on the server about its runs.

One real flow and one `exit 3` command, run once by `prefect worker start --type process
--run-once` and once by `flow-worker --run-once` (each on its own pool of the same server).
For each run, nothing Prefect's worker leaves (labels, its log lines in the run's logs,
`prefect.worker.*` events and their related resources) may be missing from flow-worker's.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import BIN, Api, PrefectServer, flow_worker, wait_for
from worker.prefect.ui import slug

KINDS = {
    "submitting": re.compile(r"^Worker '.+' submitting flow run '[0-9a-f-]+'"),
    "submitted": re.compile(r"^Flow run '.+' submitted to infrastructure"),
    "crash": re.compile(r"exited with status code|Check the flow run logs"),
}
"""What each of Prefect's worker lines says, recognised in either worker's wording."""


def kinds(lines: list[str]) -> set[str]:
    return {kind for line in lines for kind, pattern in KINDS.items() if pattern.search(line)}


def worker_lines(api: Api, run_id: str) -> list[str]:
    logs = api.call(
        "POST", "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
    )
    return [entry["message"] for entry in logs if entry["name"] == "prefect.flow_runs.worker"]


def worker_events(api: Api, resource_id: str) -> dict[str, list[dict[str, Any]]]:
    found = api.call(
        "POST",
        "events/filter",
        {
            "filter": {"any_resource": {"id": [resource_id]}, "event": {"prefix": ["prefect.worker."]}},
            "limit": 50,
        },
    )
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in found["events"]:
        by_name.setdefault(event["event"], []).append(event)
    return by_name


def shape(event: dict[str, Any]) -> set[tuple[str, ...]]:
    """An event's shape: its resource's keys, and each related resource's role and keys."""
    out = {("resource", key) for key in event["resource"]}
    for related in event["related"]:
        out |= {(related["prefect.resource.role"], key) for key in related if key != "prefect.resource.name"}
    return out


def run_pool(api: Api, pool: str) -> tuple[str, str]:
    api.create_pool_with_cli(pool)
    good = api.run(api.deployment(pool), {"name": "side-by-side"})
    bad = api.run(api.deployment(pool, job_variables={"command": "sh -c 'echo oops >&2; exit 3'"}))
    return good, bad


def prefects_worker_run_once(pool: str, env: dict[str, str], short_flags: bool = False) -> None:
    """``prefect worker start --pool POOL --type process --run-once`` (``-p``/``-t`` with
    ``short_flags``): Prefect's worker drains what is due, as flow-worker will next."""
    pool_flag, type_flag = ("-p", "-t") if short_flags else ("--pool", "--type")
    prefect = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", pool_flag, pool, type_flag, "process", "--run-once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prefect.returncode == 0, prefect.stderr[-2000:]


def test_nothing_prefects_worker_leaves_is_missing(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    env = {**prefect_server.env, "PREFECT_LOGGING_LEVEL": "INFO"}
    theirs = run_pool(api, f"{pool_name}-prefect")
    prefects_worker_run_once(f"{pool_name}-prefect", env)
    ours = run_pool(api, f"{pool_name}-fw")
    fw = flow_worker(
        prefect_server,
        "--pool",
        f"{pool_name}-fw",
        "--type",
        "process",
        "--run-once",
        **env,
        FLOW_WORKER_STATE_DIR=str(tmp_path / "s"),
    )
    assert fw.returncode == 0, fw.stderr[-2000:]  # `exit 3` crashed: 0 as Prefect

    for their_id, our_id in zip(theirs, ours, strict=True):
        their_run, our_run = api.flow_run(their_id), api.flow_run(our_id)
        assert our_run["state_type"] == their_run["state_type"]
        assert their_run["labels"].keys() <= our_run["labels"].keys()
        assert our_run["labels"]["prefect.worker.type"] == "process"
        assert our_run["infrastructure_pid"].isdigit() and their_run["infrastructure_pid"].isdigit()

        their_lines = worker_lines(api, their_id)
        assert kinds(their_lines) >= {"submitting", "submitted"}, their_lines
        our_lines = wait_for(
            lines_covering(api, our_id, kinds(their_lines)), 20, what=f"flow-worker's lines for {our_id}"
        )
        their_events = wait_for(events_covering(api, their_id, set(), 2), 30, what="Prefect's worker events")
        our_events = wait_for(
            events_covering(api, our_id, set(their_events), 1), 30, what=f"events {sorted(their_events)}"
        )
        for name, events in their_events.items():
            assert shape(events[0]) <= shape(our_events[name][0]), name
        if their_run["state_type"] == "CRASHED":
            assert "Process exited with status code: 3." in our_run["state"]["message"]
            assert "oops" in our_run["state"]["message"], "flow-worker shows the stderr tail too"
            assert any("oops" in line for line in our_lines)

    their_worker = slug(api.flow_run(theirs[0])["labels"]["prefect.worker.name"])
    our_worker = slug(api.flow_run(ours[0])["labels"]["prefect.worker.name"])
    for name in ("prefect.worker.started", "prefect.worker.stopped"):
        assert name in worker_events(api, f"prefect.worker.process.{their_worker}")
        found = wait_for(
            lambda n=name: worker_events(api, f"prefect.worker.process.{our_worker}").get(n),
            30,
            what=f"flow-worker's {name}",
        )
        assert found[0]["related"][0]["prefect.resource.role"] == "work-pool"


def lines_covering(api: Api, run_id: str, wanted: set[str]) -> Callable[[], list[str] | None]:
    def check() -> list[str] | None:
        found = worker_lines(api, run_id)
        return found if kinds(found) >= wanted else None

    return check


def events_covering(
    api: Api, run_id: str, wanted: set[str], at_least: int
) -> Callable[[], dict[str, list[dict[str, Any]]] | None]:
    def check() -> dict[str, list[dict[str, Any]]] | None:
        found = worker_events(api, f"prefect.flow-run.{run_id}")
        return found if found.keys() >= wanted and len(found) >= at_least else None

    return check


HOOK_LINE = "hook write_marker saw Crashed"
DEATHS = ("sigkill", "exit3", "segv")
"""How the flow's process dies: SIGKILL (what the OOM killer sends), ``os._exit(3)``, a
segfault (``ctypes.string_at(0)``)."""


def run_lines(api: Api, run_id: str) -> list[str]:
    """Every line of the run's logs (the flow's, the hooks', the workers')."""
    logs = api.call(
        "POST", "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
    )
    return [entry["message"] for entry in logs]


def crash_runs(api: Api, pool: str, markers: Path) -> dict[str, str]:
    api.create_pool_with_cli(pool)
    dep = api.deployment(pool, entrypoint="crashy.py:crashy", flow_name="crashy")
    markers.mkdir()
    return {how: api.run(dep, {"marker": str(markers / how), "how": how}) for how in DEATHS}


def test_on_crashed_hooks_run_wherever_prefects_worker_runs_them(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """Issue 21: a flow whose process dies by SIGKILL, ``os._exit(3)`` or a segfault has its
    ``on_crashed`` hook run under flow-worker wherever Prefect's worker runs it, and the
    hook's log line reaches the run's logs."""
    env = {**prefect_server.env, "PREFECT_LOGGING_LEVEL": "INFO"}
    theirs = crash_runs(api, f"{pool_name}-prefect", tmp_path / "theirs")
    prefects_worker_run_once(f"{pool_name}-prefect", env, short_flags=True)
    ours = crash_runs(api, f"{pool_name}-fw", tmp_path / "ours")
    fw = flow_worker(
        prefect_server,
        "--pool",
        f"{pool_name}-fw",
        "--run-once",
        **env,
        FLOW_WORKER_STATE_DIR=str(tmp_path / "s"),
        FLOW_WORKER_LOG_FORMAT="json",
    )
    assert fw.returncode == 0, fw.stderr[-3000:]  # crashed runs: --run-once exits 0, as Prefect's worker

    for how in DEATHS:
        their_run, our_run = api.flow_run(theirs[how]), api.flow_run(ours[how])
        assert their_run["state_type"] == our_run["state_type"] == "CRASHED", how
        their_marker, our_marker = tmp_path / "theirs" / how, tmp_path / "ours" / how
        if not their_marker.exists():
            continue  # Prefect's worker did not run it: nothing to match
        assert our_marker.exists(), f"{how}: flow-worker did not run the on_crashed hook: {fw.stderr[-3000:]}"
        lines = our_marker.read_text().splitlines()
        assert len(lines) == 1, (how, lines, fw.stderr[-6000:])  # once, never twice
        line = lines[0]
        assert line.startswith("CRASHED|Crashed|Process exited with status code:"), line
        wait_for(
            lambda run_id=ours[how]: any(HOOK_LINE in m for m in run_lines(api, run_id)),
            30,
            what=f"{how}: the hook's line in the run's logs",
        )
        assert any(HOOK_LINE in m for m in run_lines(api, theirs[how])), how
    assert all((tmp_path / "theirs" / how).exists() for how in DEATHS), "Prefect 3.9.1 runs them all"
    hooks_said = [e for e in map(_json, fw.stderr.splitlines()) if e.get("event") == "run.hooks"]
    assert sorted(e["result"] for e in hooks_said) == ["ok"] * 3, hooks_said


def _json(line: str) -> dict[str, Any]:
    try:
        found = json.loads(line)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
