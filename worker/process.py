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
  line into its log, bound to the run; otherwise to /dev/null. Files, not pipes: a
  pipe dies with the worker, and a flow that prints after a worker restart would then
  fail on EPIPE; a file outlives the worker, and the worker that adopts the run goes
  on following it. The files are removed when the run ends.
"""

from __future__ import annotations

import collections
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

from worker import reaper
from worker.job import ProcessJobConfiguration
from worker.usage import Meter, Usage
from worker.warm import EngineServer, Unavailable, WarmStarts

OUTPUT_POLL: Final = 0.2
"""How often a run's output files are checked for new lines while it runs."""

MAX_LINE: Final = 64 * 1024
"""Longer output lines are split, so a flow that never writes a newline cannot grow memory."""

STDERR_TAIL_LINES: Final = 10
STDERR_TAIL_BYTES: Final = 2048
"""How much of a run's last stderr lines a crash message carries (a traceback's last
lines, a ``ModuleNotFoundError``): enough to see the error, bounded for the UI."""

ADOPTED_POLL: Final = 1.0
"""How often an adopted process is checked when pidfd is not available."""

IntentSender = Callable[[str, str], Awaitable[bool]]


class StartError(RuntimeError):
    """The child could not be started; the message is for the run's CRASHED state."""


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
    _stop_event: trio.Event = attrs.Factory(trio.Event)
    _stderr_tail: collections.deque[str] = attrs.Factory(lambda: collections.deque(maxlen=STDERR_TAIL_LINES))

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

    async def _watch(self, gone: Callable[[], Awaitable[Any]], from_end: bool) -> None:
        """Follow the output and stand ready with the kill policy until ``gone()`` returns."""
        exited = trio.Event()
        async with trio.open_nursery() as nursery:
            for path, name in self.output_paths():
                nursery.start_soon(self._follow, path, name, exited, from_end)
            killer = trio.CancelScope()
            nursery.start_soon(self._scoped, killer)
            await gone()
            killer.cancel()  # the kill policy never outlives the process
            exited.set()  # the followers read what is left, then end

    async def _scoped(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._kill_policy()

    def output_paths(self) -> list[tuple[Path, str]]:
        if self.output_dir is None:
            return []
        return [(self.output_dir / f"{self.run_id}.{name}", name) for name in ("out", "err")]

    async def _follow(self, path: Path, name: str, exited: trio.Event, from_end: bool) -> None:
        """Log each line appended to ``path`` until the process has exited and all is read."""
        try:
            f = path.open("rb")
        except OSError:
            return
        with f:
            if from_end:
                f.seek(0, os.SEEK_END)
            buffer = b""
            while True:
                finished = exited.is_set()  # read once more after the exit: nothing is lost
                chunk = f.read(65536)
                if chunk:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    while len(buffer) > MAX_LINE:
                        lines.append(buffer[:MAX_LINE])
                        buffer = buffer[MAX_LINE:]
                    for line in lines:
                        self._emit(line, name)
                    continue
                if finished:
                    break
                with trio.move_on_after(OUTPUT_POLL):
                    await exited.wait()
            if buffer:
                self._emit(buffer, name)

    def _emit(self, line: bytes, name: str) -> None:
        stream = "stdout" if name == "out" else "stderr"
        text = line.decode("utf-8", "replace").rstrip("\r")
        if stream == "stderr" and text.strip():
            self._stderr_tail.append(text[:STDERR_TAIL_BYTES])
        self.log.info("run.output", stream=stream, line=text)

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (at most ``STDERR_TAIL_LINES`` lines and
        ``STDERR_TAIL_BYTES`` characters, newest kept): what a crash message shows."""
        kept: list[str] = []
        size = 0
        for line in reversed(self._stderr_tail):
            size += len(line) + 1
            if size > STDERR_TAIL_BYTES:
                break
            kept.append(line)
        return "\n".join(reversed(kept))

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

    async def start(self, extra_env: dict[str, str] | None = None) -> int:
        """Spawn the child; raise :class:`StartError` with a message a user can act on."""
        argv = self.config.argv()
        if self.config.working_dir is not None:
            cwd = self.config.working_dir
            if not cwd.is_dir():
                what = "is not a directory" if cwd.exists() else "does not exist"
                raise StartError(f"working directory {str(cwd)!r} {what}")
        else:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="flow-worker-", suffix="prefect"))
            cwd = self.tmpdir
        if not self.config.stream_output:
            self.output_dir = None
        files: list[int] = []
        for path, _ in self.output_paths():
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600))
        out: int = files[0] if files else subprocess.DEVNULL
        err: int = files[1] if files else subprocess.DEVNULL
        env = {k: v for k, v in self.config.env.items() if v is not None}
        env.update(extra_env or {})
        server: EngineServer | str | None = None
        try:
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
        except FileNotFoundError:
            self._cleanup_tmpdir()
            raise StartError(f"command not found: {argv[0]!r}") from None
        except PermissionError:
            self._cleanup_tmpdir()
            raise StartError(f"command not executable (permission denied): {argv[0]!r}") from None
        except OSError as exc:
            self._cleanup_tmpdir()
            raise StartError(f"{type(exc).__name__}: {exc}") from None
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

    async def wait(self) -> int | None:
        """Wait for the exit (streaming output, applying the kill policy on stop) and
        return the exit status: negative for a signal, as ``subprocess`` reports it;
        ``None`` if it cannot be known."""
        assert self.process is not None, "start() first"
        proc = self.process
        try:
            await self._watch(self._exited, from_end=False)
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
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


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
