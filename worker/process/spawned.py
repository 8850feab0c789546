"""A run the worker starts itself (``RunHandle``): spawned, or forked by a warm engine server; the
start's errors said as the run's (``spawn_problem``, ``start_error``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from worker.host import private
from worker.process import launch, placed, reaper
from worker.process.cgroups import Cgroups
from worker.process.forked import ForkedChild
from worker.process.handle import NotYet, StartDeferred, StartError, Supervised, peek_status, pidfd_open
from worker.process.warm import EngineServer, Unavailable, WarmStarts
from worker.rules import decisions, limits
from worker.rules.job import ProcessJobConfiguration
from worker.rules.runlimits import RunLimits
from worker.rules.workspace import InterpreterDirs


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
    interpreter: InterpreterDirs | None = None
    """The engine interpreter's own directories, kept off a default-command run's ``PYTHONPATH``."""
    argv: list[str] = attrs.Factory(list)
    """The command started: the configured one, or Prefect's ``uv run`` launch (``launch.py``)."""
    cgroups: Cgroups | None = None
    """The worker's delegated subtree, where the run gets its cgroup (``cgroups.py``)."""
    limits: RunLimits = attrs.Factory(RunLimits)
    """The run's resource limits (``runlimits.py``), written to its cgroup."""
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
            if not self.config.command_configured:  # Prefect's PYTHONPATH, and `uv run` if asked
                doing = "preparing the workspace"
                how = launch.prepare(argv, env, str(cwd), self.config.pull_steps, self.interpreter)
                argv, env = how.argv, how.env
                if how.note:
                    self.log.warning("run.uv_not_used", reason=how.note)
                problem = spawn_problem(argv, env, self.config.working_dir)
                if problem is not None:
                    raise StartError(problem)
            self.argv = argv
            doing = "opening the output files"
            for path, _ in self.output_paths():
                private.private_dir(path.parent)
                files.append(private.open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            out: int = files[0] if files else subprocess.DEVNULL
            err: int = files[1] if files else subprocess.DEVNULL
            doing = "starting the process"
            server: EngineServer | str | None = None
            if self.warm is not None and self.warm.enabled:  # may wait for a first preload
                server = await self.warm.server_for(argv, env, str(cwd))
            if self.cgroups is not None:  # its cgroup and limits, before its first instruction
                self.cgroup = self.cgroups.make(self.run_id, self.limits, self.log)
            with reaper.CHILDREN.spawning():
                if isinstance(server, EngineServer):
                    self.process = await self._fork(server, argv, str(cwd), env)
                if self.process is None and self.cgroup is not None:
                    self.process = await placed.open_process(
                        argv, cwd=str(cwd), env=env, stdout=out, stderr=err, place=self._place
                    )
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
                self._pidfd = pidfd_open(self.process.pid)
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
                if self.cgroup is not None:
                    self.cgroup.remove()
                    self.cgroup = None
        return self.process.pid

    async def _place(self, pid: int) -> None:
        """Move the run's process into its cgroup before it may start the flow; if the kernel
        refuses, the run goes on where it is (said in its log; without its limits). In a
        thread: a move waits for an RCU grace period in the kernel (``cgroup_threadgroup_rwsem``),
        tens of milliseconds, and the worker's other runs and loops go on meanwhile."""
        cgroup = self.cgroup
        if cgroup is None:
            return
        try:
            await trio.to_thread.run_sync(cgroup.place, pid)
        except OSError as exc:
            reason = f"cannot move it into {cgroup.path}: {exc.strerror or exc}"
            self.log.warning("run.not_in_cgroup", reason=reason)
            Cgroups.not_applied(self.log, self.limits, list(self.limits.items()), reason)
            cgroup.remove()
            self.cgroup = None

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
            pid = await server.fork(request, before_go=self._place)
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
        peeked = peek_status(proc.pid)
        if self.meter is not None:
            self.meter.final(proc.pid)  # a zombie still: its CPU times are complete
        await proc.wait()
        self.status = proc.returncode if isinstance(peeked, NotYet) else peeked

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
                await self.end_remains(self.stop_requested or self.status != 0)
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
