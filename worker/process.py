"""One flow run's process, from spawn (``RunHandle``) or adoption (``AdoptedHandle``) to gone.

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
  run goes on following it. The files are removed when the run ends.
* **Start errors.** Whatever stops a spawn is a :class:`StartError` whose message names
  the cause (a bad environment variable, a command not found, …), and nothing is left
  behind (descriptors, the temporary directory, the output files). A lack of a local
  resource (descriptors, memory, disk, processes) is a :class:`StartDeferred`: not the
  run's fault, so it may start later, here or on a peer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from worker import decisions, limits, reaper
from worker.job import ProcessJobConfiguration
from worker.output import STDERR_TAIL_BYTES as STDERR_TAIL_BYTES
from worker.output import STDERR_TAIL_LINES as STDERR_TAIL_LINES
from worker.output import RunOutput
from worker.usage import Meter, Usage
from worker.warm import EngineServer, Unavailable, WarmStarts

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
    _stop_event: trio.Event = attrs.Factory(trio.Event)

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
        if self.output_dir is None:
            return []
        return [(self.output_dir / f"{self.run_id}.{name}", name) for name in ("out", "err")]

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (at most ``STDERR_TAIL_LINES`` lines and
        ``STDERR_TAIL_BYTES`` characters, newest kept): what a crash message shows."""
        return self.output.stderr_tail()

    def remove_output(self) -> None:
        for path, _ in self.output_paths():
            path.unlink(missing_ok=True)

    def sweep(self) -> None:
        """Kill what is left of the run (after its leader is gone)."""
        victims = reaper.sweep_run(self.run_id, self.pgid)
        if victims:
            self.log.info("run.swept", pids=victims)


@attrs.define(eq=False)
class ForkedChild:
    """A run's process forked by an engine server (``warm.py``) and re-parented to this
    worker: what ``RunHandle`` needs of a ``trio.Process`` (pid, wait, returncode)."""

    pid: int
    returncode: int | None = None
    gone: bool = False
    """Reaped (``returncode`` set), or found reaped by someone else (status unknown)."""

    async def wait(self) -> int | None:
        if self.gone:
            return self.returncode
        fd = _pidfd_open(self.pid)
        try:
            if fd is not None:
                await trio.lowlevel.wait_readable(fd)
            while not self.gone:
                try:
                    pid, status = os.waitpid(self.pid, 0 if fd is not None else os.WNOHANG)
                except ChildProcessError:
                    self.gone = True
                    break
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    self.gone = True
                else:
                    await trio.sleep(ADOPTED_POLL / 4)
        finally:
            if fd is not None:
                os.close(fd)
        return self.returncode


@attrs.define(eq=False)
class RunHandle(Supervised):
    config: ProcessJobConfiguration = attrs.Factory(ProcessJobConfiguration)
    process: trio.Process | ForkedChild | None = None
    tmpdir: Path | None = None
    status: int | None = None
    """The exit status once the child is reaped (None: not yet, or unknowable)."""
    warm: WarmStarts | None = None
    """Where a run of the engine command may be forked from (``warm_start``); else spawned."""
    started_as: str = "cold"
    """How the process started: ``cold`` (spawned) or ``warm`` (forked by an engine server)."""
    _pidfd: int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def may_signal(self) -> bool:
        return self.process is not None

    @property
    def reaped(self) -> bool:
        """Not started, or started and reaped (or found reaped by someone else)."""
        proc = self.process
        return proc is None or proc.returncode is not None or bool(getattr(proc, "gone", False))

    async def start(self, extra_env: dict[str, str] | None = None) -> int:
        """Spawn the child; raise :class:`StartError` with a message a user can act on
        (:class:`StartDeferred` when a local resource ran out). Nothing is left behind."""
        argv = self.config.argv()
        env = {k: v for k, v in self.config.env.items() if v is not None}
        env.update(extra_env or {})
        problem = spawn_problem(argv, env, self.config.working_dir)
        if problem is not None:
            raise StartError(problem)
        if self.config.working_dir is not None:
            cwd = self.config.working_dir
            if not cwd.is_dir():
                what = "is not a directory" if cwd.exists() else "does not exist"
                raise StartError(f"working directory {str(cwd)!r} {what}")
        if not self.config.stream_output:
            self.output_dir = None
        files: list[int] = []
        doing = "creating the temporary working directory"
        try:
            if self.config.working_dir is None:
                self.tmpdir = Path(tempfile.mkdtemp(prefix="flow-worker-", suffix="prefect"))
                cwd = self.tmpdir
            doing = "opening the output files"
            for path, _ in self.output_paths():
                path.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
                files.append(os.open(path, flags, 0o600))
            out: int = files[0] if files else subprocess.DEVNULL
            err: int = files[1] if files else subprocess.DEVNULL
            doing = "starting the process"
            server: EngineServer | str | None = None
            if self.warm is not None and self.warm.enabled:  # may wait for a first preload
                server = await self.warm.server_for(argv, env, str(cwd))
            with reaper.CHILDREN.spawning():
                if isinstance(server, EngineServer):
                    self.process = await self._fork(server, argv, str(cwd), env)
                if self.process is None:
                    self.process = await trio.lowlevel.open_process(
                        argv,
                        cwd=str(cwd),
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                reaper.CHILDREN.spawned.add(self.process.pid)
                self._pidfd = _pidfd_open(self.process.pid)
        except OSError as exc:
            raise start_error(exc, doing, argv[0]) from None
        except (ValueError, TypeError) as exc:  # what spawn_problem did not foresee
            raise StartError(f"cannot start the process: {type(exc).__name__}: {exc}") from None
        finally:
            for fd in files:
                os.close(fd)
            if self.process is None:  # not started (an error, or cancelled waiting for a preload)
                self.remove_output()
                self._cleanup_tmpdir()
        return self.process.pid

    async def _fork(
        self, server: EngineServer, argv: list[str], cwd: str, env: dict[str, str]
    ) -> ForkedChild | None:
        """The run's process forked from ``server``; None if it must be spawned instead."""
        paths = [str(path) for path, _ in self.output_paths()]
        request = {
            "argv": argv,
            "cwd": cwd,
            "env": env,
            "stdout": paths[0] if paths else None,
            "stderr": paths[1] if paths else None,
        }
        try:
            pid = await server.fork(request)
        except Unavailable as exc:
            assert self.warm is not None
            self.warm.said_cold(server, str(exc))
            return None
        self.started_as = "warm"
        return ForkedChild(pid)

    async def _exited(self) -> None:
        """Wait for the child's exit, read its status without reaping it (``waitid`` with
        ``WNOWAIT``), then let trio reap it. The status read here is the true one; if it
        cannot be read (someone else reaped the child), it is unknown (``None``), never
        the 0 that ``subprocess`` reports for ECHILD."""
        proc = self.process
        assert proc is not None
        if self._pidfd is None:
            await proc.wait()  # no pidfd (old kernel): trust trio; CHILDREN guards the status
            self.status = proc.returncode
            return
        await trio.lowlevel.wait_readable(self._pidfd)
        peeked = _peek_status(proc.pid)
        if self.meter is not None:
            self.meter.final(proc.pid)  # a zombie still: its CPU times are complete
        await proc.wait()
        self.status = proc.returncode if isinstance(peeked, _NotYet) else peeked

    async def wait(self, beside: Callable[[], Awaitable[Any]] | None = None) -> int | None:
        """Wait for the exit (streaming output, applying the kill policy on stop) and
        return the exit status: negative for a signal, as ``subprocess`` reports it;
        ``None`` if it cannot be known. ``beside`` runs meanwhile (see ``_watch``)."""
        assert self.process is not None, "start() first"
        proc = self.process
        try:
            await self._watch(self._exited, from_end=False, beside=beside)
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None and not getattr(proc, "gone", False):
                    # the waiting task was cancelled (hard stop): terminate, then reap
                    self.signal_group(signal.SIGTERM)
                    with trio.move_on_after(self.grace):
                        await proc.wait()
                    if proc.returncode is None and not getattr(proc, "gone", False):
                        self.signal_group(signal.SIGKILL)
                        await proc.wait()
                    self.status = proc.returncode
                reaper.CHILDREN.spawned.discard(proc.pid)
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
                if self.stop_requested or self.status != 0:
                    self.sweep()
                self.remove_output()
                self._cleanup_tmpdir()
        return self.status

    def _cleanup_tmpdir(self) -> None:
        if self.tmpdir is not None:
            try:
                self.tmpdir.rmdir()  # empty if nothing ran in it; needs no descriptor (EMFILE)
            except OSError:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def spawn_problem(argv: list[str], env: dict[str, Any], working_dir: Path | None) -> str | None:
    """What in the command, environment or working directory no process can be started
    with (``execve`` refuses it), named for the user; None if nothing.

    Job variables are validated where they enter (``job.py``, with the same rules of
    ``limits.py``); this is the last line of defence, and it also holds for a warm start,
    whose engine server would fail the same way."""
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return f"environment variable {name!r} must be a string, not {type(value).__name__}"
    problems = limits.spawn_problems(argv, env, working_dir)
    return problems[0] if problems else None


def start_error(exc: OSError, doing: str, program: str) -> StartError:
    """The :class:`StartError` for ``exc`` raised while ``doing``: a
    :class:`StartDeferred` if a local resource ran out."""
    scarce = decisions.shortage(exc)
    if scarce is not None:
        return StartDeferred(scarce, f"{scarce} ({doing}): {exc}")
    if doing == "starting the process":
        if isinstance(exc, FileNotFoundError):
            return StartError(f"command not found: {program!r}")
        if isinstance(exc, PermissionError):
            return StartError(f"command not executable (permission denied): {program!r}")
        return StartError(f"{type(exc).__name__}: {exc}")
    return StartError(f"{doing}: {type(exc).__name__}: {exc}")


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


class _NotYet:
    """The child is not waitable yet (no status to read)."""


def _peek_status(pid: int) -> int | _NotYet | None:
    """The exit status of the exited child ``pid``, leaving it to be reaped.

    None: unknowable (it was reaped by someone else); ``_NotYet``: not waitable yet."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return _NotYet()
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status  # killed or dumped: by signal si_status


@attrs.define(eq=False)
class AdoptedHandle(Supervised):
    """A run's process left by a previous worker: watched until it exits, still cancellable.

    It is not our child, so its exit status cannot be known; the caller reads the run's
    state afterwards instead.
    """

    adopted_pid: int = 0
    adopted_pgid: int | None = None
    start_time: int | None = None

    @property
    def pid(self) -> int | None:
        return self.adopted_pid

    @property
    def pgid(self) -> int | None:
        return self.adopted_pgid

    def alive(self) -> bool:
        return reaper.is_same_process(self.adopted_pid, self.start_time)

    def may_signal(self) -> bool:
        # never signal a group whose leader is not the process we recorded
        return self.alive()

    async def _gone(self) -> None:
        try:
            fd = os.pidfd_open(self.adopted_pid)
        except (OSError, AttributeError):
            fd = -1
        try:
            if fd >= 0 and self.alive():
                await trio.lowlevel.wait_readable(fd)
            while self.alive():
                await trio.sleep(ADOPTED_POLL)
        finally:
            if fd >= 0:
                os.close(fd)

    async def wait(self) -> None:
        """Return once the process has exited (applying the kill policy on stop)."""
        try:
            # a new worker follows the output from where it is now, not from the start
            await self._watch(self._gone, from_end=True)
        finally:
            with trio.CancelScope(shield=True):
                if self.alive():
                    self.signal_group(signal.SIGTERM)
                    with trio.move_on_after(self.grace):
                        await self._gone()
                    self.signal_group(signal.SIGKILL)
                    with trio.move_on_after(5):
                        await self._gone()
                if self.stop_requested:
                    self.sweep()
                self.remove_output()
