"""Wake a task when a file it follows is written: one inotify instance for the whole worker.

Why: a run's output followers (``output.py``) looked at their files every 0.2 s while the
run was silent, ten looks a second per run: a worker's largest cost per run-second (the
VM bench: about 35 ms per run-second under emulation, with or without per-run cgroups).
Here a follower sleeps until its file is written (``IN_MODIFY``), its run exits, or a slow
safety look is due.

* **One instance per worker** (``fs.inotify.max_user_instances`` is 128 per user by
  default; watches are plentiful): made on first use, read by one trio system task that
  wakes the watchers of the files named in each event.
* **The file the follower holds**: the watch is added through ``/proc/self/fd/N``, so it
  is on the inode the follower opened, whatever the path names by then.
* **Never the run's cost**: a queue overflow (``IN_Q_OVERFLOW``) wakes every watcher; an
  instance or a watch that cannot be had (limits reached, not Linux) gives ``None``, and
  that follower looks at its file on a timer, as before.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from typing import Final

import attrs
import trio

IN_MODIFY: Final = 0x00000002
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
READ_PAUSE: Final = 0.02
"""The reader's rest between two reads: a write is seen within it (the followers' own
``FAST_POLL`` while a run writes)."""
_EVENT: Final = struct.Struct("iIII")
"""``struct inotify_event`` without its name: wd, mask, cookie, len."""


@attrs.define(eq=False)
class Inotify:
    """The worker's inotify instance and who waits on which watch."""

    fd: int
    libc: ctypes.CDLL
    watchers: dict[int, list[Callable[[], None]]] = attrs.Factory(dict)

    def watch(self, fd: int, wake: Callable[[], None]) -> int | None:
        """Call ``wake`` whenever the file open as ``fd`` is written; the watch, or None."""
        wd = int(self.libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), IN_MODIFY))
        if wd < 0:
            return None
        self.watchers.setdefault(wd, []).append(wake)
        return wd

    def unwatch(self, wd: int, wake: Callable[[], None]) -> None:
        waiting = self.watchers.get(wd, [])
        if wake in waiting:
            waiting.remove(wake)
        if not waiting:
            self.watchers.pop(wd, None)
            self.libc.inotify_rm_watch(self.fd, wd)  # (gone already if the file was removed)

    def dispatch(self, data: bytes) -> None:
        """Wake the watchers the events in ``data`` name (everyone on an overflow)."""
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                for waiting in list(self.watchers.values()):
                    for wake in waiting:
                        wake()
            elif mask & IN_IGNORED:  # the watch is gone (its file removed, or unwatched)
                self.watchers.pop(wd, None)
            else:
                for wake in self.watchers.get(wd, []):
                    wake()

    async def read_loop(self) -> None:
        """The system task: read events, for the worker's life, at most once per
        ``READ_PAUSE`` (a flood writes thousands of times a second: its events wait in
        the kernel meanwhile, the same file's coalesced into one)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    data = os.read(self.fd, 64 * 1024)
                except BlockingIOError:
                    continue
                self.dispatch(data)
                await trio.sleep(READ_PAUSE)
        finally:
            os.close(self.fd)


_INSTANCE: trio.lowlevel.RunVar[Inotify | None] = trio.lowlevel.RunVar("inotify", None)


def instance() -> Inotify | None:
    """The worker's inotify instance (made on first use, in this trio run); None where
    there is none to be had now (then followers look on a timer; the next follower tries
    again: the worker may have been short of descriptors only for a moment)."""
    made = _INSTANCE.get(None)
    if made is not None:
        return made
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    made = Inotify(fd, libc)
    trio.lowlevel.spawn_system_task(made.read_loop, name="flow-worker inotify")
    _INSTANCE.set(made)
    return made
