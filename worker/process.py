"""``RunHandle``: one flow run's child process, from spawn to reaped.

Policy, stated once:

* **Own session.** Every child starts in a new session, so its process group id is its
  pid. Signals go to the whole group (``killpg``), so a flow's own subprocesses
  (``sh -c 'sleep 300 & wait'``) go with it. Prefect runs an explicit ``command`` in
  the worker's own group and signals only the pid; flow-worker does not (pain point 13).
* **Kill policy.** ``cancel()`` sends SIGTERM to the group, waits ``grace`` seconds
  (default 30 s, Prefect's fixed value, but configurable), then SIGKILL. After the
  leader exits on a cancel or a stop, the group is swept with SIGKILL so no member
  outlives it.
* **Always reaped.** ``wait()`` returns only after the child was reaped. If the task
  waiting is cancelled (the worker stops), the kill policy runs in a shielded scope
  first, so cancellation never leaves a child behind.
* **Output.** With ``stream_output`` the child's stdout and stderr are read line by
  line into the worker's log, bound to the run; otherwise they go to /dev/null. A
  grandchild holding the pipes after the child exited gets ``OUTPUT_LINGER`` seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from worker.job import ProcessJobConfiguration

OUTPUT_LINGER: Final = 2.0
"""Seconds to keep reading output that grandchildren write after the child exited."""

MAX_LINE: Final = 64 * 1024
"""Longer output lines are split, so a flow that never writes a newline cannot grow memory."""


class StartError(RuntimeError):
    """The child could not be started; the message is for the run's CRASHED state."""


@attrs.define(eq=False)
class RunHandle:
    run_id: str
    config: ProcessJobConfiguration
    log: Any
    grace: float = 30.0
    process: trio.Process | None = None
    tmpdir: Path | None = None
    cancel_requested: bool = False
    cancel_reason: str = ""
    _cancel_event: trio.Event = attrs.Factory(trio.Event)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> int:
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
        out = subprocess.PIPE if self.config.stream_output else subprocess.DEVNULL
        env = {k: v for k, v in self.config.env.items() if v is not None}
        try:
            self.process = await trio.lowlevel.open_process(
                argv,
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except FileNotFoundError:
            self._cleanup_tmpdir()
            raise StartError(f"command not found: {argv[0]!r}") from None
        except PermissionError:
            self._cleanup_tmpdir()
            raise StartError(f"command not executable (permission denied): {argv[0]!r}") from None
        except OSError as exc:
            self._cleanup_tmpdir()
            raise StartError(f"{type(exc).__name__}: {exc}") from None
        return self.process.pid

    def cancel(self, reason: str) -> None:
        """Ask for the kill policy to run (idempotent; returns at once)."""
        if not self.cancel_requested:
            self.cancel_requested = True
            self.cancel_reason = reason
            self._cancel_event.set()

    def signal_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _kill_policy(self) -> None:
        await self._cancel_event.wait()
        self.log.info("run.terminating", pid=self.pid, grace_seconds=self.grace, reason=self.cancel_reason)
        self.signal_group(signal.SIGTERM)
        await trio.sleep(self.grace)
        self.log.warning("run.killing", pid=self.pid, reason="grace period over")
        self.signal_group(signal.SIGKILL)

    async def _scoped(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._kill_policy()

    async def _pump(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        buffer = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            while len(buffer) > MAX_LINE:
                lines.append(buffer[:MAX_LINE])
                buffer = buffer[MAX_LINE:]
            for line in lines:
                self._emit(line, name)
        if buffer:
            self._emit(buffer, name)

    def _emit(self, line: bytes, name: str) -> None:
        self.log.info("run.output", stream=name, line=line.decode("utf-8", "replace").rstrip("\r"))

    async def wait(self) -> int:
        """Wait for the exit (streaming output, applying the kill policy on cancel) and
        return the return code; negative for a signal, as ``subprocess`` reports it."""
        assert self.process is not None, "start() first"
        proc = self.process
        try:
            async with trio.open_nursery() as nursery:
                if proc.stdout is not None:
                    nursery.start_soon(self._pump, proc.stdout, "stdout")
                if proc.stderr is not None:
                    nursery.start_soon(self._pump, proc.stderr, "stderr")
                killer = trio.CancelScope()
                nursery.start_soon(self._scoped, killer)
                await proc.wait()
                killer.cancel()  # the kill policy never outlives the child
                nursery.cancel_scope.deadline = trio.current_time() + OUTPUT_LINGER
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    # the waiting task was cancelled (worker stopping): terminate, then reap
                    self.signal_group(signal.SIGTERM)
                    with trio.move_on_after(self.grace):
                        await proc.wait()
                    if proc.returncode is None:
                        self.signal_group(signal.SIGKILL)
                        await proc.wait()
                if self.cancel_requested or proc.returncode is None or proc.returncode < 0:
                    self.signal_group(signal.SIGKILL)  # sweep what is left of the group
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
                self._cleanup_tmpdir()
        assert proc.returncode is not None
        return proc.returncode

    def _cleanup_tmpdir(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
