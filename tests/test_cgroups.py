"""Per-run cgroups (issue 23) on this machine: the detection and its one-line fallback, the
worker's move into its leaf and a run's limits on a stand-in tree of plain files, and, on
the kernel's own cgroup v2 hierarchy, a run started inside its cgroup through the exec
wrapper, killed through it, accounted and removed.

This host is cgroup v1 hybrid (no controllers on its v2 hierarchy), so limits are tested
in the VM (``tests/test_cgroups_vm.py``); what v2 does without controllers (placement,
``cgroup.kill``, ``cgroup.events``, ``cpu.stat``) is tested here, in a cgroup made for the
test under the v2 mount (root only: skipped with the reason elsewhere).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from structlog.testing import capture_logs

from tests.said import Said
from worker.process import delegated, placed, reaper
from worker.process.cgroups import Cgroups, RunCgroup
from worker.process.delegated import Off
from worker.process.handle import StartError
from worker.process.spawned import RunHandle
from worker.rules.job import ProcessJobConfiguration
from worker.rules.runlimits import RunLimits

HYBRID = "12:pids:/\n4:memory:/x\n1:name=systemd:/\n0::/\n"


# ---------------------------------------------------------------- detection (stand-in trees)


def tree(root: Path, path: str, controllers: str = "cpu io memory pids", *children: str) -> Path:
    """A stand-in for a unit's cgroup: plain files named as the kernel's (a cgroup's files
    exist as it is made: here, in ``children`` made beforehand, the memory and pids ones)."""
    base = root / path.lstrip("/")
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        (base / name).write_text("")
    for child in children:
        (base / child).mkdir()
        for name in ("cgroup.procs", "memory.max", "memory.oom.group", "pids.max"):
            (base / child / name).write_text("")
    return base


def test_only_a_pure_v2_hierarchy_will_do() -> None:
    with pytest.raises(Off, match="cgroup v1 hierarchy is in use"):
        delegated.own_cgroup(HYBRID)
    assert (
        delegated.own_cgroup("0::/system.slice/flow-worker@p.service\n")
        == "/system.slice/flow-worker@p.service"
    )


def test_detect_names_what_is_missing(tmp_path: Path) -> None:
    unit = "/system.slice/flow-worker@p.service"
    text = f"0::{unit}\n"
    with pytest.raises(Off, match="not a systemd service"):
        delegated.detect(text, service=False, root=tmp_path)
    with pytest.raises(Off, match="root cgroup"):
        delegated.detect("0::/\n", root=tmp_path)
    with pytest.raises(Off, match="no cgroup v2 hierarchy"):
        delegated.detect(text, root=tmp_path)
    base = tree(tmp_path, unit, "cpuset cpu io memory hugetlb pids rdma misc")
    with pytest.raises(Off, match=r"not delegated to it \(Delegate=yes"):
        delegated.detect(text, root=tmp_path, uid=os.geteuid() + 4242)  # owned by someone else
    if os.geteuid() != 0:
        assert delegated.detect(text, root=tmp_path) == (base, frozenset({"cpu", "memory", "pids"}))
    with pytest.raises(Off, match="not delegated"):  # root: only systemd's mark says it is ours
        delegated.detect(text, root=tmp_path, uid=0)


def test_setup_moves_the_worker_into_its_leaf_and_enables_the_controllers(tmp_path: Path) -> None:
    base = tree(tmp_path, "/system.slice/u.service", "cpu io memory pids", "worker")
    delegated.move_in(base, me=4242)
    assert (base / "worker" / "cgroup.procs").read_text() == "4242"
    enabled = delegated.enable(base, frozenset({"cpu", "memory", "pids"}))
    assert (base / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert enabled == {"cpu", "memory", "pids"}


async def test_the_switch_turns_the_controllers_off_once_the_worker_is_gone(tmp_path: Path) -> None:
    """However the worker ends, its end of the switch's pipe closes: the switch turns the
    unit's controllers off (one write per controller; the stand-in file keeps the last)."""
    base = tree(tmp_path, "/u.service")
    (base / "cgroup.subtree_control").write_text("cpu memory pids\n")
    switch = delegated.Switch()
    switch.arm(base)
    assert switch.process is not None and switch.process.stdin is not None
    with trio.move_on_after(0.3):
        await switch.watch(base)  # armed: nothing happens while the worker lives
    assert switch.process.poll() is None
    assert (base / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    switch.process.stdin.close()  # as the worker's exit does
    assert switch.process.wait(10) == 0
    reaper.CHILDREN.spawned.discard(switch.process.pid)
    assert (base / "cgroup.subtree_control").read_text() == "-pids"


def test_a_runs_limits_are_written_and_what_cannot_be_is_said(tmp_path: Path) -> None:
    base = tree(tmp_path, "/u.service", "memory pids", "run-abc")
    on = Cgroups(unit=base, controllers=frozenset({"memory", "pids"}))  # no cpu delegated
    said = Said()
    limits = RunLimits.parse({"memory_max": "256M", "pids_max": 64, "cpu_max": "50%"})
    made = on.make("abc", limits, said)
    assert made is not None and made.path == base / "run-abc"
    assert (made.path / "memory.max").read_text() == str(256 << 20)
    assert (made.path / "pids.max").read_text() == "64"
    assert (made.path / "memory.oom.group").read_text() == "1"
    assert not (made.path / "cpu.max").exists()
    (refused,) = said.of("run.limits_not_applied")
    assert refused["limits"] == "cpu_max=50%" and "cpu controller is not delegated" in refused["reason"]
    assert on.found().keys() == {"abc"}


def test_off_says_why_for_each_run_with_limits() -> None:
    off = Cgroups(reason="a cgroup v1 hierarchy is in use")
    said = Said()
    assert off.make("abc", RunLimits.parse({"memory_max": "1G"}), said) is None
    (line,) = said.of("run.limits_not_applied")
    assert line == {
        "limits": "memory_max=1G",
        "reason": "a cgroup v1 hierarchy is in use",
        "effect": "the run goes on without them",
    }
    said = Said()
    off.make("abc", RunLimits(), said)
    assert said.events == [], "a run without limits: nothing to say"


def test_off_on_this_host_in_one_line() -> None:
    """The fallback, said once, in one line naming why (here: the hybrid hierarchy)."""
    text = Path("/proc/self/cgroup").read_text()
    with capture_logs() as logs:
        found = Cgroups.start(enabled=True, service=False)
    assert not found.on
    (line,) = [entry for entry in logs if entry["event"].startswith("cgroups.")]
    assert line["event"] == "cgroups.off" and line["reason"] == found.reason
    if any(not row.startswith("0::") for row in text.splitlines() if row):
        assert line["reason"].startswith("a cgroup v1 hierarchy is in use")
    with capture_logs() as logs:
        assert Cgroups.start(enabled=False).reason == "turned off (cgroups = false)"
    assert [entry["event"] for entry in logs] == ["cgroups.off"]


# ---------------------------------------------------------------- the kernel's cgroup v2


def v2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@pytest.fixture
def unit() -> Iterator[Path]:
    """A cgroup made for the test under the v2 hierarchy, playing the unit's delegated one.
    Whatever the test left in it is killed and removed."""
    mount = v2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("needs a writable cgroup v2 hierarchy (root)")
    base = mount / f"flow-worker-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        yield base
    finally:
        _remove(base)


def _remove(base: Path) -> None:
    """Kill what is in ``base`` and below, and remove them (polled, 10 s at most)."""
    for child in [p for p in base.iterdir() if p.is_dir()]:
        _remove(child)
    deadline = time.monotonic() + 10
    while base.exists():
        RunCgroup(base).kill()
        try:
            base.rmdir()
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def handle(unit: Path, command: str, grace: float = 5.0, **cfg: Any) -> tuple[RunHandle, Said]:
    config = ProcessJobConfiguration(command=command, env=dict(os.environ), **cfg)
    log = Said()
    run = RunHandle(
        f"test-{uuid.uuid4().hex[:8]}",
        log,
        grace=grace,
        config=config,
        output_dir=Path(tempfile.mkdtemp()),
        cgroups=Cgroups(unit=unit),
    )
    return run, log


def alive(pid: int) -> bool:
    facts = reaper.process_facts(pid)
    return facts is not None and facts.state != "Z"


async def test_a_run_starts_in_its_cgroup_and_leaves_nothing_behind(unit: Path, tmp_path: Path) -> None:
    """The command's first instruction already runs in the run's cgroup; what it leaves
    (a daemon in a new session with a scrubbed environment, a nohup'ed sleep) is killed
    when it exits; its CPU is counted; the cgroup is removed."""
    seen, pids = tmp_path / "cgroup", tmp_path / "pids"
    script = (
        f"cat /proc/self/cgroup > {seen}; "
        f"setsid env -i sh -c 'echo $$ >> {pids}; exec sleep 1000' & "
        f"nohup sleep 1000 >/dev/null 2>&1 & echo $! >> {pids}; "
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
        f"while [ $(wc -l < {pids}) -lt 2 ]; do sleep 0.05; done"
    )
    run, log = handle(unit, f"sh -c {json.dumps(script)}")
    await run.start()
    assert run.cgroup is not None
    path = run.cgroup.path
    assert await run.wait() == 0
    assert seen.read_text().splitlines()[-1] == f"0::/{unit.name}/run-{run.run_id}"
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 2 and not any(alive(pid) for pid in left), "cgroup.kill took them"
    assert not path.exists(), "the cgroup is removed once empty"
    assert log.of("run.swept")[0]["via"] == "cgroup.kill"
    assert run.figures is not None and run.figures.cpu_seconds and run.figures.cpu_seconds > 0


async def test_the_command_gets_exactly_its_argv_and_environment(unit: Path, tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    code = (
        "import json, os, sys; "
        "ign = next(l for l in open('/proc/self/status') if l.startswith('SigIgn')); "
        f"json.dump([sys.argv[1:], dict(os.environ), ign], open({str(out)!r}, 'w'))"
    )
    env: dict[str, str | None] = {
        "PATH": os.environ["PATH"],
        "ODD": "a=b c\t'\"",
        "EMPTY": "",
        "UNICODE": "żółw ✓",
    }
    config = ProcessJobConfiguration(
        command=f"{sys.executable} -c {json.dumps(code)} one 'two words'", env=env, command_configured=True
    )  # configured: a default engine command would also get Prefect's PYTHONPATH (launch.py)
    run = RunHandle("argv", Said(), config=config, cgroups=Cgroups(unit=unit))
    await run.start()
    assert await run.wait() == 0
    argv, seen_env, ignored = json.loads(out.read_text())
    assert argv == ["one", "two words"]
    assert {k: v for k, v in seen_env.items() if k != "LC_CTYPE"} == env
    plain = subprocess.run(
        [sys.executable, "-c", "print(next(l for l in open('/proc/self/status') if l.startswith('SigIgn')))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ignored.strip() == plain.strip(), "the same signals ignored as a plain spawn (SIGPIPE restored)"


async def test_an_exec_that_fails_is_a_start_error_and_leaves_nothing(unit: Path, tmp_path: Path) -> None:
    run, _ = handle(unit, "no-such-binary-xyz arg")
    with pytest.raises(StartError, match="command not found: 'no-such-binary-xyz'"):
        await run.start()
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    run, _ = handle(unit, str(script))
    with pytest.raises(StartError, match="not executable"):
        await run.start()
    assert [p.name for p in unit.iterdir() if p.is_dir()] == [], "no cgroup left"


async def test_the_true_exit_status_and_a_cancel_that_ends_every_session(unit: Path, tmp_path: Path) -> None:
    run, _ = handle(unit, "sh -c 'exit 3'")
    await run.start()
    assert await run.wait() == 3
    pidfile = tmp_path / "daemon"
    stubborn = f"setsid sh -c 'trap \"\" TERM; echo $$ > {pidfile}; while :; do sleep 1; done' & wait"
    run, _ = handle(unit, f"sh -c {json.dumps(stubborn)}", grace=0.5)
    await run.start()
    async with trio.open_nursery() as nursery:
        status: list[int | None] = []

        async def waiter() -> None:
            status.append(await run.wait())

        nursery.start_soon(waiter)
        with trio.fail_after(10):
            while not pidfile.exists() or not pidfile.read_text().strip():
                await trio.sleep(0.05)
        run.cancel("test")
    daemon = int(pidfile.read_text())
    assert status == [-signal.SIGTERM]
    assert not alive(daemon), "a daemon in its own session that ignores SIGTERM: gone"
    assert not (unit / f"run-{run.run_id}").exists()


async def test_a_previous_workers_cgroups_are_found(unit: Path) -> None:
    cgroup = RunCgroup(unit / "run-old")
    cgroup.path.mkdir()
    sleeper = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        cgroup.place(sleeper.pid)
        found = Cgroups(unit=unit).found()
        assert list(found) == ["old"] and found["old"].contains(sleeper.pid)
        figures, removed = await found["old"].end()
        assert removed and not cgroup.path.exists() and figures.oom_kills == 0
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_the_wrapper_gives_up_cleanly_when_the_worker_does(unit: Path, tmp_path: Path) -> None:
    """Gone wrong between the spawn and the go: the wrapper is killed and reaped, having run
    nothing of the command."""
    marker = tmp_path / "ran"
    moved: list[int] = []

    class GaveUp(Exception):
        pass

    async def place(pid: int) -> None:
        moved.append(pid)
        raise GaveUp  # as a cancellation there would

    with pytest.raises(GaveUp):
        await placed.open_process(
            ["sh", "-c", f"touch {marker}"],
            cwd="/",
            env={},
            stdout=1,
            stderr=2,
            place=place,
        )
    assert moved and not alive(moved[0]) and not marker.exists()


def test_the_payload_is_what_execve_takes() -> None:
    assert placed.payload(["a", "b c"], {"X": "1=2", "E": ""}) == b"2\0a\0b c\0X=1=2\0E=\0"


FAKE_PREFECT = {
    "__init__.py": "__version__ = 'fake'\n",
    "context.py": "def refresh_global_settings_context():\n    pass\n",
    "flow_engine.py": "",
    "logging/__init__.py": "",
    "logging/configuration.py": "PROCESS_LOGGING_CONFIG = {}\n\ndef setup_logging():\n    pass\n",
    "engine.py": "import os\nos.write(1, open('/proc/self/cgroup', 'rb').read())\n",
}
"""Enough of Prefect for the real engine server (``engine_server.py``): the run's "engine"
prints its own cgroup, its first act."""


async def test_a_warm_fork_is_moved_before_it_is_told_to_go(unit: Path, tmp_path: Path) -> None:
    """The engine server's run process waits for go; the worker moves it into the run's
    cgroup first (``EngineServer.fork``'s ``before_go``), so the engine starts there."""
    from worker.process import warm

    for name, text in FAKE_PREFECT.items():
        (tmp_path / "site" / "prefect" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / "prefect" / name).write_text(text)
    python = tmp_path / "python"  # an interpreter whose site has the fake prefect
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    starts = warm.WarmStarts(enabled=True, environ={"PATH": os.environ["PATH"]})
    config = ProcessJobConfiguration(command=f"{python} -m prefect.engine", env={"PATH": os.environ["PATH"]})
    said = Said()
    run = RunHandle(
        "warm-1", said, config=config, output_dir=tmp_path / "out", warm=starts, cgroups=Cgroups(unit=unit)
    )
    libc = ctypes.CDLL(None, use_errno=True)
    assert reaper.become_subreaper()  # the run's process is re-parented to us, as to the worker
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(starts.serve)
            with trio.fail_after(60):
                await run.start()
                assert run.started_as == "warm", said.of("warm_start.cold")
                assert await run.wait() == 0
            nursery.cancel_scope.cancel()
    finally:
        libc.prctl(reaper.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert said.lines("stdout")[-1:] == [f"0::/{unit.name}/run-warm-1"], said.events
    assert not (unit / "run-warm-1").exists()


async def test_a_restarted_worker_finds_its_runs_by_their_cgroups(unit: Path, tmp_path: Path) -> None:
    """Reconcile with the runs' cgroups: a live run is adopted in its cgroup and, cancelled,
    ended through it (its daemon in another session too); the cgroup of a run whose
    process is gone, and one the ledger does not know, are emptied and removed."""
    from tests.test_seams import FakeClient, entry, make_reporter
    from worker.books.ledger import boot_id
    from worker.host.settings import Settings
    from worker.rules.models import StateType
    from worker.runs.inhand import InHand
    from worker.runs.reconcile import Reconciler

    def sleeper(cgroup: str) -> subprocess.Popen[bytes]:
        (unit / cgroup).mkdir(exist_ok=True)
        proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        RunCgroup(unit / cgroup).place(proc.pid)
        return proc

    leader, daemon, leftover, stray = (
        sleeper(c) for c in ("run-alive", "run-alive", "run-gone", "run-stray")
    )
    try:
        client = FakeClient(StateType.RUNNING)
        reporter = make_reporter(tmp_path, client)
        facts = reaper.process_facts(leader.pid)
        assert facts is not None
        alive = entry(
            "alive", pid=leader.pid, pgid=leader.pid, start_time=facts.start_time, boot_id=boot_id()
        )
        reporter.ledger.write(attrs.evolve(alive, limits={"pids_max": 50}))
        reporter.ledger.write(entry("gone", pid=leftover.pid, start_time=1, boot_id=boot_id()))
        settings = Settings(pool="pool", api_url="http://127.0.0.1:9/api", cancel_grace_seconds=0.5)
        in_hand = InHand()
        reconciler = Reconciler(settings, client, reporter.ledger, reporter, reporter.outage, in_hand)  # type: ignore[arg-type]
        reconciler.cgroups = Cgroups(unit=unit)
        async with trio.open_nursery() as runs:
            await reconciler.reconcile(runs)
            assert leftover.wait(10) == -signal.SIGKILL and stray.wait(10) == -signal.SIGKILL
            assert sorted(p.name for p in unit.iterdir() if p.is_dir()) == ["run-alive"]
            handle = in_hand.live["alive"]
            assert handle is not None and handle.cgroup is not None
            assert handle.cgroup.limits == RunLimits(pids_max=50), "its limits, from the ledger"
            handle.cancel("test")
        assert leader.wait(10) == -signal.SIGTERM and daemon.wait(10) == -signal.SIGKILL
        assert not (unit / "run-alive").exists()
        assert (StateType.CANCELLED, "Flow run was cancelled successfully.") in client.written
    finally:
        for proc in (leader, daemon, leftover, stray):
            proc.kill()
            proc.wait()
