"""When the worker's idle loops look again (pure): the cancellation poll and the reclaim look.

An idle worker should cost its server what Prefect's worker costs it: one poll per
interval (issue 22). Two loops used to add to that on their own clocks; here is when
they look instead.

* **The cancellation poll** (``service/cancelpoll.py``) reads the runs in hand that are
  CANCELLING. While the events stream is up, and has been since before the last look, a
  cancellation arrives as an event the moment it is asked for (confirmed by reading the
  run), so the poll is only a safety net against an event the server lost: it looks
  every :data:`CANCEL_SAFETY_SECONDS` (Prefect 3.9.1's worker has no such poll at all).
  When the stream drops, or has come back since the last look (events sent meanwhile
  are lost), it looks every ``cancel_poll_seconds`` again.
* **The reclaim look** (``fleet/reclaim.py``) reads the pool's workers. A peer heard from
  ``silent`` seconds ago cannot be lost before ``lost_after - silent`` seconds from now,
  and a worker not heard from at the last look cannot be lost before ``reclaim_after``
  after it: so the next look is due when the first peer seen could cross its line
  (:func:`next_look`), at the latest after a ceiling. A dead peer is still noticed within
  a couple of seconds of crossing its line, as when the pool was looked at every half
  poll interval, for a fraction of the requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from worker.rules.fleet import ONLINE_HEARTBEATS

CANCEL_SAFETY_SECONDS: Final = 120.0
"""With the events stream up, the cancellation poll's interval (at least
``cancel_poll_seconds``): against an event the server dropped; the run is then stopped
two minutes late rather than never."""

DEADLINE_MARGIN: Final = 1.5
"""Seconds past a peer's deadline at which it is looked at: the server's ``Date`` header
counts whole seconds, and the request that read the silences took a moment."""


def cancel_poll_pause(cancel_poll_seconds: float, stream_steady: bool) -> float:
    """The cancellation poll's pause: ``cancel_poll_seconds``, or the safety interval
    while the events stream has been up since before the last look (``stream_steady``)."""
    if stream_steady:
        return max(cancel_poll_seconds, CANCEL_SAFETY_SECONDS)
    return cancel_poll_seconds


def lost_after(reclaim_after: float, heartbeat_interval: float | None) -> float:
    """Seconds of silence after which a peer's runs may be reclaimed (as
    ``fleet.reclaim_verdict`` judges it: ``reclaim_after``, and at least the
    ``ONLINE_HEARTBEATS`` of its own intervals during which Prefect calls it ONLINE)."""
    return max(reclaim_after, ONLINE_HEARTBEATS * (heartbeat_interval or 0.0))


def next_look(
    peers: Iterable[tuple[float | None, float]], short: float, ceiling: float, linger: float
) -> float:
    """Seconds until the reclaim loop looks at the pool again, given each peer's
    ``(silent, lost_after)`` at this look (``silent`` None: never heard from).

    * A peer that crossed its line within the last ``linger`` seconds: ``short`` (the
      loop watches its runs closely, as a run claimed just before its owner died
      becomes reclaimable only ``reclaim_after`` after that claim).
    * Otherwise the first live peer's deadline (plus :data:`DEADLINE_MARGIN`), at least
      ``short`` and at most ``ceiling``.
    """
    wait = ceiling
    for silent, limit in peers:
        if silent is None:
            continue
        if limit < silent <= limit + linger:
            return short
        if silent <= limit:
            wait = min(wait, limit - silent + DEADLINE_MARGIN)
    return max(wait, min(short, ceiling))
