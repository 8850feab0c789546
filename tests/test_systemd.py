"""flow-worker as a real system service: the .deb, under systemd as PID 1 of a container.

One container is booted for the module (as ``shared/systemd-kit/nspawn-check.sh`` does);
the package built from this checkout is installed with apt; the worker serves pool ``t``
of the session's Prefect server on the host's loopback. Flow runs use the stdlib "fake
engine" (``tests/flows/fake_engine.py``) so that the container needs no prefect.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FLOWS, ROOT, Api, PrefectServer, free_port, wait_for
from tests.nspawn import Container, why_not_available

UNIT = "flow-worker@t.service"
POOL = "t"


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    reason = why_not_available()
    if reason:
        pytest.skip(f"systemd tests: {reason}")
    work = Path(tempfile.mkdtemp(prefix="flow-worker-nspawn-"))
    payload = work / "payload"
    payload.mkdir()
    payload.chmod(0o755)
    work.chmod(0o755)
    built = subprocess.run(
        [str(ROOT / "packaging" / "build-deb")], capture_output=True, text=True, check=True
    )
    shutil.copy(built.stdout.strip().splitlines()[-1], payload / "flow-worker.deb")
    shutil.copy(FLOWS / "fake_engine.py", payload / "fake_engine.py")
    for f in payload.iterdir():
        f.chmod(0o644)
    box = Container(work, payload)
    try:
        box.boot()
        yield box
    finally:
        box.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def show(box: Container, prop: str) -> str:
    return box.run("systemctl", "show", "-P", prop, UNIT).stdout.strip()


def journal(box: Container, *args: str) -> list[dict[str, str]]:
    out = box.run("journalctl", "--no-pager", "-o", "json", *args, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(box: Container, *args: str) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in journal(box, *args)]


def deployment(api: Api, sleep: float = 0, command: str | None = None) -> str:
    cmd = command or "/usr/bin/python3 /opt/payload/fake_engine.py"
    return api.deployment(POOL, job_variables={"command": cmd, "env": {"FAKE_ENGINE_SLEEP": str(sleep)}})


def test_service_under_real_systemd(container: Container, prefect_server: PrefectServer, api: Api) -> None:
    box = container
    # ---- install from the .deb with apt; units verify
    box.run("apt-get", "install", "-y", "-q", "/opt/payload/flow-worker.deb", timeout=300)
    for unit in ("flow-worker@.service", "flow-worker-drain@.service", "flow-worker-drain@.timer"):
        verify = box.run("systemd-analyze", "verify", f"/lib/systemd/system/{unit}", check=False)
        assert verify.returncode == 0, verify.stderr
    assert box.sh("getent passwd flow-worker").startswith("flow-worker:")
    assert box.sh("stat -c %a /etc/flow-worker/example.env").strip() == "600"

    # ---- configure: API on the host's loopback, a fast loop for the test, health + metrics
    port = free_port()
    env_file = "/etc/flow-worker/t.env"
    box.sh(f"printf 'PREFECT_API_URL={prefect_server.api_url}\\n' > {env_file} && chmod 600 {env_file}")
    box.sh(
        "cat > /etc/flow-worker/t.toml <<'EOF'\n"
        f"query_seconds = 1\ncancel_poll_seconds = 1\nheartbeat_seconds = 5\n"
        f"with_healthcheck = true\nwebserver_port = {port}\n"
        "EOF"
    )
    # the watchdog part of the test needs a short watchdog; everything else is the shipped unit
    box.sh(
        "mkdir -p /etc/systemd/system/flow-worker@t.service.d && "
        "printf '[Service]\\nWatchdogSec=5s\\nRestartSec=1s\\nTimeoutAbortSec=2s\\n' "
        "> /etc/systemd/system/flow-worker@t.service.d/test.conf && systemctl daemon-reload"
    )

    # ---- start returns only after READY (the first sync), with a status line
    box.run("systemctl", "start", UNIT, timeout=120)
    assert show(box, "ActiveState") == "active"
    assert "active runs" in show(box, "StatusText")
    assert "worker.synced" in " ".join(messages(box, "-u", UNIT))

    # ---- runs: one COMPLETED, one CRASHED (a command that is not an engine: a warning)
    good = api.run(deployment(api))
    bad = api.run(deployment(api, command="true"))
    assert api.wait_final(good, 60)["state_type"] == "COMPLETED"
    assert api.wait_final(bad, 60)["state_type"] == "CRASHED"

    # ---- journald: priorities, fields, the flow's own line
    wait_for(lambda: messages(box, "-u", UNIT, "-p", "warning"), 10, what="a warning in the journal")
    warnings = journal(box, "-u", UNIT, "-p", "warning")
    assert all(int(e["PRIORITY"]) <= 4 for e in warnings)
    assert any(e.get("FLOW_RUN_ID") == bad and e.get("FLOW_WORKER_EVENT") == "run.reported" for e in warnings)
    assert not any(e.get("FLOW_WORKER_EVENT") == "worker.synced" for e in warnings)
    story = journal(box, f"FLOW_RUN_ID={good}")
    events = {e.get("FLOW_WORKER_EVENT") for e in story}
    assert {"run.claimed", "run.started", "run.exited"} <= events
    assert f"fake engine ran {good}" in [e.get("MESSAGE") for e in story]
    assert all(e.get("WORK_POOL") == POOL and e.get("SYSLOG_IDENTIFIER") == "flow-worker" for e in story)
    assert all(e.get("_SYSTEMD_UNIT") == UNIT for e in story)

    # ---- /metrics parses and matches the runs made
    text = subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True, check=True
    ).stdout
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("flow_worker_runs_claimed_total", ())] == 2
    assert samples[("flow_worker_runs_finished_total", (("state", "COMPLETED"),))] == 1
    assert samples[("flow_worker_runs_finished_total", (("state", "CRASHED"),))] == 1
    assert samples[("flow_worker_active_runs", ())] == 0

    # ---- watchdog: freeze the worker with a run in flight; systemd restarts it; it adopts the run
    inflight = api.run(deployment(api, sleep=15))
    wait_for(lambda: api.state_type(inflight) == "RUNNING", 60, what="the in-flight run to be RUNNING")
    old_pid = show(box, "MainPID")
    box.run("systemctl", "kill", "-s", "SIGSTOP", "--kill-whom=main", UNIT)
    wait_for(
        lambda: (
            show(box, "NRestarts") == "1"
            and show(box, "MainPID") not in ("0", old_pid)
            and show(box, "ActiveState") == "active"
        ),
        60,
        0.3,
        "the watchdog restart",
    )
    assert any("Failed with result 'watchdog'" in m for m in messages(box, "-u", UNIT))
    wait_for(
        lambda: any(
            e.get("FLOW_WORKER_EVENT") == "run.adopted" for e in journal(box, f"FLOW_RUN_ID={inflight}")
        ),
        30,
        what="the restarted worker to adopt the in-flight run",
    )
    assert api.wait_final(inflight, 60)["state_type"] == "COMPLETED"

    # ---- the default name under systemd is "<hostname> <pool>", the same after the restart,
    # so peers see the restarted worker as the one that owns these runs
    name = f"{box.sh('cat /proc/sys/kernel/hostname').strip()} {POOL}"
    assert api.flow_run(good)["labels"]["prefect.worker.name"] == name
    assert api.flow_run(inflight)["labels"]["prefect.worker.name"] == name
    assert [w["name"] for w in api.call("POST", f"work_pools/{POOL}/workers/filter", {})] == [name]

    # ---- stop while a ~10 s flow runs: it finishes, the unit stops cleanly
    last = api.run(deployment(api, sleep=10))
    wait_for(lambda: api.state_type(last) == "RUNNING", 60, what="the last run to be RUNNING")
    t0 = time.monotonic()
    box.run("systemctl", "stop", UNIT, timeout=180)
    tail = "\n".join(
        box.run("journalctl", "-u", UNIT, "-n", "40", "--no-pager", check=False).stdout.splitlines()
    )
    assert api.state_type(last) == "COMPLETED", tail
    assert time.monotonic() - t0 >= 5, "stop waited for the flow (drain)"
    assert show(box, "Result") == "success"
    assert show(box, "ActiveState") == "inactive"
    assert any(e.get("FLOW_WORKER_EVENT") == "worker.stopping" for e in journal(box, "-u", UNIT))
