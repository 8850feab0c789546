"""flow-worker as a real system service: the .deb, under systemd as PID 1 of a container.

One container is booted for the module (as ``shared/systemd-kit/nspawn-check.sh`` does);
the package built from this checkout is installed with apt; the worker serves pool ``t``
of the session's Prefect server on the host's loopback. Flow runs use the stdlib "fake
engine" (``tests/flows/fake_engine.py``) so that the container needs no prefect.

A second worker (pool ``h``) reaches the same server through a proxy that hangs for
``HANG_SECONDS`` (:func:`hung_api`): its hang runs beside the main test, which would
otherwise leave the time idle, and :func:`test_hung_api_is_not_a_restart` judges it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FLOWS, ROOT, Api, PrefectServer, free_port, wait_for
from tests.cut_proxy import CutProxy
from tests.nspawn import Container, why_not_available

UNIT = "flow-worker@t.service"
POOL = "t"
HANG_UNIT = "flow-worker@h.service"
HANG_POOL = "h"
HANG_SECONDS: Final = 180.0
"""How long the API of the hung-API test accepts connections and never answers (issue 19:
3 minutes: four times its 45 s call deadline, three times the shipped WatchdogSec)."""
HANG_WATCHDOG: Final = 10
"""The hung-API worker's WatchdogSec: shorter than one hung call (45 s), so the test fails
if the watchdog is fed only between API calls."""
HANG_SAMPLE_SECONDS: Final = 3.0
EXPOSURE_MAX: Final = 3.5
"""The most ``systemd-analyze security`` may rate either shipped unit (issue 24)."""


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


@pytest.fixture(scope="module")
def installed(container: Container) -> Container:
    """The container with the .deb built from this checkout installed (with apt)."""
    container.run("apt-get", "install", "-y", "-q", "/opt/payload/flow-worker.deb", timeout=300)
    return container


def show(box: Container, prop: str, unit: str = UNIT) -> str:
    return box.run("systemctl", "show", "-P", prop, unit).stdout.strip()


def start(box: Container, unit: str) -> None:
    """``systemctl start``, which returns after READY; the unit's log if it does not."""
    started = box.run("systemctl", "start", unit, timeout=120, check=False)
    tail = box.run("journalctl", "-u", unit, "-n", "60", "--no-pager", check=False).stdout
    assert started.returncode == 0, f"{unit} did not start: {started.stderr}\n{tail}"


def journal(box: Container, *args: str) -> list[dict[str, str]]:
    out = box.run("journalctl", "--no-pager", "-o", "json", *args, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(box: Container, *args: str) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in journal(box, *args)]


def deployment(api: Api, sleep: float = 0, command: str | None = None, pool: str = POOL) -> str:
    cmd = command or "/usr/bin/python3 /opt/payload/fake_engine.py"
    return api.deployment(pool, job_variables={"command": cmd, "env": {"FAKE_ENGINE_SLEEP": str(sleep)}})


def configure(box: Container, pool: str, api_url: str, toml: str, dropin: str) -> None:
    """``/etc/flow-worker/POOL.env`` (the API), ``POOL.toml``, and a drop-in for the unit."""
    env_file = f"/etc/flow-worker/{pool}.env"
    box.sh(f"printf 'PREFECT_API_URL={api_url}\\n' > {env_file} && chmod 600 {env_file}")
    box.sh(f"cat > /etc/flow-worker/{pool}.toml <<'EOF'\n{toml}EOF")
    box.sh(
        f"mkdir -p /etc/systemd/system/flow-worker@{pool}.service.d && "
        f"printf '[Service]\\n{dropin}' > /etc/systemd/system/flow-worker@{pool}.service.d/test.conf "
        "&& systemctl daemon-reload"
    )


class Hang:
    """The hung-API worker's story: what systemd said of it every few seconds while its
    API hung, sampled by a thread beside the main test; the hang ends after HANG_SECONDS."""

    def __init__(self, box: Container, proxy: CutProxy, run_id: str) -> None:
        self.box, self.proxy, self.run_id = box, proxy, run_id
        self.before = self.sample()
        self.samples: list[tuple[float, dict[str, str]]] = []
        self.status_text = ""
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._hang, daemon=True)
        self.began = self.ended = 0.0

    def sample(self) -> dict[str, str]:
        props = ("NRestarts", "MainPID", "ActiveState", "StatusText")
        out = self.box.run("systemctl", "show", *[f"-p{p}" for p in props], HANG_UNIT).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def start(self) -> None:
        self.proxy.cut()
        self.began = time.monotonic()
        self.thread.start()

    def _hang(self) -> None:
        try:
            end = self.began + HANG_SECONDS
            while not self.stop.wait(HANG_SAMPLE_SECONDS) and time.monotonic() < end:
                self.samples.append((time.monotonic() - self.began, self.sample()))
                if not self.status_text and time.monotonic() > end - 20:
                    self.status_text = self.box.run(
                        "systemctl", "status", "--no-pager", HANG_UNIT, check=False
                    ).stdout
        except BaseException as exc:  # said by the test
            self.error = exc
        finally:
            self.proxy.heal()
            self.ended = time.monotonic()

    def wait(self) -> None:
        self.thread.join(HANG_SECONDS + 60)
        assert not self.thread.is_alive(), "the hang did not end"
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def hung_api(installed: Container, prefect_server: PrefectServer) -> Iterator[Hang]:
    """A worker for pool ``h`` whose API (the session's server, through a :class:`CutProxy`)
    accepts connections and never answers for HANG_SECONDS, from the moment a run is in
    flight. Started first, so that its 3 minutes pass beside the main test."""
    box, api = installed, Api(prefect_server)
    with CutProxy(prefect_server.port) as proxy:
        hang: Hang | None = None
        try:
            configure(
                box,
                HANG_POOL,
                f"{proxy.url}/api",
                "query_seconds = 1\ncancel_poll_seconds = 1\nheartbeat_seconds = 5\n",
                f"WatchdogSec={HANG_WATCHDOG}s\\nRestartSec=1s\\nTimeoutAbortSec=2s\\n",
            )
            start(box, HANG_UNIT)
            # the flow sleeps through the hang: it reports COMPLETED (through the proxy) after
            run_id = api.run(deployment(api, sleep=HANG_SECONDS + 25, pool=HANG_POOL))
            wait_for(
                lambda: api.state_type(run_id) == "RUNNING" and api.flow_run(run_id)["infrastructure_pid"],
                60,
                what="the hung-API test's run to be RUNNING, its pid reported",
            )
            hang = Hang(box, proxy, run_id)
            hang.start()
            yield hang
        finally:
            if hang is not None:
                hang.stop.set()
                hang.thread.join(30)
            proxy.heal()
            box.run("systemctl", "stop", HANG_UNIT, check=False, timeout=180)
            api.http.close()


def test_service_under_real_systemd(
    installed: Container, hung_api: Hang, prefect_server: PrefectServer, api: Api
) -> None:
    """(``hung_api``, first: its hang runs meanwhile, in another unit and pool.)"""
    box = installed
    # ---- the .deb is installed (``installed``); units verify
    for unit in ("flow-worker@.service", "flow-worker-drain@.service", "flow-worker-drain@.timer"):
        verify = box.run("systemd-analyze", "verify", f"/lib/systemd/system/{unit}", check=False)
        assert verify.returncode == 0, verify.stderr
    assert box.sh("getent passwd flow-worker").startswith("flow-worker:")
    assert box.sh("stat -c %a /etc/flow-worker/example.env").strip() == "600"

    # ---- configure: API on the host's loopback, a fast loop for the test, health + metrics;
    # the watchdog part of the test needs a short watchdog; everything else is the shipped unit
    port = free_port()
    configure(
        box,
        POOL,
        prefect_server.api_url,
        f"query_seconds = 1\ncancel_poll_seconds = 1\nheartbeat_seconds = 5\n"
        f"with_healthcheck = true\nwebserver_port = {port}\n",
        "WatchdogSec=5s\\nRestartSec=1s\\nTimeoutAbortSec=2s\\n",
    )

    # ---- start returns only after READY (the first sync), with a status line
    start(box, UNIT)
    assert show(box, "ActiveState") == "active"
    assert "active runs" in show(box, "StatusText")
    assert "worker.synced" in " ".join(messages(box, "-u", UNIT))
    # ---- open files: the unit's LimitNOFILE, soft and hard (capped by the container's own)
    assert show(box, "LimitNOFILE") == "65536"

    def open_files(pid: str) -> list[int]:
        limits = box.sh(f"cat /proc/{pid}/limits").splitlines()
        line = next(line for line in limits if line.startswith("Max open files"))
        return [int(n) for n in line.split()[3:5]]

    assert open_files(show(box, "MainPID")) == [min(65536, open_files("1")[1])] * 2
    # ---- the hardening is in force on the worker, so on its runs (issue 24)
    status = box.sh(f"cat /proc/{show(box, 'MainPID')}/status").splitlines()
    said = {k: v.strip() for k, v in (line.split(":", 1) for line in status)}
    assert {k: said[k] for k in ("NoNewPrivs", "Seccomp", "CapBnd", "Umask")} == {
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "CapBnd": "0000000000000000",
        "Umask": "0027",
    }

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

    # ---- the default name under systemd is "<hostname> <pool>", the same after the restart
    # below, so peers see the restarted worker as the one that owns these runs. Labels are
    # written after the start, and a run's end hands a missing one to the relabel loop,
    # which a busy server can hold up a few seconds: waited for, before the worker is frozen
    name = f"{box.sh('cat /proc/sys/kernel/hostname').strip()} {POOL}"
    label = lambda run_id: api.flow_run(run_id)["labels"].get("prefect.worker.name")  # noqa: E731
    wait_for(lambda: label(good) == name, 30, what="the worker's name in the first run's labels")

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

    # ---- the restarted worker, with the same name, labels the run it adopted
    wait_for(lambda: label(inflight) == name, 30, what="the worker's name in the adopted run's labels")
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

    # ---- the drain unit, as hardened: `flow-worker --once` runs what is due, then exits
    drain = f"flow-worker-drain@{POOL}.service"
    drained = api.run(deployment(api))
    started = box.run("systemctl", "start", drain, timeout=180, check=False)
    tail = box.run("journalctl", "-u", drain, "-n", "40", "--no-pager", check=False).stdout
    assert started.returncode == 0, f"{started.stderr}\n{tail}"
    assert api.wait_final(drained, 30)["state_type"] == "COMPLETED", tail
    assert show(box, "Result", drain) == "success"
    assert box.sh(f"stat -c %a /var/lib/flow-worker/{POOL}-drain").strip() == "700"


def test_hung_api_is_not_a_restart(hung_api: Hang, prefect_server: PrefectServer, api: Api) -> None:
    """Issue 19: the API accepts connections and never answers for 3 minutes while a run is
    in flight. No watchdog restart (with a WatchdogSec shorter than one hung call), the
    status says the API is not answering, and once it answers the run COMPLETES."""
    hang = hung_api
    hang.wait()
    box = hang.box
    story = "\n".join(
        box.run("journalctl", "-u", HANG_UNIT, "-n", "80", "--no-pager", check=False).stdout.splitlines()
    )
    # ---- never restarted: the same process all along, fed by liveness, not by API answers
    before = hang.before
    assert before["ActiveState"] == "active" and before["MainPID"] not in ("", "0")
    assert len(hang.samples) >= HANG_SECONDS / HANG_SAMPLE_SECONDS * 0.7, "sampled all along"
    for at, sample in hang.samples:
        seen = {k: sample.get(k) for k in ("NRestarts", "MainPID", "ActiveState")}
        assert seen == {k: before[k] for k in seen}, f"at {at:.0f}s into the hang: {sample}\n{story}"
    assert not any("Failed with result 'watchdog'" in m for m in messages(box, "-u", HANG_UNIT)), story
    # ---- systemd says the API hangs, for as long as it does
    said = [(at, s["StatusText"]) for at, s in hang.samples if at >= 30]
    assert said and all("API NOT ANSWERING for" in text for _, text in said), said
    last = int(said[-1][1].split("API NOT ANSWERING for ")[1].split("s")[0])
    assert last >= said[-1][0] - 30, said[-1]  # counted from the hang's start, give or take a poll
    assert "API NOT ANSWERING" in hang.status_text, hang.status_text
    print(f"{said[-1][0]:.0f}s into the hang, systemctl status said: {said[-1][1]}")
    # ---- a WARNING, not an error; then the API is back
    warnings = journal(box, "-u", HANG_UNIT, "-p", "warning")
    assert any(e.get("FLOW_WORKER_EVENT") == "api.unavailable" for e in warnings), story
    assert not [e for e in warnings if e.get("FLOW_WORKER_EVENT") == "worker.hung"], story
    wait_for(
        lambda: any(e.get("FLOW_WORKER_EVENT") == "api.recovered" for e in journal(box, "-u", HANG_UNIT)),
        60,
        what="the worker to find the API back",
    )
    # ---- the flow that was running when the API hung completes
    assert api.wait_final(hang.run_id, 120)["state_type"] == "COMPLETED", story
    assert show(box, "NRestarts", HANG_UNIT) == before["NRestarts"]
    assert show(box, "MainPID", HANG_UNIT) == before["MainPID"]


@pytest.mark.parametrize("unit", ["flow-worker@.service", "flow-worker-drain@.service"])
def test_units_are_hardened(installed: Container, unit: str) -> None:
    """Issue 24: ``systemd-analyze security --offline=yes`` rates each installed unit at most
    EXPOSURE_MAX (7.7 and 8.6 before), with the container's systemd: bookworm's 252, the
    one the package is built for. A failure lists the exposed settings."""
    path = f"/lib/systemd/system/{unit}"
    out = installed.run("systemd-analyze", "security", "--offline=yes", "--no-pager", path, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) ", out.stdout)
    assert out.returncode == 0 and found, out.stdout + out.stderr
    exposed = "\n".join(line for line in out.stdout.splitlines() if re.search(r" \d\.\d$", line))
    print(f"{unit}: {found.group(1)}")
    assert float(found.group(1)) <= EXPOSURE_MAX, f"{unit} rated {found.group(1)}:\n{exposed}"
