"""No descendant escapes: the child subreaper, zombie reaping, and sweeping a run's leftovers.

* :func:`become_subreaper` makes the worker a child subreaper
  (``prctl(PR_SET_CHILD_SUBREAPER)``), so processes a flow double-forks or ``setsid``\\ s
  are re-parented to the worker instead of to PID 1, where nothing would clean them up.
* :func:`reap_orphans` waits for zombie children that this worker did not spawn
  (re-parented orphans). It waits for those pids one by one, never ``waitpid(-1)``,
  which would steal the exit status of a child that trio is waiting for.
* :data:`CHILDREN` knows which children the worker spawned, and when a spawn is in
  flight. A child can exit (and be a zombie whose parent is the worker) before the
  spawning task has its pid; the reaper must not mistake it for an orphan, or the exit
  status is lost and the waiter gets ECHILD, which ``subprocess`` turns into status 0.
  So every spawn runs inside ``CHILDREN.spawning()``, its pid is registered before that
  ends, and the reaper waits until no spawn is in flight before it looks.
* :func:`sweep_run` kills what is left of a finished run: its process group and every
  process carrying its ``PREFECT__FLOW_RUN_ID`` (which a ``setsid`` escapes the group
  with but keeps in its environment), **within this worker's tree only**: a process
  whose parents lead up to the worker (the subreaper: a run's orphans are re-parented
  to it). A process elsewhere that carries the run's id (a second worker on the host, the
  drain timer's, running a rescheduled copy of the run) is never touched. A run adopted
  after a restart is no descendant of the new worker: under systemd its leftovers are
  found in the worker's own unit cgroup (``KillMode=process`` keeps them there), and
  elsewhere only its recorded process group is swept. Each process is signalled through
  a pidfd opened after its identity (pid and start time) was checked again, so a pid
  reused meanwhile is never hit.

Facts about processes come from ``/proc``; :func:`process_facts` reads one.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio

log = structlog.get_logger("flow_worker")
PR_SET_CHILD_SUBREAPER: Final = 36
PROC: Final = Path("/proc")


@attrs.frozen
class ProcessFacts:
    pid: int
    state: str
    ppid: int
    pgid: int
    start_time: int
    """Clock ticks since boot (field 22 of /proc/PID/stat): with the boot id, it tells a
    process apart from a later one that reuses its pid."""


def process_facts(pid: int) -> ProcessFacts | None:
    """The process's facts, or None if it does not exist (or cannot be read)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return ProcessFacts(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def is_same_process(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and is the process that started at ``start_time``."""
    facts = process_facts(pid)
    return facts is not None and facts.state != "Z" and facts.start_time == start_time


def become_subreaper() -> bool:
    """Make this process a child subreaper. False where the kernel or libc refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@attrs.define
class Children:
    """The processes this worker spawned itself, which only their own waiter may reap."""

    spawned: set[int] = attrs.Factory(set)
    in_flight: int = 0
    _idle: trio.Event | None = None

    @contextmanager
    def spawning(self) -> Iterator[None]:
        """Hold the reaper off while a child is being spawned; register its pid inside."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        """Return once no spawn is in flight."""
        while self.in_flight:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def reap_orphans(self, everywhere: bool = False) -> list[int]:
        """Reap zombie children the worker did not spawn (only call when idle): among the
        children ``/proc`` lists, or (``everywhere``) among every process."""
        assert self.in_flight == 0, "a spawn is in flight: its child could be taken for an orphan"
        return reap_orphans(self.spawned, None if everywhere else children())


CHILDREN: Final = Children()
"""This process's spawned children (a process has one set of children, hence one registry)."""


REAP_SECONDS: Final = 60.0
"""The reaper's safety-net sweep interval (it reaps on every SIGCHLD too)."""


async def reap_loop() -> None:
    """Reap re-parented orphans when a child exits (SIGCHLD; trio itself waits on
    pidfds, not on SIGCHLD): among the worker's children as ``/proc`` lists them, which
    costs a few reads where a pass over every process on the host cost one per process
    and per exit (8 % of the worker's samples in a burst of 50 runs); and every
    ``REAP_SECONDS`` over every process, a safety net for a child that list missed (the
    kernel builds it without a lock: a child being re-parented meanwhile can be missed)."""
    with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        while True:
            signalled = False
            with trio.move_on_after(REAP_SECONDS):
                await sigchld.__anext__()
                signalled = True
            await CHILDREN.wait_idle()  # a child mid-spawn is not an orphan
            reaped = CHILDREN.reap_orphans(everywhere=not signalled)
            if reaped:
                log.debug("reaper.reaped", pids=reaped)


def _all_pids() -> Iterator[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def children(me: int | None = None) -> list[int] | None:
    """This process's children, from each of its threads' ``/proc/PID/task/TID/children``
    (a re-parented orphan becomes any thread's child); None where the kernel has no such
    file (built without ``CONFIG_PROC_CHILDREN``) or it cannot be read."""
    pid = os.getpid() if me is None else me
    task = PROC / str(pid) / "task"
    if not (task / str(pid) / "children").exists():
        return None
    try:
        threads = os.listdir(task)
    except OSError:
        return None
    found: list[int] = []
    for tid in threads:
        try:
            text = (task / tid / "children").read_text()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        except OSError:
            return None
        found.extend(int(child) for child in text.split())
    return found


def reap_orphans(owned: Iterable[int], among: Iterable[int] | None = None) -> list[int]:
    """Reap zombie children of this process whose pid is not in ``owned``, looking at
    ``among`` (default: every process). Returns them."""
    me = os.getpid()
    keep = set(owned)
    reaped = []
    for pid in _all_pids() if among is None else among:
        if pid in keep:
            continue
        facts = process_facts(pid)
        if facts is None or facts.ppid != me or facts.state != "Z":
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        reaped.append(pid)
    return reaped


def carries_run(pid: int, flow_run_id: str) -> bool:
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ.split(b"\0")


def descends(pid: int, root: int, parents: Mapping[int, int]) -> bool:
    """Whether ``root`` is among ``pid``'s ancestors, following ``parents`` (pid → parent pid)."""
    seen: set[int] = set()
    while pid not in seen:
        seen.add(pid)
        pid = parents.get(pid, 0)
        if pid == root:
            return True
        if pid <= 1:
            return False
    return False


def cgroup(pid: int | str) -> str | None:
    """The process's cgroup (v2), or None."""
    try:
        lines = (PROC / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def own_unit() -> str | None:
    """This worker's cgroup when the worker is a systemd service's main process (started by
    the service manager, in ``…/NAME.service``): only that unit's processes live there.
    None elsewhere (a login session, a container, a test run inside some service)."""
    path = cgroup("self")
    manager = os.getppid() == 1 or os.environ.get("MANAGERPID") == str(os.getppid())
    return path if manager and path is not None and path.endswith(".service") else None


def _in_unit(pid: int, unit: str | None) -> bool:
    path = cgroup(pid) if unit is not None else None
    return path is not None and (path == unit or path.startswith(f"{unit}/"))


def _run_facts(
    flow_run_id: str, pgid: int | None, root: int | None, adopted: bool = False
) -> list[ProcessFacts]:
    """The run's live processes (in its group, or carrying its id) within ``root``'s tree
    (None: anywhere), or this worker's unit; for an adopted run outside a unit, its group."""
    me = os.getpid()
    unit = own_unit() if root is not None else None
    every = {pid: facts for pid in _all_pids() if (facts := process_facts(pid)) is not None}
    parents = {pid: facts.ppid for pid, facts in every.items()}
    found = []
    for pid, facts in every.items():
        if pid == me or facts.state == "Z":
            continue
        in_group = pgid is not None and facts.pgid == pgid
        if not (in_group or carries_run(pid, flow_run_id)):
            continue
        if (
            root is None
            or descends(pid, root, parents)
            or _in_unit(pid, unit)
            or (adopted and unit is None and in_group)  # a group id is not reused while it has members
        ):
            found.append(facts)
    return found


def run_processes(flow_run_id: str, pgid: int | None, *, anywhere: bool = False) -> list[int]:
    """Live processes that belong to the run (in its group, or carrying its run id) in
    this worker's tree (or unit); ``anywhere``: on the whole host (what tests look at)."""
    return [facts.pid for facts in _run_facts(flow_run_id, pgid, None if anywhere else os.getpid())]


def signal_if_same(facts: ProcessFacts, sig: signal.Signals) -> bool:
    """Signal the process ``facts`` describe if it is still that one (pid and start time):
    through a pidfd opened before the check, so a pid reused meanwhile is never hit."""
    try:
        fd: int | None = os.pidfd_open(facts.pid)
    except ProcessLookupError:
        return False
    except (OSError, AttributeError):
        fd = None  # no pidfd (an old kernel): the check, then kill(), a short window
    try:
        now = process_facts(facts.pid)
        if now is None or now.state == "Z" or now.start_time != facts.start_time:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(facts.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd is not None:
            os.close(fd)


def sweep_run(flow_run_id: str, pgid: int | None, adopted: bool = False) -> list[int]:
    """SIGKILL every process left of a finished run (its leader had its grace already)
    within this worker's tree or unit (``adopted``: or its recorded group, outside a unit)."""
    victims = _run_facts(flow_run_id, pgid, os.getpid(), adopted)
    return [facts.pid for facts in victims if signal_if_same(facts, signal.SIGKILL)]
