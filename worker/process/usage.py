"""What each run costs: peak memory and CPU seconds of its whole process tree, from /proc.

Every run's child starts its own session, so a run's tree is the set of processes whose
session id is the child's pid. One :class:`Meter` task samples them all every
``SAMPLE_SECONDS`` with one pass over ``/proc/*/stat`` (one read per process gives the
session, the resident set and the CPU times), only while runs are tracked:

* memory: the tree's resident set, summed; the peak is the largest sum seen, or the
  leader's own high-water mark (``VmHWM``) if that is larger (a spike between samples);
* CPU: ``utime + stime + cutime + cstime`` summed over the tree (a child's time moves to
  its parent's ``c*time`` when reaped, so nothing is counted twice), and read once more
  from the leader's zombie when it exits (``final``), before it is reaped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import attrs
import trio

SAMPLE_SECONDS: Final = 0.5
"""Often enough to see a flow that holds memory for a second; one /proc pass costs ~ms."""
_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
PROC: Final = Path("/proc")


@attrs.frozen
class Stat:
    pid: int
    ppid: int
    session: int
    cpu_ticks: int
    rss_pages: int


def parse_stat(text: str) -> Stat:
    """The fields of ``/proc/PID/stat`` used here (the command may contain spaces and ')')."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    # after the command: state ppid pgrp session … utime(14) stime cutime cstime … rss(24)
    return Stat(
        pid=int(head.split("(", 1)[0]),
        ppid=int(fields[1]),
        session=int(fields[3]),
        cpu_ticks=sum(int(f) for f in fields[11:15]),
        rss_pages=int(fields[21]),
    )


@attrs.define
class Usage:
    """One run's tree: now, at its peak, and its CPU so far."""

    rss: int = 0
    peak: int = 0
    cpu_seconds: float = 0.0

    def add(self, rss: int, cpu_seconds: float, hwm: int = 0) -> None:
        self.rss = rss
        self.peak = max(self.peak, rss, hwm)
        self.cpu_seconds = max(self.cpu_seconds, cpu_seconds)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # gone meanwhile, or not ours to read
        return None


def high_water(pid: int) -> int:
    """The process's peak resident set (``VmHWM``) in bytes; 0 if unknown."""
    text = _read(PROC / str(pid) / "status") or ""
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def sample(sessions: set[int]) -> dict[int, tuple[int, float]]:
    """session → (resident bytes, CPU seconds) of the processes in those sessions."""
    out: dict[int, tuple[int, float]] = {}
    entries = list(os.scandir(PROC))  # (OSError, e.g. EMFILE: the caller skips this sample)
    for entry in entries:
        if not entry.name.isdigit():
            continue
        text = _read(Path(entry.path) / "stat")
        if text is None:
            continue
        try:
            stat = parse_stat(text)
        except (ValueError, IndexError):
            continue
        if stat.session in sessions:
            rss, cpu = out.get(stat.session, (0, 0.0))
            out[stat.session] = (rss + stat.rss_pages * _PAGE, cpu + stat.cpu_ticks / _TICKS)
    return out


def tree(root: int) -> list[int]:
    """``root`` and its descendants now (one pass over ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        text = _read(Path(entry.path) / "stat")
        try:
            stat = parse_stat(text) if text is not None else None
        except (ValueError, IndexError):
            stat = None
        if stat is not None:
            children.setdefault(stat.ppid, []).append(stat.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_pss(root: int) -> int:
    """Proportional set size of ``root`` and its descendants (``smaps_rollup``): a page
    shared by N processes counts 1/N in each, so the sum shows what forking from a
    preloaded engine saves, which resident sizes hide. Read on demand (``/metrics``): it
    walks page tables, too dear for the 0.5 s sampler."""
    total = 0
    for pid in tree(root):
        for line in (_read(PROC / str(pid) / "smaps_rollup") or "").splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


@attrs.define
class Meter:
    """Samples every tracked run's tree; runs are tracked by the pid that leads their session."""

    tracked: dict[int, Usage] = attrs.Factory(dict)
    _wake: trio.Event = attrs.Factory(trio.Event)

    def track(self, pid: int) -> Usage:
        usage = self.tracked.setdefault(pid, Usage())
        self._wake.set()
        return usage

    def final(self, pid: int) -> None:
        """The leader has exited and is not reaped yet: its CPU times are complete now."""
        usage = self.tracked.pop(pid, None)
        text = _read(PROC / str(pid) / "stat")
        if usage is not None and text is not None:
            try:
                usage.add(usage.rss, parse_stat(text).cpu_ticks / _TICKS)
            except (ValueError, IndexError):
                pass

    def untrack(self, pid: int) -> None:
        self.tracked.pop(pid, None)

    def sample_now(self) -> None:
        if not self.tracked:
            return
        try:
            seen = sample(set(self.tracked))
        except OSError:  # out of descriptors (EMFILE): this sample is skipped, the next one counts
            return
        for pid, usage in list(self.tracked.items()):
            rss, cpu = seen.get(pid, (0, 0.0))
            usage.add(rss, cpu, high_water(pid))

    async def loop(self) -> None:
        while True:
            if not self.tracked:
                await self._wake.wait()
                self._wake = trio.Event()
            self.sample_now()
            await trio.sleep(SAMPLE_SECONDS)
