"""The stop policy: the first signal drains, the second (or ``drain_timeout``) stops the runs.

=====================  ==================================================================
what happens           what the worker does
=====================  ==================================================================
1st SIGTERM / SIGINT   claim nothing more (the poll scope is cancelled); running flows may
                       finish for up to ``drain_timeout`` (600 s); heartbeats,
                       cancellations and reports go on; systemd's stop timeout is
                       extended a tick at a time (its watchdog is fed as long as the
                       heartbeat loop keeps its word: ``liveness.py``; the poll loop,
                       ended, is no longer judged)
2nd signal, or the     every remaining run: intent over the control channel
drain_timeout          (``relinquish``, or ``reschedule`` with ``on_stop = "reschedule"``),
                       SIGTERM to its group, ``cancel_grace_seconds``, SIGKILL; then
                       CRASHED "The worker stopped before …" or SCHEDULED (``on_stop``)
=====================  ==================================================================

The trigger is injectable: :meth:`Stopper.request` is what a signal calls, and a test may
call it directly.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio

from worker.host.settings import Settings
from worker.host.systemd import Notifier
from worker.rules import decisions
from worker.runs.inhand import InHand

log = structlog.get_logger("flow_worker")
DRAIN_LOG_SECONDS: Final = 15.0
"""While draining, how often the runs still awaited are logged."""


@attrs.define
class Stopper:
    settings: Settings
    in_hand: InHand
    notifier: Notifier
    poll_scope: trio.CancelScope
    """Cancelled by the first request: the poll loop ends, the runs nursery drains."""
    status_line: Callable[[], str]
    """The ``STATUS=`` line sent to systemd with each stop notification."""

    def request(self, reason: str, loops: trio.Nursery) -> None:
        """A stop request: the first drains, any later one stops the runs."""
        if self.in_hand.stopping:
            self.stop_runs(reason)
            return
        self.in_hand.stopping = True
        self.poll_scope.cancel()
        self.notifier.stopping(self.status_line())
        log.info(
            "worker.stopping",
            reason=reason,
            active_runs=sorted(self.in_hand.live),
            drain_timeout=self.settings.drain_timeout,
        )
        loops.start_soon(self._drain_watch)

    def stop_runs(self, reason: str) -> None:
        """End every remaining run now: intent, SIGTERM, grace, SIGKILL, then ``on_stop``."""
        self.in_hand.stopped_runs = True
        log.warning(
            "worker.stopping_runs",
            reason=reason,
            active_runs=sorted(self.in_hand.live),
            on_stop=self.settings.on_stop,
        )
        intent = decisions.stop_intent(self.settings.on_stop)
        for handle in self.in_hand.live.values():
            if handle is not None:
                handle.stop(f"worker stopping: {reason}", intent)

    async def signal_loop(self, loops: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                self.request(f"second {name}" if self.in_hand.stopping else name, loops)

    async def _drain_watch(self) -> None:
        """While draining: keep systemd's stop timeout extended (a tick at a time, so a hung
        drain stops asking), log what is awaited, stop runs at the deadline. (The watchdog
        is not fed here: ``liveness.Liveness.watch`` goes on through the drain.)"""
        deadline = trio.current_time() + self.settings.drain_timeout
        tick = min(DRAIN_LOG_SECONDS, (self.notifier.watchdog_seconds or 3 * DRAIN_LOG_SECONDS) / 3)
        next_log = trio.current_time() + DRAIN_LOG_SECONDS
        live = self.in_hand.live
        while True:
            now = trio.current_time()
            if now >= deadline and not self.in_hand.stopped_runs and live:
                self.stop_runs(f"drain_timeout of {self.settings.drain_timeout:g}s reached")
            extra = self.settings.cancel_grace_seconds if self.in_hand.stopped_runs else 0.0
            self.notifier.extend_timeout(tick + extra + 30, self.status_line())
            if now >= next_log and live:
                next_log = now + DRAIN_LOG_SECONDS
                log.info(
                    "worker.draining", active_runs=sorted(live), seconds_left=max(0, round(deadline - now))
                )
            await trio.sleep(tick if now >= deadline else min(tick, deadline - now))
