"""A warm-forked run's process (``warm_start``): re-parented to the worker, waited through a pidfd."""

from __future__ import annotations

import os

import attrs
import trio

from worker.process.handle import ADOPTED_POLL, pidfd_open


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
        fd = pidfd_open(self.pid)
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
