"""flow-worker as a system service in a VM: systemd as PID 1, a pure cgroup v2 hierarchy (issue 23).

One VM is booted for the module (``tests/vm.py``); the ``.deb`` built from this checkout is
installed in it with apt, as in the nspawn test (``tests/test_systemd.py``); the worker serves
pool ``vm`` of the session's Prefect server on the host, which the guest reaches at
``10.0.2.100:4200`` (qemu's ``guestfwd``; nothing else of the host). Flow runs use the stdlib
"fake engine" (``tests/flows/fake_engine.py``), so the guest needs no prefect.

Root only, like the nspawn test: skipped elsewhere with the reason, and in CI a skip fails the run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.conftest import FLOWS, Api, PrefectServer, wait_for
from tests.test_systemd import deployment
from tests.vm import Vm, build_deb, why_not_available

POOL: Final = "vm"
UNIT: Final = f"flow-worker@{POOL}.service"
API_PORT: Final = 4200
"""The guest's port for the Prefect API (at 10.0.2.100), relayed to the session's server."""
CONTROLLERS: Final = {"memory", "pids", "cpu"}
"""What issue 23 delegates to the unit: a run's memory, process and CPU limits."""


@pytest.fixture(scope="module")
def vm(prefect_server: PrefectServer) -> Iterator[Vm]:
    """The booted VM with the ``.deb`` installed (with apt, from the payload disk)."""
    reason = why_not_available()
    if reason:
        pytest.skip(f"VM tests: {reason}")
    work = Path(tempfile.mkdtemp(prefix="flow-worker-vm-"))
    payload = work / "payload"
    payload.mkdir()
    t0 = time.monotonic()
    build_deb(payload / "flow-worker.deb")
    shutil.copy(FLOWS / "fake_engine.py", payload / "fake_engine.py")
    box = Vm(work, forwards={API_PORT: prefect_server.port}, payload=payload)
    box.timings["build-deb"] = time.monotonic() - t0
    try:
        box.boot()
        t0 = time.monotonic()
        box.run("apt-get", "install", "-y", "-q", "/opt/payload/flow-worker.deb", timeout=600)
        box.timings["install"] = time.monotonic() - t0
        yield box
    finally:
        box.shutdown()
        said = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in box.timings.items())
        print(f"VM ({box.accel}, {box.cpus} vCPUs, {box.state or 'not booted'}): {said}")
        shutil.rmtree(work, ignore_errors=True)


def show(box: Vm, prop: str, unit: str = UNIT) -> str:
    return box.run("systemctl", "show", "-P", prop, unit).stdout.strip()


def start(box: Vm, unit: str) -> None:
    """``systemctl start``, which returns after READY; the unit's log if it does not."""
    started = box.run("systemctl", "start", unit, timeout=180, check=False)
    tail = box.run("journalctl", "-u", unit, "-n", "60", "--no-pager", check=False).stdout
    assert started.returncode == 0, f"{unit} did not start: {started.stderr}\n{tail}"


def test_worker_unit_delegated_cgroup_v2(vm: Vm, api: Api) -> None:
    box = vm
    # ---- systemd is PID 1 of a pure cgroup v2 hierarchy, with the controllers of issue 23
    assert box.sh("cat /proc/1/comm").strip() == "systemd"
    assert box.sh("stat -fc %T /sys/fs/cgroup").strip() == "cgroup2fs"
    assert box.sh("awk '$3 == \"cgroup\"' /proc/mounts") == "", "a cgroup v1 hierarchy is mounted"
    assert CONTROLLERS <= set(box.sh("cat /sys/fs/cgroup/cgroup.controllers").split())

    # ---- the pool's settings as in the nspawn test; Delegate=yes by a drop-in (the shipped
    # unit will carry it with issue 23)
    env_file, toml = f"/etc/flow-worker/{POOL}.env", f"/etc/flow-worker/{POOL}.toml"
    box.sh(f"printf 'PREFECT_API_URL={box.url(API_PORT, '/api')}\\n' > {env_file} && chmod 600 {env_file}")
    box.sh(f"printf 'query_seconds = 1\\ncancel_poll_seconds = 1\\nheartbeat_seconds = 5\\n' > {toml}")
    box.sh(
        f"mkdir -p /etc/systemd/system/{UNIT}.d && "
        f"printf '[Service]\\nDelegate=yes\\n' > /etc/systemd/system/{UNIT}.d/delegate.conf && "
        "systemctl daemon-reload"
    )
    start(box, UNIT)
    assert show(box, "ActiveState") == "active"
    assert show(box, "Delegate") == "yes"

    # ---- the unit's cgroup: the worker in it, the controllers there to delegate, owned by
    # the unit's user (so the worker may make its runs' cgroups below it)
    cgroup = show(box, "ControlGroup")
    assert cgroup.endswith(f"/{UNIT}"), cgroup
    worker_pid = show(box, "MainPID")
    assert box.sh(f"cat /proc/{worker_pid}/cgroup").strip() == f"0::{cgroup}"
    path = f"/sys/fs/cgroup{cgroup}"
    assert CONTROLLERS <= set(box.sh(f"cat '{path}/cgroup.controllers'").split())
    assert (
        box.sh(f"stat -c %U '{path}' '{path}/cgroup.procs' '{path}/cgroup.subtree_control'").split()
        == ["flow-worker"] * 3
    )

    # ---- a flow run through the worker in the VM, its process in the unit's cgroup
    run_id = api.run(deployment(api, sleep=8, pool=POOL))  # long enough to be seen running
    running = wait_for(
        lambda: (r := api.flow_run(run_id))["state_type"] == "RUNNING" and r["infrastructure_pid"] and r,
        120,
        what="the run to be RUNNING in the VM, its pid reported",
    )
    run_cgroup = box.sh(f"cat /proc/{running['infrastructure_pid']}/cgroup", check=False).strip()
    assert run_cgroup.startswith(f"0::{cgroup}"), run_cgroup
    tail = box.run("journalctl", "-u", UNIT, "-n", "40", "--no-pager", check=False).stdout
    assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED", tail
    assert f"fake engine ran {run_id}" in box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout

    # ---- a clean stop
    box.run("systemctl", "stop", UNIT, timeout=180)
    assert show(box, "Result") == "success"
    assert show(box, "ActiveState") == "inactive"
