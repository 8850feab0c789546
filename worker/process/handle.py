"""One flow run's process, from start to gone: what every kind of handle shares (``Supervised``).

The kinds: spawned (``spawned.RunHandle``, a trio child, or a warm fork watched as a
``forked.ForkedChild``) and adopted from a previous worker (``adopted.AdoptedHandle``).

Policy, stated once:

* **Own session.** Every child starts in a new session, so its process group id is its
  pid. Signals go to the whole group (``killpg``), so a flow's own subprocesses
  (``sh -c 'sleep 300 & wait'``) go with it. Prefect runs an explicit ``command`` in
  the worker's own group and signals only the pid; flow-worker does not (pain point 13).
* **Kill policy.** ``stop(reason, intent)`` first tells the engine why over the control
  channel (``cancel``, ``reschedule`` or ``relinquish``, see ``control.py``), then sends
  SIGTERM to the group, waits ``grace`` seconds (default 30 s, Prefect's fixed value,
  here configurable), then SIGKILL. When the leader is gone after a stop, or after a
  crash, whatever is left of the run is swept (``reaper.sweep_run``): its group, and
  processes that ``setsid`` took out of the group but that still carry its run id.
  A run in a cgroup of its own (``cgroups.py``) is ended through it instead: at the end
  of the grace period with ``cgroup.kill`` too, and whenever its leader is gone, whatever
  is left in it (any session, any environment) is killed, then the cgroup removed.
* **Always reaped.** ``wait()`` returns only after the child was reaped. If the task
  waiting is cancelled (a hard stop), the kill policy runs in a shielded scope first,
  so cancellation never leaves a child behind.
* **Never the wrong process.** An adopted process is identified by pid *and* start time
  (and the boot id, checked by the caller); it is signalled only while both match.
* **Output.** With ``stream_output`` the child's stdout and stderr go to two files in
  the state directory (``output/<run>.out|.err``), which the worker follows line by
  line into its log, bound to the run, within a budget (``output.py``: lines and bytes
  per second, a size cap on the files, the stderr tail); otherwise to /dev/null. Files,
  not pipes: a pipe dies with the worker, and a flow that prints after a worker restart
  would then fail on EPIPE; a file outlives the worker, and the worker that adopts the
  run goes on following it. The files are 0600, opened without following a symbolic link
  (``host/private.py``), and removed when the run ends, or when the run is resolved after
  a restart (``reconcile.py``).
* **Start errors.** Whatever stops a spawn is a :class:`StartError` whose message names
  the cause (a bad environment variable, a command not found, …), and nothing is left
  behind (descriptors, the temporary directory, the output files). A lack of a local
  resource (descriptors, memory, disk, processes) is a :class:`StartDeferred`: not the
  run's fault, so it may start later, here or on a peer.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Final

import attrs
import trio

from worker.process import reaper
from worker.process.cgroups import Figures, RunCgroup
from worker.process.output import RunOutput
from worker.process.usage import Meter, Usage
from worker.rules import runlimits

ADOPTED_POLL: Final = 1.0
"""How often an adopted process is checked when pidfd is not available."""

IntentSender = Callable[[str, str], Awaitable[bool]]


class StartError(RuntimeError):
    """The child could not be started; the message is for the run's CRASHED state."""


class StartDeferred(StartError):
    """The child could not be started for lack of a local resource (descriptors, memory,
    disk, processes): not the run's fault; it may start later, or on a peer. ``short``
    is what ran out (``decisions.shortage``)."""

    def __init__(self, short: str, message: str) -> None:
        super().__init__(message)
        self.short = short


@attrs.define(eq=False)
class Supervised:
    """What spawned and adopted processes share: the kill policy and the sweep."""

    run_id: str
    log: Any
    grace: float = 30.0
    send_intent: IntentSender | None = None
    stop_requested: bool = False
    stop_reason: str = ""
    intent: str = ""
    usage: Usage | None = None
    """Its tree's memory and CPU, sampled by ``usage.Meter`` while it runs."""
    meter: Meter | None = None
    """The meter to tell when the child exits (its CPU times are final then)."""
    owner: str | None = None
    """The worker name the run was claimed under, if not this worker's (adopted runs)."""
    claim: str | None = None
    """The transition id of the claim that made the run ours (the fence compares it)."""
    lost: str = ""
    """Why a peer took the run (the fence): it is stopped and nothing is reported."""
    output_dir: Path | None = None
    output: RunOutput = attrs.Factory(lambda self: RunOutput(self.log), takes_self=True)
    """Its output followed into the log within a budget, and the stderr tail (``output.py``)."""
    cgroup: RunCgroup | None = None
    """Its own cgroup (``cgroups.py``), where the worker has a delegated cgroup v2 subtree."""
    figures: Figures | None = None
    """What its cgroup said it cost, once it ended (peak memory, CPU, OOM kills)."""
    _stop_event: trio.Event = attrs.Factory(trio.Event)
    ADOPTED: ClassVar[bool] = False
    """Left by a previous worker: no descendant of this one (``reaper.sweep_run``)."""

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    @property
    def pgid(self) -> int | None:
        return self.pid

    @property
    def cancel_requested(self) -> bool:
        return self.stop_requested and self.intent == "cancel"

    def stop(self, reason: str, intent: str = "cancel") -> None:
        """Ask for the kill policy to run (idempotent; returns at once)."""
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_reason = reason
            self.intent = intent
            self._stop_event.set()

    def cancel(self, reason: str) -> None:
        self.stop(reason, "cancel")

    def lose(self, reason: str) -> None:
        """A peer resolved the run: stop it without the engine writing a state."""
        if not self.lost:
            self.lost = reason
            self.stop(f"a peer took the run: {reason}", "relinquish")

    def may_signal(self) -> bool:
        return self.pid is not None

    def signal_group(self, sig: signal.Signals) -> None:
        if not self.may_signal() or self.pgid is None:
            return
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _kill_policy(self) -> None:
        await self._stop_event.wait()
        acknowledged = False
        if self.send_intent is not None and self.intent:
            acknowledged = await self.send_intent(self.run_id, self.intent)
        self.log.info(
            "run.terminating",
            pid=self.pid,
            grace_seconds=self.grace,
            reason=self.stop_reason,
            intent=self.intent,
            intent_acknowledged=acknowledged,
        )
        self.signal_group(signal.SIGTERM)
        await trio.sleep(self.grace)
        self.log.warning("run.killing", pid=self.pid, reason="grace period over")
        self.signal_group(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()  # every process of the run, whatever its session

    async def _watch(
        self,
        gone: Callable[[], Awaitable[Any]],
        from_end: bool,
        beside: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Follow the output and stand ready with the kill policy until ``gone()`` returns;
        ``beside`` (reporting the pid) runs meanwhile, to its end (bounded by the API's
        deadline): the pid is reported also for a process that exits at once."""
        exited = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.output.follow, self.output_paths(), exited, from_end)
            while_alive = trio.CancelScope()
            nursery.start_soon(self._scoped, while_alive, self._kill_policy)
            if beside is not None:
                nursery.start_soon(beside)
            await gone()
            while_alive.cancel()  # the kill policy never outlives the process
            exited.set()  # the followers read what is left, then end

    @staticmethod
    async def _scoped(scope: trio.CancelScope, task: Callable[[], Awaitable[Any]]) -> None:
        with scope:
            await task()

    def output_paths(self) -> list[tuple[Path, str]]:
        return output_files(self.output_dir, self.run_id) if self.output_dir is not None else []

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (at most ``STDERR_TAIL_LINES`` lines and
        ``STDERR_TAIL_BYTES`` characters, newest kept): what a crash message shows."""
        return self.output.stderr_tail()

    def remove_output(self) -> None:
        if self.output_dir is not None:
            remove_output(self.output_dir, self.run_id)

    def sweep(self) -> None:
        """Kill what is left of the run (after its leader is gone), in this worker's tree."""
        victims = reaper.sweep_run(self.run_id, self.pgid, adopted=self.ADOPTED)
        if victims:
            self.log.info("run.swept", pids=victims)

    def memory_now(self) -> int:
        """The memory its processes use now: its cgroup's, else the last /proc sample's."""
        current = self.cgroup.memory_now() if self.cgroup is not None else None
        if current is not None:
            return current
        return self.usage.rss if self.usage is not None else 0

    async def end_cgroup(self) -> None:
        """The leader is gone: kill what is left in the run's cgroup (``cgroup.kill``), wait
        for it to empty, take its figures (the run's exact cost) and remove it."""
        cgroup = self.cgroup
        if cgroup is None:
            return
        left = cgroup.pids()
        if left:
            self.log.info("run.swept", pids=left, via="cgroup.kill")
        self.figures, removed = await cgroup.end()
        if not removed:
            self.log.warning(
                "run.cgroup_left",
                cgroup=str(cgroup.path),
                pids=cgroup.pids(),
                effect="left for the worker's next start to remove",
            )
        if self.usage is not None:  # exact: what the kernel counted for the whole run
            if self.figures.peak is not None:
                self.usage.peak = self.figures.peak
            if self.figures.cpu_seconds is not None:
                self.usage.cpu_seconds = self.figures.cpu_seconds

    def out_of_memory(self, memory_max: int | None) -> str:
        """The OOM message if its cgroup counted an OOM kill (``runlimits.oom_message``), else ''."""
        if self.figures is None or not self.figures.oom_kills:
            return ""
        return runlimits.oom_message(memory_max, self.figures.peak)

    async def end_remains(self, swept: bool) -> None:
        """After the leader is gone: its cgroup ended, or (without one) the sweep if ``swept``."""
        if self.cgroup is not None:
            await self.end_cgroup()
        elif swept:
            self.sweep()


def output_files(directory: Path, run_id: str) -> list[tuple[Path, str]]:
    """A run's output files in ``directory``, with their stream (``out``, ``err``)."""
    return [(directory / f"{run_id}.{name}", name) for name in ("out", "err")]


def remove_output(directory: Path, run_id: str) -> None:
    """Remove a run's output files (the flow's output may hold secrets: it is not kept)."""
    for path, _ in output_files(directory, run_id):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # (e.g. the directory is gone): nothing left to remove, or nothing to be done


def pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


class NotYet:
    """The child is not waitable yet (no status to read)."""


def peek_status(pid: int) -> int | NotYet | None:
    """The exit status of the exited child ``pid``, leaving it to be reaped.

    None: unknowable (it was reaped by someone else); ``NotYet``: not waitable yet."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return NotYet()
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # killed or dumped: by signal si_status
