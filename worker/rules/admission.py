"""Admission by memory: whether the host has room for one more run (pure).

Theory of operation
-------------------
Before it claims a due run, the worker asks: once every run it has just started has
grown to its expected size, and this one too, will the host (or the worker's cgroup)
still have ``memory_reserve`` available? If not, the run is *held*: not claimed, so it
stays SCHEDULED for any worker with room, and this worker says so once and looks again
at its next poll or when one of its runs ends.

A run's expected size is learned: the largest peak (whole process tree, ``usage.py``)
of the last ``HISTORY`` runs of the same deployment, or ``DEFAULT_RUN_BYTES`` before any
is known. A run that has not reached its expected size yet still owes the difference
(``Book.growth``), so an engine that is slow to import Prefect is not mistaken for free
memory. A run with a ``memory_max`` (its cgroup's limit, ``runlimits.py``) is expected to
take all of it: the limit, from its job variables when the poll shows them, else the
last one its deployment's runs were configured with (``Book.limited``), replaces the
learned size, so what is admitted can never outgrow the host. Everything here is
arithmetic on numbers handed in; reading ``/proc`` is ``memory.py`` and ``usage.py``.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Final

import attrs

MIB: Final = 1024 * 1024
DEFAULT_RUN_BYTES: Final = 150 * MIB
"""Expected size of a run of a deployment never seen: a Prefect engine is ~80-100 MiB."""
HISTORY: Final = 5
"""Peaks remembered per deployment; the expected size is their maximum."""
MIN_RESERVE: Final = 256 * MIB
DEFAULT_SHARE: Final = 0.10
"""The default ``memory_reserve``: 10 % of the memory there is, at least ``MIN_RESERVE``."""

_UNITS: Final = {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB, "T": 1024 * 1024 * MIB}


def parse_reserve(text: str) -> float | int:
    """``memory_reserve`` as bytes (int) or as a share of the memory there is (float < 1).

    ``"512M"``, ``"2G"``, ``"1.5G"``, ``"1048576"`` (bytes), ``"10%"``; ``"0"``: admission off.
    Raises ``ValueError`` with what is accepted.
    """
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    share = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", value)
    if share:
        percent = float(share.group(1))
        if percent > 100:
            raise ValueError("a share of memory is at most 100%")
        return percent / 100
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)", value)
    if not size:
        raise ValueError("expected a size such as 512M or 2G, or a share of memory such as 10%")
    return int(float(size.group(1)) * _UNITS[size.group(2)])


def reserve_bytes(setting: str | None, total: int) -> int:
    """The reserve in bytes for a host (or cgroup) of ``total`` bytes; None: the default."""
    if setting is None:
        return max(MIN_RESERVE, int(total * DEFAULT_SHARE))
    parsed = parse_reserve(setting)
    return int(total * parsed) if isinstance(parsed, float) else parsed


@attrs.frozen
class Room:
    """What admission saw, for the log line, ``STATUS=`` and ``/metrics``."""

    available: int
    reserve: int
    growth: int
    """Bytes the runs in hand are still expected to grow by."""
    admitted: int
    held: int
    needed: int = 0
    """Expected size of the first run held (0: none held)."""

    @property
    def short_by(self) -> int:
        return max(0, self.needed + self.growth + self.reserve - self.available) if self.held else 0


@attrs.define
class Book:
    """Expected sizes (learned per deployment) and the runs in hand that may still grow."""

    default: int = DEFAULT_RUN_BYTES
    peaks: dict[str | None, collections.deque[int]] = attrs.Factory(dict)
    in_hand: dict[str, tuple[int, int]] = attrs.Factory(dict)
    """run id → (expected bytes, bytes its tree uses now)."""
    limits: dict[str | None, int] = attrs.Factory(dict)
    """deployment id → the ``memory_max`` its last configured run had."""

    def expected(self, deployment_id: str | None, memory_max: int | None = None) -> int:
        """A run's expected size: its ``memory_max`` (given, else its deployment's last),
        else the largest recent peak of its deployment, else the default."""
        if memory_max is None or memory_max < 0:
            memory_max = self.limits.get(deployment_id)
        if memory_max is not None:
            return memory_max
        seen = self.peaks.get(deployment_id)
        return max(seen) if seen else self.default

    def growth(self) -> int:
        return sum(max(0, expected - now) for expected, now in self.in_hand.values())

    def admit(
        self, runs: Sequence[tuple[str, str | None, *tuple[int | None, ...]]], available: int, reserve: int
    ) -> tuple[list[str], Room]:
        """Which of ``runs`` ((run id, deployment id[, memory_max or None]), in the server's
        order) fit now.
        Admitted runs are booked at their expected size; the first that does not fit
        stops admission (the runs behind it wait their turn, as on the server)."""
        growth = self.growth()
        taken: list[str] = []
        for run_id, deployment_id, *memory_max in runs:
            size = self.expected(deployment_id, memory_max[0] if memory_max else None)
            if available - growth - size < reserve:
                return taken, Room(available, reserve, growth, len(taken), len(runs) - len(taken), size)
            growth += size
            taken.append(run_id)
            self.in_hand[run_id] = (size, 0)
        return taken, Room(available, reserve, growth, len(taken), 0)

    def book(self, run_id: str, deployment_id: str | None) -> None:
        """A run in hand that admission did not see (adopted, or admission off)."""
        self.in_hand.setdefault(run_id, (self.expected(deployment_id), 0))

    def limited(self, run_id: str, deployment_id: str | None, memory_max: int | None) -> None:
        """The run was configured with this ``memory_max`` (None, or ``UNLIMITED``: none):
        it is booked at that size from now on, and its deployment's next runs too."""
        if memory_max is None or memory_max < 0:
            self.limits.pop(deployment_id, None)
            return
        self.limits[deployment_id] = memory_max
        if run_id in self.in_hand:
            self.in_hand[run_id] = (memory_max, self.in_hand[run_id][1])

    def using(self, run_id: str, now: int) -> None:
        """The run's tree uses ``now`` bytes (a sample)."""
        if run_id in self.in_hand:
            self.in_hand[run_id] = (self.in_hand[run_id][0], now)

    def finished(self, run_id: str, deployment_id: str | None, peak: int | None) -> None:
        """The run ended; its peak (if measured) teaches the deployment's size."""
        self.in_hand.pop(run_id, None)
        if peak:
            self.peaks.setdefault(deployment_id, collections.deque(maxlen=HISTORY)).append(peak)
