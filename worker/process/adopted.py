"""A run left by a previous worker (``AdoptedHandle``): identified by pid and start time, watched
through a pidfd (or polled), signalled only while it is still that process."""

from __future__ import annotations

import os
import signal
from typing import ClassVar

import attrs
import trio

from worker.process import reaper
from worker.process.handle import ADOPTED_POLL, Supervised


@attrs.define(eq=False)
class AdoptedHandle(Supervised):
    """A run's process left by a previous worker: watched until it exits, still cancellable.

    It is not our child, so its exit status cannot be known; the caller reads the run's
    state afterwards instead. Found in its cgroup (``run-<id>``, ``cgroups.py``), it is
    ended through it as a spawned run is; its pid and start time stay the identity that
    says the leader still runs.
    """

    ADOPTED: ClassVar[bool] = True
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
                await self.end_remains(self.stop_requested)
                self.remove_output()
