"""A run's output budget and its stderr tail: pure rules of what reaches the log.

Each run has one :class:`Budget` for both streams, two token buckets (lines and bytes per
second, each with a burst); what is over it is dropped, counted and said once per episode
(:class:`Dropped`). :class:`Tail` keeps the last lines of stderr from the raw bytes, for
the crash message. The clock is the caller's: every method takes ``now``. The follower
that spends the budget is ``worker.process.output``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import attrs

LINES_PER_SECOND: Final = 200.0
LINE_BURST: Final = 1000.0
"""A run's lines per second into the log, sustained, and how many may come at once.
200/s is more than a person reads or a progress bar needs; a burst of 1000 lets a long
traceback, a table or a dump of settings through whole. Past it, the worker's log (a
journal, a file, a container log) grows by about 65 KB/s per flooding run (200 JSON
lines of ~330 bytes, measured), not by GB."""

BYTES_PER_SECOND: Final = 256 * 1024
BYTE_BURST: Final = 1024 * 1024
"""A run's bytes per second into the log (and burst): a flow that prints long lines
(a JSON document per line, a base64 blob) is held by size, not only by count. 256 KiB/s
is 200 lines of 1.3 KB; a burst of 1 MiB lets the longest line (``MAX_LINE``) through."""

REPORT_SECONDS: Final = 10.0
QUIET_SECONDS: Final = 1.0
"""Dropped lines are said when nothing was dropped for ``QUIET_SECONDS`` (the flood
ended), every ``REPORT_SECONDS`` while it lasts, and when the run ends."""

STDERR_TAIL_LINES: Final = 10
STDERR_TAIL_BYTES: Final = 2048
"""How much of a run's last stderr lines a crash message carries (a traceback's last
lines, a ``ModuleNotFoundError``): enough to see the error, bounded for the UI."""

TAIL_WINDOW: Final = 4 * STDERR_TAIL_BYTES
"""The raw stderr bytes kept for the tail (and sampled to estimate skipped lines)."""


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    tokens: float = attrs.field()
    stamp: float | None = None

    @tokens.default
    def _full(self) -> float:
        return self.burst

    def level(self, now: float) -> float:
        """The tokens available at ``now`` (refilled since the last look)."""
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        if self.stamp is None or now > self.stamp:
            self.stamp = now
        return self.tokens

    def take(self, n: float, now: float) -> bool:
        if self.level(now) < n:
            return False
        self.tokens -= n
        return True


@attrs.frozen
class Dropped:
    """One episode's report: what the budget kept out of the log."""

    lines: int
    bytes: int
    approximate: bool
    streams: tuple[str, ...]
    seconds: float

    def detail(self) -> str:
        about = "about " if self.approximate else ""
        return (
            f"{about}{self.lines} lines ({_size(self.bytes)}) dropped: over the output budget "
            f"({LINES_PER_SECOND:.0f} lines/s, {BYTES_PER_SECOND // 1024} KiB/s)"
        )


@attrs.define
class Budget:
    """What of one run's output may reach the log: two token buckets (lines, bytes), and
    the count of what they refused, reported once per episode (:meth:`report`)."""

    clock: Callable[[], float] = time.monotonic
    lines: TokenBucket = attrs.Factory(lambda: TokenBucket(LINES_PER_SECOND, LINE_BURST))
    bytes: TokenBucket = attrs.Factory(lambda: TokenBucket(float(BYTES_PER_SECOND), float(BYTE_BURST)))
    dropped_lines: float = 0.0
    dropped_bytes: int = 0
    approximate: bool = False
    streams: set[str] = attrs.Factory(set)
    episode_start: float | None = None
    last_drop: float = 0.0
    last_report: float = 0.0
    total_lines: float = 0.0
    """Every line dropped over the run's life (for a counter)."""

    def spent(self) -> bool:
        """No line could pass now: the follower skips instead of reading."""
        now = self.clock()
        return self.lines.level(now) < 1 or self.bytes.level(now) < 1

    def admit(self, size: int) -> bool:
        """Take one line of ``size`` bytes if both buckets allow it (else take nothing)."""
        now = self.clock()
        if self.lines.level(now) < 1 or self.bytes.level(now) < size:
            return False
        self.lines.take(1, now)
        self.bytes.take(size, now)
        return True

    def drop(self, lines: float, size: int, stream: str, approximate: bool = False) -> None:
        if lines <= 0 and size <= 0:
            return
        now = self.clock()
        if self.episode_start is None:
            self.episode_start = self.last_report = now
        self.dropped_lines += lines
        self.total_lines += lines
        self.dropped_bytes += size
        self.approximate = self.approximate or approximate
        self.streams.add(stream)
        self.last_drop = now

    def report(self, final: bool = False) -> Dropped | None:
        """The episode's count if it is time to say it (and start counting anew), else None."""
        if self.episode_start is None:
            return None
        now = self.clock()
        quiet = now - self.last_drop >= QUIET_SECONDS
        if not (final or quiet or now - self.last_report >= REPORT_SECONDS):
            return None
        said = Dropped(
            round(self.dropped_lines),
            self.dropped_bytes,
            self.approximate,
            tuple(sorted(self.streams)),
            round(now - self.episode_start, 1),
        )
        self.dropped_lines, self.dropped_bytes, self.approximate = 0.0, 0, False
        self.streams = set()
        self.last_report = now
        self.episode_start = None if (final or quiet) else now
        return said


@attrs.define
class Tail:
    """The last bytes a run wrote to stderr, and its last non-blank lines from them."""

    raw: bytes = b""
    clipped: bool = False
    """``raw`` starts inside a line (cut by the window, or after a gap)."""

    def feed(self, data: bytes) -> None:
        """Bytes that follow what was fed before."""
        joined = self.raw + data
        if len(joined) > TAIL_WINDOW:
            cut = len(joined) - TAIL_WINDOW
            self.clipped = joined[cut - 1 : cut] != b"\n"
            joined = joined[cut:]
        self.raw = joined

    def restart(self, data: bytes, at_line_start: bool) -> None:
        """Bytes after a gap (skipped unread): what was fed before no longer precedes them."""
        self.raw = b""
        self.clipped = not at_line_start
        self.feed(data)

    def lines(self) -> str:
        """At most ``STDERR_TAIL_LINES`` lines and ``STDERR_TAIL_BYTES`` characters, newest kept."""
        text = self.raw.decode("utf-8", "replace")
        if self.clipped and "\n" in text:
            text = text.split("\n", 1)[1]  # the end of a line whose start is gone
        kept: list[str] = []
        size = 0
        for line in reversed(text.split("\n")):
            line = line.rstrip("\r")[: STDERR_TAIL_BYTES - 1]
            if not line.strip():
                continue
            size += len(line) + 1
            if size > STDERR_TAIL_BYTES or len(kept) == STDERR_TAIL_LINES:
                break
            kept.append(line)
        return "\n".join(reversed(kept))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
