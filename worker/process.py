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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from worker import reaper
from worker.job import ProcessJobConfiguration

OUTPUT_LINGER: Final = 2.0
"""Seconds to keep reading output that grandchildren write after the child exited."""

MAX_LINE: Final = 64 * 1024
"""Longer output lines are split, so a flow that never writes a newline cannot grow memory."""

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

    async def _scoped(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._kill_policy()

    def sweep(self) -> None:
        """Kill what is left of the run (after its leader is gone)."""
        victims = reaper.sweep_run(self.run_id, self.pgid)
        if victims:
            self.log.info("run.swept", pids=victims)


@attrs.define(eq=False)
class RunHandle(Supervised):
    config: ProcessJobConfiguration = attrs.Factory(ProcessJobConfiguration)
    process: trio.Process | None = None
    tmpdir: Path | None = None

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
        out = subprocess.PIPE if self.config.stream_output else subprocess.DEVNULL
        env = {k: v for k, v in self.config.env.items() if v is not None}
        env.update(extra_env or {})
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
        """Wait for the exit (streaming output, applying the kill policy on stop) and
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
                    # the waiting task was cancelled (hard stop): terminate, then reap
                    self.signal_group(signal.SIGTERM)
                    with trio.move_on_after(self.grace):
                        await proc.wait()
                    if proc.returncode is None:
                        self.signal_group(signal.SIGKILL)
                        await proc.wait()
                if self.stop_requested or proc.returncode != 0:
                    self.sweep()
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
            async with trio.open_nursery() as nursery:
                killer = trio.CancelScope()
                nursery.start_soon(self._scoped, killer)
                await self._gone()
                killer.cancel()
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
