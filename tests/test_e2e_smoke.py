"""Smoke: a real flow through a real server with `flow-worker --once`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ENGINE_START, ROOT, Api, PrefectServer

IN_PROCESS = """
import sys
from worker.cli import main
rc = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect."))
assert not leaked, f"worker imported prefect: {leaked[:5]}"
sys.exit(rc)
"""


def test_once_runs_a_real_flow_with_merged_env(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    api.create_pool_with_cli(pool_name)
    dep = api.deployment(pool_name, job_variables={"env": {"FOO": "from-deployment", "BAR": "dep"}})
    out = tmp_path / "out.jsonl"
    run_id = api.run(dep, {"name": "e2e", "out": str(out)}, {"env": {"BAR": "from-run"}})
    proc = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, "--pool", pool_name, "--once"],
        env={**prefect_server.env, "FLOW_WORKER_LOG_FORMAT": "json"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert api.state_type(run_id) == "COMPLETED"
    record = json.loads(out.read_text().splitlines()[0])
    assert record["FOO"] == "from-deployment"
    assert record["BAR"] == "from-run"
    assert record["run_id"] == run_id
    assert "hello e2e from flow-worker test" in proc.stdout + proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "run.started")
    assert started["start"] == ENGINE_START, "the run started the way this session's workers start runs"
    assert {"event": "run.finished", "state": "COMPLETED"}.items() <= next(
        e for e in events if e["event"] == "run.finished"
    ).items()
