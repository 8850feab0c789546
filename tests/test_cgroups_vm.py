"""flow-worker as a system service in a VM: systemd as PID 1, a pure cgroup v2 hierarchy,
each run in a cgroup of its own (issue 23).

One VM is booted for the module (``tests/vm.py``); the ``.deb`` built from this checkout is
installed in it with apt, as in the nspawn test (``tests/test_systemd.py``); one
``flow-worker@vm`` unit (the shipped unit: ``Delegate=yes``) serves pool ``vm`` of the
session's Prefect server on the host, which the guest reaches at ``10.0.2.100:4200``
(qemu's ``guestfwd``; nothing else of the host). The tests run in order against that one
worker, each starting its runs together to keep the VM's minutes few; flow runs are the
stdlib "fake engine" (``tests/flows/fake_engine.py``) and ``tests/flows/vm_flows.py``
(allocate, spin, fork, leave daemons), so the guest needs no prefect.

Root only, like the nspawn test: skipped elsewhere with the reason, and in CI a skip fails the run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pytest

from tests.conftest import FLOWS, Api, PrefectServer, wait_for
from tests.vm import Vm, build_deb, why_not_available

POOL: Final = "vm"
UNIT: Final = f"flow-worker@{POOL}.service"
API_PORT: Final = 4200
"""The guest's port for the Prefect API (at 10.0.2.100), relayed to the session's server."""
CONTROLLERS: Final = {"memory", "pids", "cpu"}
"""What issue 23 delegates to the unit: a run's memory, process and CPU limits."""
MIB: Final = 1 << 20
GRACE: Final = 3
"""``cancel_grace_seconds`` of the VM's worker: SIGTERM, then SIGKILL and cgroup.kill."""
SETTINGS: Final = (
    "query_seconds = 1",
    "cancel_poll_seconds = 1",
    "heartbeat_seconds = 5",
    f"cancel_grace_seconds = {GRACE}",
)
"""The VM worker's ``/etc/flow-worker/vm.toml`` (:func:`configure`)."""


@contextlib.contextmanager
def installed_vm(server: PrefectServer) -> Iterator[Vm]:
    """A booted VM with the ``.deb`` built from this checkout installed (with apt, from the
    payload disk), the guest reaching ``server`` at :data:`API_PORT`; shut down on exit,
    saying how long each step took. Also used by ``bench/cgroups_vm.py``."""
    work = Path(tempfile.mkdtemp(prefix="flow-worker-vm-"))
    payload = work / "payload"
    payload.mkdir()
    t0 = time.monotonic()
    build_deb(payload / "flow-worker.deb")
    for flow in ("fake_engine.py", "vm_flows.py"):
        shutil.copy(FLOWS / flow, payload / flow)
    box = Vm(work, forwards={API_PORT: server.port}, payload=payload)
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


@pytest.fixture(scope="module")
def vm(prefect_server: PrefectServer) -> Iterator[Vm]:
    """The booted VM with the ``.deb`` installed (:func:`installed_vm`)."""
    reason = why_not_available()
    if reason:
        pytest.skip(f"VM tests: {reason}")
    with installed_vm(prefect_server) as box:
        yield box


def configure(box: Vm, settings: Sequence[str] = SETTINGS, pool: str = POOL) -> None:
    """The pool's secrets file (the API's URL as the guest reaches it) and its settings
    (``/etc/flow-worker/POOL.toml``, TOML lines), read by the unit at its next start."""
    env_file, toml = f"/etc/flow-worker/{pool}.env", f"/etc/flow-worker/{pool}.toml"
    box.sh(f"printf 'PREFECT_API_URL={box.url(API_PORT, '/api')}\\n' > {env_file} && chmod 600 {env_file}")
    box.sh(f"printf '%s\\n' {' '.join(repr(s) for s in settings)} > {toml}")


def show(box: Vm, prop: str, unit: str = UNIT) -> str:
    return box.run("systemctl", "show", "-P", prop, unit).stdout.strip()


def start(box: Vm, unit: str) -> None:
    """``systemctl start``, which returns after READY; the unit's log if it does not."""
    started = box.run("systemctl", "start", unit, timeout=180, check=False)
    assert started.returncode == 0, f"{unit} did not start: {started.stderr}\n{tail(box)}"


def tail(box: Vm, lines: int = 60, unit: str = UNIT) -> str:
    return box.run("journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat", check=False).stdout


def journal(box: Vm, run_id: str) -> list[dict[str, Any]]:
    """The worker's journal entries about one run (its events and its output lines), from
    whichever unit ran it (a run's id is its own: the bench runs two units)."""
    out = box.run("journalctl", "-o", "json", "--no-pager", f"FLOW_RUN_ID={run_id}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def said(box: Vm, run_id: str, key: str) -> list[str]:
    """The values of the run's ``KEY value`` output lines (``vm_flows.py``) so far."""
    found = []
    for entry in journal(box, run_id):
        message = entry.get("MESSAGE")
        if entry.get("FLOW_WORKER_EVENT") == "run.output" and isinstance(message, str):
            if message.startswith(f"{key} "):
                found.append(message.split(" ", 1)[1])
    return found


def first_said(box: Vm, run_id: str, key: str, timeout: float = 60) -> str:
    """The run's first ``KEY value`` line, once the worker has followed it into the journal
    (a run reports its own state, so the API may say it is done before that)."""
    found: list[str] = wait_for(lambda: said(box, run_id, key), timeout, 0.5, what=f"{key} of run {run_id}")
    return found[0]


def event(box: Vm, run_id: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """The worker's last ``name`` event about the run, once it is in the journal (the API
    may know the run's end before the worker has said it)."""

    def found() -> list[dict[str, Any]]:
        return [e for e in journal(box, run_id) if e.get("FLOW_WORKER_EVENT") == name]

    try:
        entries: list[dict[str, Any]] = wait_for(found, timeout, 0.5, what=f"{name} of run {run_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the worker's journal:\n{tail(box)}") from None
    return entries[-1]


def the_unit(box: Vm) -> str:
    """The unit's cgroup directory, quoted for ``sh`` (systemd escapes ``-`` as ``\\x2d``)."""
    return f"'/sys/fs/cgroup{show(box, 'ControlGroup')}'"


def flow_worker_processes(box: Vm, user: str = "flow-worker") -> dict[int, str]:
    """pid → command name of every process of ``user`` (the guest has no ps)."""
    out = box.sh(
        f'for p in /proc/[0-9]*; do [ "$(stat -c %U $p 2>/dev/null)" = {user} ] && '
        'echo "${p#/proc/} $(cat $p/comm 2>/dev/null)"; done; true'
    )
    return {int(line.split()[0]): line.split(maxsplit=1)[1] for line in out.splitlines() if " " in line}


def run_cgroups(box: Vm) -> list[str]:
    return box.sh(f"cd {the_unit(box)} && ls -d run-* 2>/dev/null; true").split()


def only_the_worker_left(box: Vm) -> bool:
    """Nothing of any run: no run cgroup, and the user's processes are the worker and its
    dead man's switch (``sh`` waiting on ``cat``)."""
    left = flow_worker_processes(box)
    main = int(show(box, "MainPID"))
    return not run_cgroups(box) and main in left and set(left.values()) <= {"flow-worker", "sh", "cat"}


class Flows:
    """Deployments of the VM's flows (one per command and limits)."""

    def __init__(self, api: Api, pool: str = POOL) -> None:
        self.api, self.pool = api, pool

    def run(self, args: str, **job_variables: Any) -> str:
        command = f"/usr/bin/python3 /opt/payload/vm_flows.py {args}"
        return self.api.run(
            self.api.deployment(self.pool, job_variables={"command": command, **job_variables})
        )

    def engine(self, sleep: float) -> str:
        env = {"FAKE_ENGINE_SLEEP": str(sleep)}
        command = "/usr/bin/python3 /opt/payload/fake_engine.py"
        return self.api.run(self.api.deployment(self.pool, job_variables={"command": command, "env": env}))

    def cancel(self, run_id: str) -> None:
        self.api.cancel(run_id)

    def running(self, box: Vm, run_id: str, key: str | None = None) -> None:
        def ready() -> bool:
            if self.api.state_type(run_id) != "RUNNING":
                return False
            return key is None or bool(said(box, run_id, key))

        wait_for(ready, 120, 0.5, what=f"run {run_id} RUNNING" + (f", {key} said" if key else ""))


def test_worker_unit_delegated_cgroup_v2(vm: Vm, api: Api) -> None:
    box = vm
    # ---- systemd is PID 1 of a pure cgroup v2 hierarchy, with the controllers of issue 23
    assert box.sh("cat /proc/1/comm").strip() == "systemd"
    assert box.sh("stat -fc %T /sys/fs/cgroup").strip() == "cgroup2fs"
    assert box.sh("awk '$3 == \"cgroup\"' /proc/mounts") == "", "a cgroup v1 hierarchy is mounted"
    assert CONTROLLERS <= set(box.sh("cat /sys/fs/cgroup/cgroup.controllers").split())

    # ---- the pool's settings as in the nspawn test; the shipped unit delegates its cgroup
    configure(box)
    start(box, UNIT)
    assert show(box, "ActiveState") == "active"
    assert show(box, "Delegate") == "yes"

    # ---- the worker moved itself into <unit>/worker and turned the controllers on for its runs
    cgroup = show(box, "ControlGroup")
    assert cgroup.endswith(f"/{UNIT}"), cgroup
    path = the_unit(box)
    worker_pid = show(box, "MainPID")
    assert box.sh(f"cat /proc/{worker_pid}/cgroup").strip() == f"0::{cgroup}/worker"
    assert box.sh(f"cat {path}/cgroup.procs").strip() == "", "no process in the unit's cgroup itself"
    assert set(box.sh(f"cat {path}/cgroup.subtree_control").split()) == CONTROLLERS
    assert (
        box.sh(f"stat -c %U {path} {path}/cgroup.procs {path}/cgroup.subtree_control").split()
        == ["flow-worker"] * 3
    )
    journal_text = box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    assert journal_text.count("cgroups.on ") == 1 and "cgroups.off" not in journal_text

    # ---- a flow run through the worker in the VM, its process in its own cgroup
    flows = Flows(api)
    run_id = flows.engine(8)  # long enough to be seen running
    running = wait_for(
        lambda: (r := api.flow_run(run_id))["state_type"] == "RUNNING" and r["infrastructure_pid"] and r,
        120,
        what="the run to be RUNNING in the VM, its pid reported",
    )
    run_cgroup = box.sh(f"cat /proc/{running['infrastructure_pid']}/cgroup", check=False).strip()
    assert run_cgroup == f"0::{cgroup}/run-{run_id}", run_cgroup
    assert api.wait_final(run_id, 120)["state_type"] == "COMPLETED", tail(box)
    assert f"fake engine ran {run_id}" in box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    wait_for(lambda: only_the_worker_left(box), 30, what="the run's cgroup removed")


def test_a_run_past_its_memory_max_is_crashed_out_of_memory_and_nothing_else(vm: Vm, api: Api) -> None:
    """memory_max 256M, 600 MiB allocated: CRASHED "out of memory", its memory.peak
    reported; the run beside it COMPLETED; the worker untouched. And a run holding 300 MiB:
    its peak from memory.peak within 5 % of its own VmHWM."""
    box, flows = vm, Flows(api)
    main, restarts = show(box, "MainPID"), show(box, "NRestarts")
    oom = flows.run("oom 600", memory_max="256M")
    beside = flows.engine(3)
    held = flows.run("hold 300 1")
    assert api.wait_final(beside, 180)["state_type"] == "COMPLETED", tail(box)
    crashed = api.wait_final(oom, 180)
    assert crashed["state_type"] == "CRASHED", (crashed["state"], tail(box))
    assert crashed["state"]["message"].startswith("out of memory: the run reached memory_max 256M (peak 25")
    exited = event(box, oom, "run.exited")
    assert exited["RETURNCODE"] == "-9" and 250 <= float(exited["PEAK_MEMORY_MIB"]) <= 256.5, exited
    assert api.wait_final(held, 180)["state_type"] == "COMPLETED", tail(box)
    hwm = int(first_said(box, held, "VMHWM")) * 1024
    peak = float(event(box, held, "run.exited")["PEAK_MEMORY_MIB"]) * MIB
    assert abs(peak - hwm) <= 0.05 * hwm, f"memory.peak {peak / MIB:.1f} MiB, VmHWM {hwm / MIB:.1f} MiB"
    assert (show(box, "MainPID"), show(box, "NRestarts")) == (main, restarts), "the worker is untouched"
    wait_for(lambda: only_the_worker_left(box), 30, what="the runs' cgroups removed")


def test_cpu_and_pids_limits_and_nothing_a_run_leaves_survives_it(vm: Vm, api: Api) -> None:
    """cpu_max 50%: a 10 s busy loop takes at most 55 % of a CPU (its cgroup's cpu.stat).
    pids_max 64: a bounded fork bomb is held at 64 tasks while the runs beside it complete.
    A double-forked daemon (new session, empty environment) and a `nohup sleep 1000 &`
    are gone when their run ends, and when their run is cancelled; so are the cgroups."""
    box, flows = vm, Flows(api)
    main = show(box, "MainPID")
    busy = flows.run("busy 10", cpu_max="50%")
    bomb = flows.run("forks 200", pids_max=64)
    ended = [flows.run("daemon 1"), flows.run("nohup 1")]
    cancelled = [flows.run("daemon 600"), flows.run("nohup 600")]

    # ---- the busy run's CPU over 5 s of its loop, from its cgroup (read in the guest)
    flows.running(box, busy)
    stat = f"{the_unit(box)}/run-{busy}/cpu.stat"
    usage = f"awk '/^usage_usec/ {{print $2}}' {stat}"
    sample = box.sh(
        f"sleep 2; u0=$({usage}); t0=$(date +%s%N); sleep 5; u1=$({usage}); t1=$(date +%s%N); "
        "echo $((u1 - u0)) $(((t1 - t0) / 1000))"
    ).split()
    share = int(sample[0]) / int(sample[1])
    assert 0 < share <= 0.55, f"the busy run took {share:.0%} of a CPU"

    # ---- the leftovers of runs that end, and of runs cancelled once their leftovers are there
    flows.running(box, cancelled[0])
    flows.running(box, cancelled[1], "NOHUP")
    wait_for(lambda: len(box.sh(f"cat {the_unit(box)}/run-{cancelled[0]}/cgroup.procs").split()) == 2, 60)
    for run_id in cancelled:
        flows.cancel(run_id)
    for run_id in cancelled:
        assert api.wait_final(run_id, 120)["state_type"] == "CANCELLED", tail(box)
    for run_id in [busy, bomb, *ended]:
        assert api.wait_final(run_id, 180)["state_type"] == "COMPLETED", tail(box)
    # what outlived its run's main process: killed by cgroup.kill (a cancelled run's nohup'ed
    # sleep is in its process group, so the group's SIGTERM ended it already)
    for run_id in [*ended, cancelled[0]]:
        swept = event(box, run_id, "run.swept")
        assert swept["VIA"] == "cgroup.kill" and swept["PIDS"], swept
    wall, cpu = map(float, first_said(box, busy, "BUSY").split())
    assert wall >= 10 and cpu <= 0.55 * wall, (wall, cpu)
    forked, refused = int(first_said(box, bomb, "FORKED")), int(first_said(box, bomb, "REFUSED"))
    assert forked <= 63 and refused >= 137, (forked, refused)  # 64 tasks: the flow and 63 children
    wait_for(lambda: only_the_worker_left(box), 30, what="every leftover process and cgroup gone")
    assert show(box, "MainPID") == main and show(box, "NRestarts") == "0"


def test_a_worker_killed_outright_comes_back_adopts_its_runs_by_their_cgroups(vm: Vm, api: Api) -> None:
    """SIGKILL to the worker: systemd restarts it (the dead man's switch turned the unit's
    controllers off, so the new main process may enter the unit's cgroup); the runs are
    still in their cgroups, adopted (limits re-applied from the ledger), then cancelled:
    one ignores SIGTERM and ends by SIGKILL and cgroup.kill, the other's daemon by
    cgroup.kill; nothing is left."""
    box, flows = vm, Flows(api)
    stubborn = flows.run("stubborn 600", memory_max="300M", pids_max=50)
    daemon = flows.run("daemon 600")
    flows.running(box, stubborn)
    flows.running(box, daemon)
    path = the_unit(box)
    wait_for(lambda: len(box.sh(f"cat {path}/run-{daemon}/cgroup.procs").split()) == 2, 60)
    before = {
        run_id: box.sh(f"cat {path}/run-{run_id}/cgroup.procs").split() for run_id in (stubborn, daemon)
    }
    main = show(box, "MainPID")

    box.run("systemctl", "kill", "-s", "SIGKILL", "--kill-whom=main", UNIT)
    wait_for(
        lambda: show(box, "ActiveState") == "active" and show(box, "MainPID") not in ("0", main),
        120,
        0.5,
        what="systemd to restart the worker",
    )
    assert show(box, "NRestarts") == "1"
    for run_id in (stubborn, daemon):
        assert box.sh(f"cat {path}/run-{run_id}/cgroup.procs").split() == before[run_id], (
            "still in its cgroup"
        )
        adopted = event(box, run_id, "run.adopted")
        assert adopted["CGROUP"] == f"run-{run_id}", adopted
    assert box.sh(f"cat {path}/run-{stubborn}/memory.max {path}/run-{stubborn}/pids.max").split() == [
        str(300 * MIB),
        "50",
    ], "limits applied again"
    assert set(box.sh(f"cat {path}/cgroup.subtree_control").split()) == CONTROLLERS

    for run_id in (stubborn, daemon):
        flows.cancel(run_id)
    for run_id in (stubborn, daemon):
        assert api.wait_final(run_id, 120)["state_type"] == "CANCELLED", tail(box)
    assert event(box, stubborn, "run.killing")  # SIGTERM ignored: SIGKILL and cgroup.kill after the grace
    assert event(box, daemon, "run.swept")["VIA"] == "cgroup.kill"
    wait_for(lambda: only_the_worker_left(box), 30, what="nothing of the adopted runs left")


def test_a_clean_stop(vm: Vm) -> None:
    box = vm
    path = the_unit(box)
    box.run("systemctl", "stop", UNIT, timeout=180)
    assert show(box, "Result") == "success"
    assert show(box, "ActiveState") == "inactive"
    assert box.sh(f"test -d {path} || echo removed").strip() == "removed", "the unit's cgroup is removed"
