"""flow-worker against a real Prefect 3.9.1 server: pools, failures, cancellation, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BIN, FLOWS, Api, PrefectServer, WorkerProcess, flow_worker, free_port, wait_for

FAST = {
    "FLOW_WORKER_QUERY_SECONDS": "1",
    "FLOW_WORKER_CANCEL_POLL_SECONDS": "1",
    "FLOW_WORKER_HEARTBEAT_SECONDS": "5",
}
FAKE_ENGINE = f"{sys.executable} {FLOWS / 'fake_engine.py'}"


def crashed_states(api: Api, run_id: str) -> list[dict[str, Any]]:
    return [s for s in api.states(run_id) if s["type"] == "CRASHED"]


@pytest.mark.no_engine_run
def test_missing_pool_is_created_with_prefects_template(
    prefect_server: PrefectServer, api: Api, pool_name: str
) -> None:
    proc = subprocess.run(
        [str(BIN / "flow-worker"), "--pool", pool_name, "--once"],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ours = api.call("GET", f"work_pools/{pool_name}")
    assert ours["type"] == "process"
    reference = f"ref-{pool_name}"
    api.create_pool_with_cli(reference)
    theirs = api.call("GET", f"work_pools/{reference}")
    assert ours["base_job_template"] == theirs["base_job_template"]


def test_failures_crash_once_with_the_reason_and_the_daemon_goes_on(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    api.create_pool_with_cli(pool_name)
    # a template mistake the server cannot catch: an untyped variable fed into a string field
    template = api.call("GET", f"work_pools/{pool_name}")["base_job_template"]
    template["variables"]["properties"]["team"] = {"title": "Team"}
    template["job_configuration"]["labels"] = {"team": "{{ team }}"}
    api.call("PATCH", f"work_pools/{pool_name}", {"base_job_template": template})
    worker = start_worker("--pool", pool_name, **FAST)
    good = api.deployment(pool_name)
    cases = [
        ({"command": "sh -c 'exit 3'"}, "Process exited with status code: 3."),
        ({"command": "no-such-command-xyz --flag"}, "command not found: 'no-such-command-xyz'"),
        (
            {"working_dir": str(tmp_path / "nope")},
            f"working directory '{tmp_path / 'nope'}' does not exist",
        ),
        ({"team": 7}, "job variable 'labels.team' must be a string, got int 7"),
        (
            {"env": {"S": "{{ prefect.blocks.secret.no-such-block }}"}},
            "block not found: 'no-such-block'",
        ),
    ]
    for job_variables, expected in cases:
        bad = api.run(api.deployment(pool_name, job_variables=job_variables))
        final = api.wait_final(bad, 60)
        assert final["state_type"] == "CRASHED", final["state"]
        assert expected in final["state"]["message"], final["state"]["message"]
        assert len(crashed_states(api, bad)) == 1
        ok = api.run(good, {"name": "after-crash"})
        assert api.wait_final(ok, 120)["state_type"] == "COMPLETED"
    assert worker.proc.poll() is None, "the daemon must keep running"
    # the same CRASHED message is visible in the worker's log for the operator
    assert worker.saw("run.reported", kind="crash", outcome="CRASHED ACCEPT")


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.mark.no_engine_run
@pytest.mark.parametrize("events", ["true", "false"], ids=["events-on", "events-off"])
def test_cancelling_kills_the_whole_process_group(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], events: str
) -> None:
    api.create_pool_with_cli(pool_name)
    start_worker("--pool", pool_name, FLOW_WORKER_EVENTS=events, **FAST)
    dep = api.deployment(pool_name, job_variables={"command": "sh -c 'sleep 300 & wait'"})
    run_id = api.run(dep)
    pid = int(wait_for(lambda: api.flow_run(run_id)["infrastructure_pid"], 60, what="infrastructure_pid"))
    wait_for(lambda: len(_group_members(pid)) >= 2, 10, what="sh and its sleep")
    api.cancel(run_id)
    final = api.wait_final(run_id, 60)
    assert final["state_type"] == "CANCELLED"
    assert final["state"]["message"] == "Flow run was cancelled successfully."
    wait_for(lambda: not _group_members(pid), 10, what=f"process group {pid} to be empty")


@pytest.mark.no_engine_run
@pytest.mark.parametrize("events", ["true", "false"], ids=["events-on", "events-off"])
def test_two_daemons_run_each_of_30_runs_exactly_once(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path, events: str
) -> None:
    api.create_pool_with_cli(pool_name)
    ran = tmp_path / "ran.txt"
    ran.touch()
    dep = api.deployment(
        pool_name, job_variables={"command": FAKE_ENGINE, "env": {"FAKE_ENGINE_LOG": str(ran)}}
    )
    a = start_worker("--pool", pool_name, "--name", "worker-a", FLOW_WORKER_EVENTS=events, **FAST)
    b = start_worker("--pool", pool_name, "--name", "worker-b", FLOW_WORKER_EVENTS=events, **FAST)
    runs = [api.run(dep) for _ in range(30)]
    for run_id in runs:
        assert api.wait_final(run_id, 180)["state_type"] == "COMPLETED"
    executed = ran.read_text().split()
    assert sorted(executed) == sorted(runs), "every run executed exactly once"
    claimed = [e["flow_run_id"] for w in (a, b) for e in w.events() if e.get("event") == "run.claimed"]
    assert sorted(claimed) == sorted(runs)


def test_limit_two_never_runs_more_than_two(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    api.create_pool_with_cli(pool_name)
    out = tmp_path / "out.jsonl"
    dep = api.deployment(pool_name)
    runs = [api.run(dep, {"name": f"r{i}", "out": str(out), "sleep": 1.0}) for i in range(6)]
    proc = subprocess.run(
        [str(BIN / "flow-worker"), "--pool", pool_name, "--once", "--limit", "2"],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(api.state_type(r) == "COMPLETED" for r in runs)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    edges = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert peak == 2, f"peak concurrency {peak}"


@pytest.mark.no_engine_run
def test_worker_is_online_while_it_runs(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    name = f"online-{uuid.uuid4().hex[:6]}"
    worker = start_worker("--pool", pool_name, "--name", name, **FAST)

    def online() -> bool:
        try:
            rows = api.call("POST", f"work_pools/{pool_name}/workers/filter", {})
        except AssertionError:
            return False  # the pool does not exist until the worker's first sync
        return any(r["name"] == name and r["status"] == "ONLINE" for r in rows)

    wait_for(online, 30, what="the worker to be ONLINE")
    assert worker.stop() == 0


@pytest.mark.no_engine_run
def test_health_endpoint(api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess]) -> None:
    port = free_port()
    worker = start_worker(
        "--pool", pool_name, "--with-healthcheck", PREFECT_WORKER_WEBSERVER_PORT=str(port), **FAST
    )
    base = f"http://127.0.0.1:{port}"

    def ok() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, 30, what="/health to answer 200")
    assert httpx.get(f"{base}/health").json() == {"message": "OK"}
    assert httpx.get(f"{base}/nope").status_code == 404
    assert httpx.post(f"{base}/health").status_code == 405
    assert worker.stop() == 0


@pytest.mark.no_engine_run
def test_no_api_url_is_a_usage_error(prefect_server: PrefectServer) -> None:
    env = {k: v for k, v in prefect_server.env.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        [str(BIN / "flow-worker"), "--pool", "p", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flow-worker: PREFECT_API_URL is not set: point it at your Prefect server, e.g. "
        "PREFECT_API_URL=http://127.0.0.1:4200/api in the environment, or `prefect config set "
        "PREFECT_API_URL=…` as the worker's user (or api_url in the config file)"
    ]


@pytest.mark.no_engine_run
def test_bad_config_file_names_key_and_file(prefect_server: PrefectServer, tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('pool = "p"\nlimit = -1\n')
    proc = subprocess.run(
        [str(BIN / "flow-worker"), "--config", str(cfg)],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"{cfg} line 2: 'limit' = -1: must be greater than 0" in proc.stderr
    assert os.path.exists(cfg)


def test_blocks_and_variables_resolve_through_the_api(
    prefect_server: PrefectServer,
    api: Api,
    pool_name: str,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    name = f"s-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from prefect.blocks.system import Secret; Secret(value='s3cr3t').save('{name}')",
        ],
        env=prefect_server.env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    api.call("POST", "variables/", {"name": f"v_{name[2:]}", "value": 42})
    out = tmp_path / "env.jsonl"
    env = {
        "FOO": f"{{{{ prefect.blocks.secret.{name} }}}}",
        "BAR": f"x-{{{{ prefect.variables.v_{name[2:]} }}}}-y",
    }
    dep = api.deployment(pool_name, job_variables={"env": env})
    start_worker("--pool", pool_name, **FAST)
    assert api.wait_final(api.run(dep, {"name": "blocks", "out": str(out)}), 120)["state_type"] == "COMPLETED"
    record = json.loads(out.read_text().splitlines()[0])
    assert (record["FOO"], record["BAR"]) == ("s3cr3t", "x-42-y"), "the real flow sees the resolved values"


@pytest.mark.no_engine_run
def test_every_exit_status_is_true_under_a_burst(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """50 runs exit 3 and 50 exit 0 at once, 16 at a time: a child that exits before its
    spawn returns must never be reaped as an orphan (its status would be lost, or 0)."""
    api.create_pool_with_cli(pool_name)
    failing = api.deployment(pool_name, job_variables={"command": "sh -c 'exit 3'"})
    clean = api.deployment(pool_name, job_variables={"command": "true"})
    threes = [api.run(failing) for _ in range(50)]
    zeros = [api.run(clean) for _ in range(50)]
    proc = flow_worker(
        prefect_server,
        "--pool",
        pool_name,
        "--once",
        "--limit",
        "16",
        FLOW_WORKER_STATE_DIR=str(tmp_path / "s"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = api.call("POST", "flow_runs/filter", {"flow_runs": {"id": {"any_": threes + zeros}}})
    by_id = {row["id"]: row for row in rows}
    with_three = [r for r in by_id.values() if "Process exited with status code: 3." in r["state"]["message"]]
    assert sorted(r["id"] for r in with_three) == sorted(threes)
    assert all(by_id[r]["state_type"] == "CRASHED" for r in threes)
    for r in zeros:  # `true` is not the engine: exit 0 without a final state, said as such
        assert by_id[r]["state_type"] == "CRASHED"
        assert "exited with status 0 without reporting a final state" in by_id[r]["state"]["message"]


@pytest.mark.no_engine_run
def test_crash_message_shows_the_error(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    command = f"{sys.executable} -c 'import nonexistent_module'"
    run_id = api.run(api.deployment(pool_name, job_variables={"command": command}))
    proc = flow_worker(
        prefect_server, "--pool", pool_name, "--once", FLOW_WORKER_STATE_DIR=str(tmp_path / "s")
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    final = api.flow_run(run_id)
    assert final["state_type"] == "CRASHED"
    message = final["state"]["message"]
    assert "Process exited with status code: 1." in message
    assert "ModuleNotFoundError: No module named 'nonexistent_module'" in message
    assert len(message) < 2600, "the stderr tail is bounded"


def test_prefects_own_flags_work(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """A unit written for `prefect worker start` works by changing only the program name."""
    reference = f"ref-{pool_name}"
    api.create_pool_with_cli(reference)
    custom = api.call("GET", f"work_pools/{reference}")["base_job_template"]
    custom["variables"]["properties"]["env"]["default"] = {"FOO": "from-template-file"}
    template_file = tmp_path / "template.json"
    template_file.write_text(json.dumps(custom))
    out = tmp_path / "out.jsonl"
    args = ["--pool", pool_name, "--type", "process", "--install-policy", "never", "--run-once"]
    state = str(tmp_path / "s")
    first = flow_worker(
        prefect_server, *args, "--base-job-template", str(template_file), FLOW_WORKER_STATE_DIR=state
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "worker.install_policy_ignored" in first.stderr
    assert api.call("GET", f"work_pools/{pool_name}")["base_job_template"] == custom
    run_id = api.run(api.deployment(pool_name), {"name": "flags", "out": str(out)})
    second = flow_worker(prefect_server, *args, "--name", "unit-file-worker", FLOW_WORKER_STATE_DIR=state)
    assert second.returncode == 0, second.stderr[-3000:]
    run = api.flow_run(run_id)
    assert run["state_type"] == "COMPLETED"
    assert json.loads(out.read_text())["FOO"] == "from-template-file"
    pool_id = api.call("GET", f"work_pools/{pool_name}")["id"]
    assert {
        "prefect.worker.name": "unit-file-worker",
        "prefect.worker.type": "process",
        "prefect.work-pool.name": pool_name,
        "prefect.work-pool.id": pool_id,
    }.items() <= run["labels"].items()
    assert run["infrastructure_pid"].isdigit()

    other = flow_worker(prefect_server, "--pool", pool_name, "--type", "kubernetes", timeout=30)
    assert other.returncode == 2
    assert other.stderr.count("\n") == 1 and "--type 'kubernetes' is not supported" in other.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused = flow_worker(prefect_server, "--pool", "p", "--base-job-template", str(bad), timeout=30)
    assert refused.returncode == 2 and f"base_job_template: {bad} is not JSON" in refused.stderr


def test_an_interpreter_without_prefect_is_said_at_start(
    api: Api, pool_name: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """The first thing a new user does: install the worker, forget `python = …`."""
    bare = tmp_path / "bare-venv"
    subprocess.run(
        [Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", "--without-pip", bare], check=True
    )
    python = str(bare / "bin" / "python")
    port = free_port()
    worker = start_worker(
        "--pool",
        pool_name,
        "--with-healthcheck",
        PREFECT_WORKER_WEBSERVER_PORT=str(port),
        FLOW_WORKER_PYTHON=python,
        **FAST,
    )
    wait_for(lambda: worker.saw("worker.interpreter_unusable", level="error"), 60, what="the ERROR at start")
    health = wait_for(lambda: _get(f"http://127.0.0.1:{port}/health"), 30, what="/health")
    assert health.status_code == 503
    assert python in health.json()["message"] and "set `python`" in health.json()["message"]
    default = api.run(api.deployment(pool_name))
    final = api.wait_final(default, 60)
    assert final["state_type"] == "CRASHED"
    assert "Flow run could not start: the interpreter" in final["state"]["message"]
    assert "FLOW_WORKER_PYTHON" in final["state"]["message"]
    own = api.run(api.deployment(pool_name, job_variables={"command": FAKE_ENGINE}))
    assert api.wait_final(own, 60)["state_type"] == "COMPLETED", "runs with their own command still run"


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def test_https_api_with_a_private_ca(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """REST and the events stream over HTTPS with a throwaway CA: trusted through
    PREFECT_API_SSL_CERT_FILE a real flow runs to COMPLETED; without it, one clear ERROR."""
    from tests.tls_proxy import TlsProxy

    ca = tmp_path / "ca.pem"
    with TlsProxy(prefect_server.port, ca) as proxy:
        https = {
            **prefect_server.env,
            "PREFECT_API_URL": proxy.url + "/api",
            "FLOW_WORKER_LOG_FORMAT": "json",
        }
        refused = WorkerProcess(
            prefect_server,
            ["--pool", pool_name],
            {**https, "FLOW_WORKER_STATE_DIR": str(tmp_path / "a")},
            tmp_path / "a.log",
        )
        try:
            wait_for(
                lambda: refused.saw("api.certificate_refused", level="error"),
                30,
                what="the certificate ERROR",
            )
            wait_for(lambda: proxy.handshakes_failed >= 3, 30, what="the worker to keep retrying")
            assert refused.proc.poll() is None, "a certificate problem is no reason to exit"
            assert len([e for e in refused.events() if e.get("level") == "error"]) == 1
        finally:
            assert refused.stop() == 0

        out = tmp_path / "out.jsonl"
        # the flow's own engine talks to the API through the proxy too
        dep = api.deployment(pool_name, job_variables={"env": {"PREFECT_API_URL": proxy.url + "/api"}})
        trusted = WorkerProcess(
            prefect_server,
            ["--pool", pool_name, "--with-healthcheck"],
            {
                **https,
                "PREFECT_API_SSL_CERT_FILE": str(ca),
                "FLOW_WORKER_STATE_DIR": str(tmp_path / "b"),
                "FLOW_WORKER_QUERY_SECONDS": "60",
                "PREFECT_WORKER_WEBSERVER_PORT": str(free_port()),
            },
            tmp_path / "b.log",
        )
        try:
            wait_for(lambda: trusted.saw("events.connected"), 30, what="the events stream over wss://")
            run_id = api.run(dep, {"name": "tls", "out": str(out)})
            assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED"
            assert trusted.saw("run.started", flow_run_id=run_id)
            assert not trusted.saw("api.certificate_refused")
        finally:
            assert trusted.stop() == 0
