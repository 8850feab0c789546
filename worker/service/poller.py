"""The poll loop: which due runs this worker takes, and when it looks again.

Each poll reads the pool's due runs (with a look-ahead, so the loop wakes when a run seen
early becomes due), judges them (``decisions.triage``: known, shunned, ``--limit``), holds
them while the host is short (``SHORT_HOLD``) or has no memory for them
(``admission.py``), and starts one task per run taken (``run.Runner.run``). The pause
between polls ends early on a wake: an event said a run became due, the API is back, or a
run left while others were held. ``--once`` drains what is due now instead.
"""

from __future__ import annotations

import datetime
import math
import random
from collections.abc import Callable
from typing import Any, Final

import attrs
import structlog
import trio

from worker.host import memory
from worker.host.logs import Once
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.host.systemd import Notifier
from worker.prefect.answers import ApiNotFound
from worker.prefect.api import PrefectClient
from worker.prefect.outage import API_ERRORS, Outage
from worker.rules import admission, decisions
from worker.rules.models import FlowRun
from worker.rules.retry import jittered
from worker.rules.runlimits import LimitError, RunLimits
from worker.runs.inhand import InHand
from worker.runs.run import Runner
from worker.service.liveness import Liveness
from worker.service.status import Status

log = structlog.get_logger("flow_worker")

SHORT_HOLD: Final = 30.0
"""After a run was deferred for a shortage, how long due runs wait, unless a started run
ends first: long enough to spare the API a claim-and-return per run and poll, short enough
that a host with room again (a disk cleaned) starts its backlog within half a minute."""


def memory_max(flow_run: FlowRun) -> int | None:
    """The run's own ``memory_max`` job variable, if the poll shows one that can be read
    (admission books the run at that size; a bad one fails the run later, when configured)."""
    try:
        return RunLimits.parse(flow_run.job_variables or {}).memory_max
    except LimitError:
        return None


@attrs.define
class Poller:
    """One per worker (the supervisor's)."""

    settings: Settings
    client: PrefectClient
    runner: Runner
    in_hand: InHand
    outage: Outage
    metrics: Metrics
    status: Status
    liveness: Liveness
    notifier: Notifier
    known: Callable[[], set[str]]
    """Runs this worker holds, owes a report for, or has not resolved yet (the supervisor's)."""
    once: Once
    rng: random.Random
    polled: trio.Event = attrs.Factory(trio.Event)
    """Set after the first poll that answered (the events stream starts then)."""
    wake: trio.Event = attrs.Factory(trio.Event)
    due_at: float = math.inf
    """trio time at which a run seen ahead of time (by the poll's look-ahead) becomes due."""
    ended_at: float = -math.inf
    """When a started run last ended (trio time): a shortage may have eased then."""
    short_held: int = 0
    """Due runs the last poll left SCHEDULED because the host was short (``_while_short``)."""
    tried: bool = False
    """The first poll was sent (``poll_once``)."""

    @property
    def pool_name(self) -> str:
        return self.runner.pool_name

    async def poll_once(self, runs: trio.Nursery) -> int:
        """One poll; starts a task for each due run it could take. Returns how many.

        The first poll goes out beside the first sync, not after it (start → first poll:
        one round trip less); its answer waits for the sync, which brings the pool's
        template every run needs. If it fails (a pool the sync has yet to create, an API
        that is not answering as one), it is sent again after the sync, and only the
        sync's failure is said."""
        early = not self.status.synced.is_set() and not self.tried
        self.tried = True
        if not early:  # (after a failed first poll, the next ones wait for the sync as before)
            await self._synced()
        self.liveness.calls("poll")
        began = trio.current_time()
        now = datetime.datetime.now(datetime.UTC)
        due_before = now + datetime.timedelta(seconds=int(self.settings.prefetch_seconds))
        # look ahead one interval more than the prefetch, to wake up when those runs are due
        scheduled_before = due_before + datetime.timedelta(seconds=self.settings.query_seconds * 1.5)
        try:
            flow_runs, problems = await self.client.get_scheduled_flow_runs(
                self.pool_name, self.settings.work_queues, scheduled_before
            )
        except API_ERRORS as exc:
            if early:  # the pool may not be there yet (the sync creates it), or the API is not
                await self._synced()  # what it should be: the sync says so, in one line, not
                return await self.poll_once(runs)  # the sync and this poll in two
            if not isinstance(exc, ApiNotFound):
                raise
            # an unknown queue (or a deleted pool) is a configuration error: say so, once
            queues = list(self.settings.work_queues)
            self.once.say(
                "poll.not_found", log, "error", "poll.not_found", error=exc.detail, work_queues=queues
            )
            self.status.last_poll = trio.current_time()
            return 0
        if early:
            await self._synced()
        self.outage.succeeded()
        self.once.clear("poll.not_found")
        self.status.last_poll = trio.current_time()
        self.metrics.observe_poll(self.status.last_poll - began)
        self.polled.set()
        for run_id, problem in problems:
            self._not_taken(run_id, f"unreadable payload: {problem}", "warning")

        found = decisions.triage(
            flow_runs,
            self.known() | self.runner.faults.shunned.keys(),  # (a run that met a bug here: never again)
            due_before,
            self.settings.limit,
            len(self.in_hand.live),
        )
        for flow_run, reason, level in found.not_taken:
            self._not_taken(flow_run.id, reason, level, flow_run_name=flow_run.name)
        self.due_at = trio.current_time() + found.due_in
        admitted = self._admit(self._while_short(found.take))
        for flow_run in admitted:
            self.in_hand.live[flow_run.id] = None
            runs.start_soon(self.runner.run, flow_run)
        return len(admitted)

    async def _synced(self) -> None:
        if not self.status.synced.is_set():
            self.liveness.waiting("poll", "the first sync (the heartbeat loop)")
            await self.status.synced.wait()

    def _admit(self, due: list[FlowRun]) -> list[FlowRun]:
        """The due runs the host has memory for (``admission.py``); the rest stay
        SCHEDULED for a worker with room, said once while it lasts."""
        if (
            self.settings.memory_reserve is not None
            and admission.parse_reserve(self.settings.memory_reserve) == 0
        ):
            return due
        book = self.runner.book
        for run_id, handle in self.in_hand.live.items() if due else ():  # (else: not needed now)
            if handle is not None:
                book.using(run_id, handle.memory_now())  # its cgroup's memory.current, or the sample
        mem = memory.read()
        reserve = admission.reserve_bytes(self.settings.memory_reserve, mem.total)
        runs = [(r.id, r.deployment_id, memory_max(r)) for r in due]
        taken, room = book.admit(runs, mem.available, reserve)
        self.metrics.memory_available, self.metrics.memory_reserve = mem.available, reserve
        self.metrics.runs_held = room.held
        if room.held:
            self.once.say(
                "memory.short",
                log,
                "info",
                "memory.short",
                held=room.held,
                available_mib=room.available // admission.MIB,
                reserve_mib=room.reserve // admission.MIB,
                growing_mib=room.growth // admission.MIB,
                next_run_mib=room.needed // admission.MIB,
                memory=mem.source,
                effect="due runs stay SCHEDULED for workers with room; claimed again when memory frees",
            )
        elif "memory.short" in self.once:
            self.once.clear("memory.short")
            log.info("memory.room", available_mib=room.available // admission.MIB)
        ids = set(taken)
        return [r for r in due if r.id in ids]

    def _while_short(self, due: list[FlowRun]) -> list[FlowRun]:
        """While the host is short of descriptors, memory or disk (a run was deferred, and
        no started run has ended since), due runs stay SCHEDULED, for a peer or for this
        worker's look ``SHORT_HOLD`` seconds later: a long shortage costs no claim and
        return per run and poll (``Faults.defer``)."""
        short_at = self.runner.faults.short_at
        if due and short_at >= self.ended_at and trio.current_time() - short_at < SHORT_HOLD:
            self.short_held = len(due)
            return []
        self.short_held = 0
        return due

    def released(self, started: bool) -> None:
        """A run left: if runs were held for want of memory, or a started run ended while
        runs were held for a shortage, poll now."""
        if started:
            self.ended_at = trio.current_time()
        if self.metrics.runs_held or (started and self.short_held):
            self.wake.set()

    def _not_taken(self, run_id: str | None, reason: str, level: str, **fields: Any) -> None:
        """A polled run that is not taken is said once per run and reason."""
        fields.update(flow_run_id=run_id, reason=reason)
        self.once.say(("not_taken", run_id, reason), log, level, "poll.run_not_taken", **fields)

    async def poll_loop(self, runs: trio.Nursery) -> None:
        while True:
            try:
                await self.poll_once(runs)
            except API_ERRORS as exc:
                self.outage.failed(exc, "poll")
                self.due_at = math.inf
                await self._pause(min(self.settings.query_seconds, self.outage.delay()), self.outage.back)
                continue
            if await self._pause(jittered(self.settings.query_seconds, self.rng), self.wake):
                self.wake = trio.Event()

    async def drain_once(self, runs: trio.Nursery) -> None:
        """``--once``: take every run due now (re-polling as slots or memory free up), wait
        for all. Runs held for want of memory while nothing runs here are left SCHEDULED."""
        while True:
            changed = self.in_hand.changed
            try:
                taken = await self.poll_once(runs)
            except API_ERRORS as exc:
                self.outage.failed(exc, "poll")
                pause = self.outage.delay()
                self.liveness.pause("poll", pause)
                await self.outage.pause(pause)
                continue
            if taken == 0 and not self.in_hand.live:
                return
            if taken == 0 or self.settings.limit is not None:
                self.liveness.waiting("poll", "a run to end")
                await changed.wait()

    async def _pause(self, seconds: float, wake: trio.Event) -> bool:
        """The poll loop's pause, at most ``seconds`` (said to ``liveness``). Ends early
        (True) when ``wake`` is set (an event said a run became due, coalesced: many
        events, one poll; or the API is back), or when a run seen ahead of time becomes due.
        """
        self.liveness.pause("poll", seconds)
        deadline = trio.current_time() + seconds
        chunk = (self.notifier.watchdog_seconds or 30.0) / 3
        while not wake.is_set():
            self.notifier.status(self.status.line())
            left = min(deadline, self.due_at) - trio.current_time()
            if left <= 0:
                return False
            with trio.move_on_after(min(left, chunk)):
                await wake.wait()
        return True

    def connected(self, connected: bool) -> None:
        if connected:
            self.wake.set()  # anything that became due while disconnected: poll now

    def run_became_due(self, run_id: str) -> None:
        """An event says a run of our pool is SCHEDULED: poll now."""
        if run_id not in self.in_hand.live:
            self.wake.set()
