"""The cancellation poll: the runs in hand that the server says are CANCELLING.

Cancellations arrive first as events (``events.py``: a CANCELLING event is confirmed by
reading the run, then ``InHand.cancel``). This loop is the fallback: every
``cancel_poll_seconds`` it reads the runs in hand that are CANCELLING (one request, and
none with nothing in hand). While the events stream is up, and has been since before the
last look, it looks only every ``cadence.CANCEL_SAFETY_SECONDS``, as Prefect's worker
relies on its event subscription (issue 22); the moment the stream drops, the next look
is ``cancel_poll_seconds`` after the previous one again, and a look follows every
reconnection at that interval (events sent while it was down are not replayed).
"""

from __future__ import annotations

import math
import random

import attrs
import trio

from worker.host.settings import Settings
from worker.prefect.api import PrefectClient
from worker.prefect.outage import API_ERRORS, Outage
from worker.rules import cadence
from worker.rules.models import StateType
from worker.rules.retry import jittered
from worker.runs.inhand import InHand


@attrs.define
class CancelPoll:
    settings: Settings
    client: PrefectClient
    in_hand: InHand
    outage: Outage
    rng: random.Random = attrs.Factory(random.Random)
    up_since: float = math.inf
    """trio time since which the events stream is up (inf: it is down)."""
    dropped: trio.Event = attrs.Factory(trio.Event)
    """Set (and replaced) when the stream drops."""
    last_look: float = -math.inf
    looks: int = 0
    """Looks that read the API (for the tests and the status)."""

    def connected(self, connected: bool) -> None:
        """The events stream's news (``events.stream``'s ``on_connected``)."""
        if connected and self.up_since == math.inf:
            self.up_since = trio.current_time()
        elif not connected and self.up_since != math.inf:
            self.up_since = math.inf
            self._look_soon()

    def unchecked(self) -> None:
        """A CANCELLING event could not be checked (its read failed): the next look is
        ``cancel_poll_seconds`` after the last, as after a drop (review of issue 22: a
        busy server's cancel waited the safety interval)."""
        if self.up_since != math.inf:
            self.up_since = trio.current_time()  # not steady until a look after now
        self._look_soon()

    def _look_soon(self) -> None:
        """Wake :meth:`pause`: the next look is ``cancel_poll_seconds`` after the last."""
        self.dropped.set()
        self.dropped = trio.Event()

    def steady(self) -> bool:
        """The stream has been up since before the last look: no event was missed."""
        return self.up_since <= self.last_look

    async def loop(self) -> None:
        self.last_look = trio.current_time()
        while True:
            await self.pause()
            self.last_look = trio.current_time()
            await self.look()

    async def pause(self) -> None:
        """Until the next look: the safety interval while the stream is steady, cut back
        to ``cancel_poll_seconds`` after the last look when it drops."""
        base = self.settings.cancel_poll_seconds
        steady, dropped = self.steady(), self.dropped
        with trio.move_on_after(jittered(cadence.cancel_poll_pause(base, steady), self.rng)):
            if not steady:
                await trio.sleep_forever()
            await dropped.wait()
            await trio.sleep_until(self.last_look + jittered(base, self.rng))

    async def look(self) -> None:
        watched = self.in_hand.watched()
        if not watched:
            return
        self.looks += 1
        try:
            found = await self.client.filter_flow_runs(watched, [StateType.CANCELLING])
        except API_ERRORS as exc:
            self.outage.failed(exc, "cancel_check")
            return
        for flow_run in found:
            self.in_hand.cancel(flow_run.id, via="poll")
