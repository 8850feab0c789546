"""Issue 24 with a real server and real runs: a block's secret and a ``{{ $ENV }}`` value in
a run's command stay out of the worker's log and the run's logs in the UI; a config file
holding a secret that others can read is said; a run's environment holds none of the
service manager's variables nor ``FLOW_WORKER_*``, started cold or warm."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, WorkerProcess, free_port, wait_for
from worker.rules.childenv import SERVICE_MANAGER
from worker.rules.job import ProcessJobConfiguration

FAST = {"FLOW_WORKER_QUERY_SECONDS": "1", "FLOW_WORKER_CANCEL_POLL_SECONDS": "1"}


def secret_block(api: Api, name: str, value: str) -> None:
    """A Prefect Secret block document, as ``Secret(value=...).save(name)`` makes it."""
    block_type = api.call("GET", "block_types/slug/secret")
    body = {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    (schema, *_) = api.call("POST", "block_schemas/filter", body)
    api.call(
        "POST",
        "block_documents/",
        {
            "name": name,
            "block_type_id": block_type["id"],
            "block_schema_id": schema["id"],
            "data": {"value": value},
        },
    )


def worker_lines(api: Api, run_id: str) -> list[str]:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
    return [
        entry["message"]
        for entry in api.call("POST", "logs/filter", body)
        if entry["name"] == "prefect.flow_runs.worker"
    ]


@pytest.mark.no_engine_run
def test_templated_secrets_stay_out_of_the_log_and_the_ui(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    from_block, from_env, api_key = (f"{what}-{uuid.uuid4().hex}" for what in ("block", "env", "key"))
    block = f"db-{uuid.uuid4().hex[:8]}"
    secret_block(api, block, from_block)
    template = ProcessJobConfiguration.default_base_job_template()
    template["job_configuration"]["command"] = "{{ command }} {{ $FW_TEST_TOKEN }}"  # the pool's reference
    # (the server takes a placeholder in the template only if the schema declares it)
    template["variables"]["properties"]["$FW_TEST_TOKEN"] = {"type": "string"}
    api.call("POST", "work_pools/", {"name": pool_name, "type": "process", "base_job_template": template})
    seen = tmp_path / "seen"
    command = f"sh -c 'echo \"$1 $2\" > {seen}' sh {{{{ prefect.blocks.secret.{block} }}}}"
    run_id = api.run(api.deployment(pool_name, job_variables={"command": command}))
    config = tmp_path / "worker.toml"
    config.write_text(f'api_key = "{api_key}"\n')
    config.chmod(0o644)  # as the README installs the TOML file: others can read it
    port = free_port()
    worker = start_worker(
        "--pool",
        pool_name,
        "--config",
        str(config),
        FW_TEST_TOKEN=from_env,
        FLOW_WORKER_WITH_HEALTHCHECK="true",
        FLOW_WORKER_WEBSERVER_PORT=str(port),
        **FAST,
    )
    final = api.wait_final(run_id, 60)
    assert seen.read_text() == f"{from_block} {from_env}\n", "the run got both values"
    lines = wait_for(
        lambda: (
            (got := worker_lines(api, run_id))
            and any("submitted to infrastructure" in line for line in got)
            and got
        ),
        30,
        what="the worker's lines in the run's logs",
    )
    (submitted,) = [line for line in lines if "submitted to infrastructure" in line]
    assert f"command sh -c 'echo \"$1 $2\" > {seen}' sh ******** ********," in submitted
    (started,) = [e for e in worker.events() if e.get("event") == "run.started"]
    assert started["command"] == f"sh -c 'echo \"$1 $2\" > {seen}' sh ******** ********"
    (warned,) = [e for e in worker.events() if e.get("event") == "config.secret_readable"]
    assert warned["level"] == "warning" and warned["path"] == str(config) and warned["secrets"] == "api_key"
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    everything = "\n".join([worker.log_path.read_text(), *lines, json.dumps(final), metrics])
    for secret in (from_block, from_env, api_key):
        assert secret not in everything


@pytest.mark.parametrize("start", ["cold", "warm"])
def test_a_run_inherits_none_of_the_service_managers_variables(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path, start: str
) -> None:
    manager = {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),  # nobody listens: the worker's datagrams go nowhere
        "WATCHDOG_PID": "1",  # not the worker's: no watchdog
        "WATCHDOG_USEC": "60000000",
        "LISTEN_FDS": "0",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "none",
        "INVOCATION_ID": uuid.uuid4().hex,
        "JOURNAL_STREAM": "0:0",
        "STATE_DIRECTORY": str(tmp_path / "state-directory"),
        "RUNTIME_DIRECTORY": str(tmp_path / "runtime"),
        "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials"),
        "MANAGERPID": "1",
        "SYSTEMD_EXEC_PID": "1",
        "MAINPID": "1",
    }
    assert set(manager) <= SERVICE_MANAGER
    out = tmp_path / "environment.json"
    dep = api.deployment(pool_name, entrypoint="hello.py:environment", flow_name="environment")
    worker = start_worker(
        "--pool",
        pool_name,
        FW_TEST_KEPT="kept",
        FLOW_WORKER_WARM_START="true" if start == "warm" else "false",
        **manager,
        **FAST,
    )
    run_id = api.run(dep, {"out": str(out)})
    assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED"
    assert worker.saw("run.started", start=start)
    seen = json.loads(out.read_text())
    for environment in (seen["environ"], seen["started"]):
        assert not {name for name in environment if name in manager or name.startswith("FLOW_WORKER_")}
        assert environment["FW_TEST_KEPT"] == "kept", "the rest is inherited, as Prefect's worker does"
    environ = seen["environ"]
    assert environ["PREFECT__FLOW_RUN_ID"] == run_id and environ["PREFECT_API_URL"]
    if start == "cold":  # the engine takes them out of os.environ; a warm run's /proc has its server's
        assert {"PREFECT__CONTROL_PORT", "PREFECT__CONTROL_TOKEN"} <= set(seen["started"])
