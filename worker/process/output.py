"""Follow a run's output files into the log, within a budget.

A run's stdout and stderr go to two files in the state directory (``handle.py`` says
why files, not pipes). :class:`RunOutput` follows both into the worker's log, one
``run.output`` event per line, and holds what a flow that prints without pause may cost:

* **The event loop.** Each follower does a bounded amount of work per pass (one
  ``CHUNK`` read, at most ``EMIT_BATCH`` log lines between checkpoints) and yields to
  trio between passes, so heartbeats, polls, cancellations and ``/health`` go on beside
  a flood.
* **The log.** Each run has one ``budget.Budget`` for both streams, two token buckets:
  ``LINES_PER_SECOND`` (burst ``LINE_BURST``) and ``BYTES_PER_SECOND`` (burst
  ``BYTE_BURST``). Lines beyond it are dropped and counted, and said once per episode:
  one ``run.output_dropped`` WARNING when the flood ends (nothing dropped for
  ``QUIET_SECONDS``), every ``REPORT_SECONDS`` while it lasts, and when the run ends.
* **The CPU.** While the budget is spent, what the child wrote is skipped unread (its
  size is known from ``fstat``): its bytes are counted exactly, its lines estimated from
  a small sample (the report says "about"). The follower then looks again after
  ``FAST_POLL`` seconds (at once if the skip was over ``BIG_SKIP``), so a flood costs the
  worker a few system calls per look, not a pass over every byte. What remains is the
  kernel's freeing of the pages the flood wrote, in the releasing thread: about a fifth
  of a core for `yes` at ~1.2 GB/s (measured: the worker at 24 % of a core, 3 % with no
  flood).
* **The disk.** What the follower has consumed is given back to the filesystem: a hole
  is punched over it (``fallocate(PUNCH_HOLE)``) at once after a skip, and under the
  budget each time ``FILE_CAP`` more bytes were consumed. The file keeps its length
  (``ls -l`` grows, ``du`` does not), the child's ``O_APPEND`` writes go on at its end,
  and nothing unread is touched, so nothing is lost to a race.
  A file thus holds on disk ``FILE_CAP`` at most of what was read, plus what the run
  wrote since the last look and release: its rate times the worker's reaction, one look
  (``FAST_POLL``) and one release (the wait for the file's lock and the freeing). That
  reaction is not bounded by the worker alone (the lock, the CPU); measured on 2 shared
  cores, with `yes` writing ~1.2 GB/s: tens of MiB typically, 140 MiB at worst (0.1 s).
  Where no hole can be punched (a filesystem without it), or once a file's length
  reaches ``MAX_LENGTH``, it is truncated to 0 instead, which races with the writer:
  what the child appends between the follower's last look and the truncation is lost.
  Under the budget that is microseconds' worth, once per ``FILE_CAP``; over it, what a
  writer in a tight loop appends while the truncation waits for the file's lock: lines
  of the flood (uncounted: the reports are then a lower bound) and, should the run die
  in that instant, the stderr tail's last words.
  Punching and truncating run in a thread (at most ``RELEASING`` at once): both wait
  for the file's lock, which a writer in a tight loop holds most of the time (up to
  0.3 s measured).
* **The stderr tail.** The crash message's last lines of stderr (``budget.Tail``) are
  kept from the raw bytes, read or skipped, not from the lines logged: they are the
  last lines also when the budget dropped them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from worker.process import inotify
from worker.rules import decisions
from worker.rules.budget import (
    TAIL_WINDOW,
    Budget,
    Tail,
)

MAX_LINE: Final = 64 * 1024
"""Longer output lines are split, so a flow that never writes a newline cannot grow memory."""

CHUNK: Final = 64 * 1024
"""The most one pass reads: the memory and the time a pass costs are bounded by it."""

EMIT_BATCH: Final = 64
"""Log lines written between two checkpoints (a line costs tens of microseconds)."""

FAST_POLL: Final = 0.02
OUTPUT_POLL: Final = 0.2
WATCHED_POLL: Final = 5.0
"""How often an output file is looked at: every ``FAST_POLL`` s while the run writes (and
while the budget is spent), backing off once it is silent to every ``WATCHED_POLL`` s
where inotify wakes the follower when the file is written (``inotify.py``: a silent run
costs nothing), else to every ``OUTPUT_POLL`` s (a flood is then seen within that even
after a silence, and a silent run costs two ``fstat`` calls per ``OUTPUT_POLL``)."""

BIG_SKIP: Final = 4 * 1024 * 1024
"""A skip this large means a fast flood: the follower looks again at once (after its
release), not after ``FAST_POLL``, so what the flood holds on disk stays small."""

FILE_CAP: Final = 64 * 1024 * 1024
"""What an output file may hold on disk of what the follower has read: the files are a
transport, removed when the run ends, not an archive. Under the budget (256 KiB/s) a
run writes that much at most every ~4 minutes; over it, all it wrote is released at
every look. (Disk per stream: this, plus what a flood writes during the worker's
reaction; module docstring.)"""

MAX_LENGTH: Final = 1 << 40
"""A file with holes punched still grows in length: at this length (1 TiB; ext4 allows
16 TiB) it is truncated to 0 instead, so a flood of hours never meets the limit."""

RELEASING: Final = 4
"""Punches and truncations in flight at once (threads), so floods never take trio's
default threads (which ``getaddrinfo`` uses)."""

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
BLOCK: Final = 4096

STREAMS: Final = {"out": "stdout", "err": "stderr"}
_RELEASERS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("releasers")


@attrs.define
class RunOutput:
    """One run's output: its followers, its budget, its stderr tail."""

    log: Any
    budget: Budget = attrs.Factory(Budget)
    tail: Tail = attrs.Factory(Tail)

    async def follow(self, paths: list[tuple[Path, str]], exited: trio.Event, from_end: bool) -> None:
        """Follow each ``(path, "out"|"err")`` until ``exited`` is set and all is read (or
        skipped); then say what was dropped, if anything."""
        try:
            async with trio.open_nursery() as nursery:
                followers = [Follower(path, STREAMS[name], self) for path, name in paths]
                for follower in followers:
                    nursery.start_soon(follower.run_until, exited, from_end)
                await exited.wait()  # a follower asleep until its file is written wakes now
                for follower in followers:
                    follower.poke()
        finally:
            self.say_dropped(final=True)

    def say_dropped(self, final: bool = False) -> None:
        said = self.budget.report(final)
        if said is not None:
            self.log.warning(
                "run.output_dropped",
                detail=said.detail(),
                lines=said.lines,
                bytes=said.bytes,
                approximate=said.approximate,
                streams=",".join(said.streams),
                seconds=said.seconds,
            )

    def stderr_tail(self) -> str:
        return self.tail.lines()


@attrs.define
class Follower:
    """One output file followed from a position, in bounded passes (module docstring)."""

    path: Path
    stream: str
    run: RunOutput
    pos: int = 0
    partial: bytes = b""
    """The start of a line whose newline has not come yet (at most ``MAX_LINE``)."""
    resync: bool = False
    """Data was dropped inside a line: what comes next, up to a newline, is its rest."""
    density: float = 0.0
    """Newlines per byte in the last sample of skipped data (to estimate lines)."""
    end_at: int | None = None
    """Once the process has exited: the file's size then, the end of the follow. Nothing
    written after it (by a leftover of the run) is waited for, and nothing is released."""
    refused: bool = False
    """The last pass's chunk met the end of the budget."""
    skipped: int = 0
    """Bytes the last skip dropped."""
    released: int = 0
    """Up to where the file's blocks were given back (a hole punched)."""
    punch: bool = True
    """Holes can be punched (else the file is truncated)."""
    writer: int | None = None
    """A descriptor open for writing, to punch holes with (never written to)."""
    release_failed: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)
    """Set when the file was written (inotify) or the run exited: look now."""

    def poke(self) -> None:
        self.wake.set()

    @property
    def budget(self) -> Budget:
        return self.run.budget

    async def run_until(self, exited: trio.Event, from_end: bool) -> None:
        """Log the lines appended to the file until ``exited`` is set and all is consumed.

        Whatever goes wrong here costs the run its log lines, never the run: a bug is
        said once (``run.output_failed``, with its traceback) and the following stops."""
        try:
            await self._run_until(exited, from_end)
        except Exception as exc:
            self.run.log.warning(
                "run.output_failed", stream=self.stream, error=f"{type(exc).__name__}: {exc}", exc_info=exc
            )

    async def _open(self, exited: trio.Event) -> int | None:
        """The output file, read-only: never through a link, never blocking (a FIFO planted
        in its place), only a regular file. Out of descriptors (``EMFILE``), tried again
        every second until the run ends, said once. None: not to be followed."""
        said = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                if decisions.shortage(exc) is None or exited.is_set():
                    return None
                if not said:
                    said = True
                    self.run.log.warning("run.output_not_followed", stream=self.stream, error=str(exc))
                with trio.move_on_after(1.0):
                    await exited.wait()
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            self.run.log.warning("run.output_not_followed", stream=self.stream, error="not a regular file")
            return None

    async def _run_until(self, exited: trio.Event, from_end: bool) -> None:
        fd = await self._open(exited)
        if fd is None:
            return
        watcher = inotify.instance()
        watch = watcher.watch(fd, self.poke) if watcher is not None else None
        slowest = OUTPUT_POLL if watch is None else WATCHED_POLL
        try:
            if from_end:
                self.pos = os.fstat(fd).st_size
            pause = FAST_POLL
            while True:
                if self.end_at is None and exited.is_set():  # read once more: nothing is lost
                    self.end_at = os.fstat(fd).st_size
                step = await self.step(fd)
                self.run.say_dropped()
                if step != "idle":
                    pause = FAST_POLL
                if step == "read":
                    await trio.lowlevel.checkpoint()
                elif step == "skipped":
                    if self.end_at is None:
                        await trio.sleep(FAST_POLL if self.skipped < BIG_SKIP else 0)
                elif self.end_at is not None:
                    break
                else:
                    if not exited.is_set():
                        with trio.move_on_after(pause):
                            await self.wake.wait()
                        self.wake = trio.Event()  # before the next look: a write from now on wakes it
                    pause = min(2 * pause, slowest)
            if self.partial and not self.resync:  # the last line, without its newline
                await self.emit(self.split(b"\n"))
        finally:
            if watch is not None and watcher is not None:
                watcher.unwatch(watch, self.poke)
            os.close(fd)
            if self.writer is not None:
                os.close(self.writer)

    async def step(self, fd: int) -> str:
        """One bounded pass: ``idle`` (nothing new), ``read`` (a chunk, all of its lines
        admitted) or ``skipped`` (over the budget: the rest is dropped unread)."""
        size = os.fstat(fd).st_size
        if size < self.pos:  # truncated by someone else: what is there now is new
            self.pos, self.partial = 0, b""
        if self.end_at is not None:
            size = min(size, self.end_at)
        if size <= self.pos:
            if self.pos - self.released >= FILE_CAP:
                await self.release(fd, over_budget=False)
            return "idle"
        if self.budget.spent():
            await self.skip(fd, size)
            return "skipped"
        data = os.pread(fd, min(CHUNK, size - self.pos), self.pos)
        if not data:
            return "idle"
        self.pos += len(data)
        if self.stream == "stderr":
            self.run.tail.feed(data)
        self.refused = False
        await self.emit(self.split(data))
        if self.refused:
            await self.skip(fd, size)
            return "skipped"
        if self.pos - self.released >= FILE_CAP:
            await self.release(fd, over_budget=False)
        return "read"

    def split(self, data: bytes) -> Iterator[bytes]:
        """The lines of ``data`` (after the partial line kept) the budget admits, in
        order. From the first refusal to the end of ``data``, lines are only counted
        (``bytes.count``, never split), and ``refused`` is set."""
        buf = self.partial + data if self.partial else data
        self.partial = b""
        start = 0
        if self.resync:  # the rest of a line dropped in part
            end = buf.find(b"\n")
            self.budget.drop(1 if end >= 0 else 0, end + 1 if end >= 0 else len(buf), self.stream)
            if end < 0:
                return
            start, self.resync = end + 1, False
        while True:
            end = buf.find(b"\n", start)
            stop = end if end >= 0 else start + (len(buf) - start) // MAX_LINE * MAX_LINE
            for at in range(start, max(stop, start + (end >= 0)), MAX_LINE):
                piece = buf[at : min(at + MAX_LINE, stop)]
                if not self.budget.admit(len(piece)):
                    self.budget.drop(buf.count(b"\n", at), len(buf) - at, self.stream)
                    self.resync = not buf.endswith(b"\n")
                    self.refused = True
                    return
                yield piece
            if end < 0:
                self.partial = buf[stop:]
                return
            start = end + 1

    async def emit(self, lines: Iterator[bytes]) -> None:
        for n, line in enumerate(lines, 1):
            text = line.decode("utf-8", "replace").rstrip("\r")
            self.run.log.info("run.output", stream=self.stream, line=text)
            if n % EMIT_BATCH == 0:
                await trio.lowlevel.checkpoint()

    async def skip(self, fd: int, size: int) -> None:
        """Drop what is unread up to ``size`` without reading it: its bytes counted, its
        lines counted in (or estimated from) the last ``TAIL_WINDOW`` bytes, which also
        restart the stderr tail; then release the file's blocks."""
        begin = self.pos
        self.skipped = 0
        if size > begin:
            sample_at = max(begin, size - TAIL_WINDOW)
            lead = 1 if sample_at > begin else 0  # one byte more: does the sample start a line?
            got = os.pread(fd, size - sample_at + lead, sample_at - lead)
            sample = got[lead:]
            starts_line = got[:1] == b"\n" if lead else not (self.partial or self.resync)
            skipped = self.skipped = len(self.partial) + size - begin
            self.density = sample.count(b"\n") / max(len(sample), 1)
            self.budget.drop(self.density * (size - begin), skipped, self.stream, approximate=lead == 1)
            if self.stream == "stderr" and sample:
                self.run.tail.restart(sample, at_line_start=starts_line)
            self.partial = b""
            self.resync = not sample.endswith(b"\n")
            self.pos = sample_at + len(sample)
        await self.release(fd, over_budget=True)

    async def release(self, fd: int, over_budget: bool) -> None:
        """Give what was consumed back to the filesystem: punch a hole over it, or
        truncate the file (module docstring: the disk)."""
        if self.end_at is not None:
            return
        if self.writer is None:
            try:  # the file already open, not whatever its path names now
                self.writer = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                self.say_release_failed(exc)
                return
        end = self.pos - self.pos % BLOCK
        if self.punch and self.writer is not None and end > self.released:
            try:
                self.punch = await trio.to_thread.run_sync(
                    _punch_hole, self.writer, self.released, end, limiter=_releasers()
                )
            except OSError as exc:
                self.say_release_failed(exc)
                return
            if self.punch:
                self.released = end
        if self.punch and os.fstat(fd).st_size < MAX_LENGTH:
            return
        await self.truncate(fd, over_budget)

    def say_release_failed(self, exc: OSError) -> None:
        if not self.release_failed:
            self.release_failed = True
            self.run.log.warning("run.output_not_released", path=str(self.path), error=str(exc))

    async def truncate(self, fd: int, over_budget: bool) -> None:
        """Empty the consumed file (module docstring: the race). Under the budget only if
        nothing came since the last read; over it, what came is counted as dropped."""
        if self.writer is None:
            return
        try:
            late = await trio.to_thread.run_sync(
                _truncate, self.writer, fd, self.pos, over_budget, limiter=_releasers()
            )
        except OSError as exc:
            self.say_release_failed(exc)
            return
        if late is None:
            return  # more came: the next pass reads it, and truncates then
        if late > 0:
            self.budget.drop(self.density * late, late, self.stream, approximate=True)
            self.resync = True
        self.pos = self.released = 0


def _truncate(writer: int, fd: int, pos: int, over_budget: bool) -> int | None:
    """Truncate the file (open as ``writer``; read through ``fd`` up to ``pos``) to 0; return how much came
    after ``pos`` and was lost, or None (not truncated: under the budget, more came)."""
    late = os.fstat(fd).st_size - pos
    if late > 0 and not over_budget:
        return None
    os.ftruncate(writer, 0)  # waits for the file's lock while a writer holds it
    return max(late, 0)


def _punch_hole(fd: int, start: int, end: int) -> bool:
    """Free the blocks of ``[start, end)`` of the file, keeping its length; False if this
    system or filesystem cannot."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code))


@functools.cache
def _fallocate() -> Any:
    """libc's ``fallocate`` (64-bit offsets), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def _releasers() -> trio.CapacityLimiter:
    try:
        return _RELEASERS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(RELEASING)
        _RELEASERS.set(limiter)
        return limiter
