"""The supervisor: the nursery tree, the worker's loops, and the stop/drain policy.

Theory of operation
-------------------
Shape (nested nurseries are the shutdown structure)::

    Supervisor.run
    └── loops nursery ─── heartbeat loop   sync: read/create pool, fix an empty template, heartbeat
                      ├── cancel loop      CANCELLING among live runs → kill policy → CANCELLED
                      ├── reporter loop    delivers states owed to the API (reporter.py)
                      ├── reaper loop      reaps re-parented orphans (the worker is a subreaper)
                      ├── probe loop       while the API is unreachable: GET /health (outage.py)
                      ├── reclaim loop     a lost peer's runs → SCHEDULED / CRASHED (reclaim.py)
                      ├── control channel  the engines' cancel/reschedule/relinquish intents
                      ├── signals          1st SIGTERM/SIGINT: drain; 2nd (or timeout): stop runs
                      ├── health server    (with --with-healthcheck)
                      ├── events stream    SCHEDULED → poll now, CANCELLING → read, stop (events.py)
                      ├── liveness         WATCHDOG=1 while poll and heartbeat keep their word (liveness.py)
                      └── runs nursery ─── reconcile (reconcile.py: the previous worker's ledger),
                                           then the poll loop → one task per run (run.py)

Who does what: this module decides *when* (polls, pauses, limits, stopping); one run's
life is ``run.Runner.run``; what is owed to the server is ``reporter.Reporter``; what a
previous worker left is ``reconcile.Reconciler``; every decision is a table in
``decisions.py``.

Stopping: the first signal cancels only the poll scope; the runs nursery then waits for
its runs (the drain) while heartbeats and cancellations go on. The second signal, or
``drain_timeout``, stops every remaining run (intent, SIGTERM, grace, SIGKILL) and
reports it (``on_stop``). The loops nursery is cancelled only after every run task has
ended, i.e. every child is reaped and its state reported or kept in the ledger.

The API is never a reason to stop: every loop catches the API's errors, reports them to
:class:`~worker.outage.Outage` (first failure at WARNING, the end at INFO) and pauses
with a jittered backoff that ends early when an unreachable API answers again. States
owed while the API is down stay in the ledger until delivered. ``--limit`` counts the
runs in hand, adopted ones included.
"""

from __future__ import annotations

import datetime
import math
import random
from typing import Any, Final

import attrs
import structlog
import trio

from worker import admission, decisions, guard, memory, reaper
from worker.admission import Book
from worker.api import ApiNotFound, PrefectClient
from worker.control import ControlChannel
from worker.ledger import Ledger
from worker.liveness import Liveness
from worker.logs import Once
from worker.metrics import Metrics
from worker.models import FlowRun, StateType
from worker.outage import API_ERRORS, Outage
from worker.pool import ensure_pool
from worker.reclaim import Fencer, Reclaimer
from worker.reconcile import Reconciler
from worker.reporter import Reporter
from worker.retry import jittered
from worker.run import InHand, Runner
from worker.settings import Settings
from worker.status import Status
from worker.stopping import Stopper
from worker.systemd import Notifier
from worker.usage import Meter

log = structlog.get_logger("flow_worker")
REPORT_SECONDS: Final = 5.0
FINAL_REPORT_SECONDS: Final = 30.0
SHORT_HOLD: Final = 30.0
"""After a run was deferred for a shortage, how long due runs wait, unless a started run
ends first: long enough to spare the API a claim-and-return per run and poll, short enough
that a host with room again (a disk cleaned) starts its backlog within half a minute."""


@attrs.define
class Supervisor:
    settings: Settings
    client: PrefectClient
    ledger: Ledger
    rng: random.Random = attrs.Factory(random.Random)
    metrics: Metrics = attrs.Factory(Metrics)
    outage: Outage = attrs.Factory(lambda self: Outage(metrics=self.metrics), takes_self=True)
    notifier: Notifier = attrs.Factory(Notifier)
    control: ControlChannel = attrs.Factory(ControlChannel)
    in_hand: InHand = attrs.Factory(InHand)
    reporter: Reporter = attrs.field(init=False)
    reconciler: Reconciler = attrs.field(init=False)
    fencer: Fencer = attrs.field(init=False)
    reclaimer: Reclaimer = attrs.field(init=False)
    fence_check_owed: bool = True
    """A heartbeat gap ended and the runs in hand are not checked yet (``Fencer``). True
    at start: the runs adopted from the ledger lived through the worker's own downtime,
    during which peers may have resolved them."""
    runner: Runner = attrs.field(init=False)
    stopper: Stopper = attrs.field(init=False)
    status: Status = attrs.field(init=False)
    polled: trio.Event = attrs.Factory(trio.Event)
    wake: trio.Event = attrs.Factory(trio.Event)
    poll_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    due_at: float = math.inf
    """trio time at which a run seen ahead of time (by the poll's look-ahead) becomes due."""
    once: Once = attrs.Factory(Once)
    ended_at: float = -math.inf
    """When a started run last ended (trio time): a shortage may have eased then."""
    short_held: int = 0
    """Due runs the last poll left SCHEDULED because the host was short (``_while_short``)."""
    liveness: Liveness = attrs.Factory(Liveness)
    """The poll and heartbeat loops' word, judged before each ``WATCHDOG=1`` (``liveness.py``)."""

    def __attrs_post_init__(self) -> None:
        self.reporter = Reporter(
            self.client, self.ledger, self.outage, self.metrics, self.pool_name, self.settings.worker_name
        )
        meter, book = Meter(), Book()
        self.reconciler = Reconciler(
            self.settings, self.client, self.ledger, self.reporter, self.outage, self.in_hand, meter, book
        )
        self.fencer = Fencer(self.settings, self.client, self.metrics)
        self.reclaimer = Reclaimer(self.settings, self.client, self.outage, self.metrics, self.known)
        self.runner = Runner(
            self.settings,
            self.client,
            self.ledger,
            self.reporter,
            self.outage,
            self.metrics,
            self.control,
            self.in_hand,
            self.reconciler.pending,
            self.fencer,
            meter=meter,
            book=book,
            unlabelled=self.reconciler.unlabelled,
        )
        self.in_hand.released = self._released
        self.status = Status(
            self.pool_name, self.settings.query_seconds, self.in_hand, self.outage, self.metrics
        )
        self.status.interpreter = self.runner.interpreter
        self.status.liveness = self.liveness
        self.reclaimer.unlabelled = lambda: self.runner.labels_unsupported
        self.stopper = Stopper(self.settings, self.in_hand, self.notifier, self.poll_scope, self.status.line)

    @property
    def pool_name(self) -> str:
        assert self.settings.pool is not None
        return self.settings.pool

    # ---------------------------------------------------------------- top level

    async def run(self, handle_signals: bool = True) -> int:
        """Serve until stopped (or, with ``once``, until the work due now is done)."""
        subreaper = reaper.become_subreaper()
        if self.runner.warm.enabled and not subreaper:
            self.runner.warm.enabled = False
            log.warning(
                "warm_start.off",
                reason="the worker could not become a child subreaper: forked runs would not be its children",
                effect="every run starts cold",
            )
        log.info(
            "worker.starting",
            worker_name=self.settings.worker_name,
            work_pool=self.pool_name,
            work_queues=list(self.settings.work_queues),
            limit=self.settings.limit,
            once=self.settings.once,
            state_dir=str(self.ledger.directory),
            subreaper=subreaper,
            warm_start=self.runner.warm.enabled,
        )
        async with trio.open_nursery() as loops:
            # each loop is restarted after a bug (``guard.py``): never a reason to stop
            for name, loop, *args in (
                ("heartbeat", self.liveness.judged("heartbeat", self.heartbeat_loop)),
                ("cancel", self.cancel_loop),
                ("reporter", self.reporter_loop),
                ("reaper", reaper.reap_loop),
                ("probe", self.outage.probe_loop, self.client),
                ("reclaim", self.reclaimer.loop, self.status.synced),
                ("meter", self.runner.meter.loop),
                ("interpreter", self.runner.interpreter.run),
                ("warm_start", self.runner.warm.serve),
                ("uplink", self.runner.uplink.loop),
                ("liveness", self.liveness.watch, self.notifier, self.status.line),
            ):
                loops.start_soon(guard.forever, name, loop, *args)
            await loops.start(self.control.serve)
            if self.settings.with_healthcheck:
                from worker import health

                await loops.start(
                    health.serve,
                    self.settings.webserver_host,
                    self.settings.webserver_port,
                    self.status.healthy,
                    self.status.render_metrics,
                    self.status.problem,
                )
            if handle_signals:
                loops.start_soon(self.stopper.signal_loop, loops)
            if self.settings.events:
                loops.start_soon(guard.forever, "events", self._events)
            async with trio.open_nursery() as runs:
                with self.poll_scope:
                    await self.reconciler.reconcile(runs)
                    if self.settings.once:
                        await guard.forever("poll", self.liveness.judged("poll", self.drain_once), runs)
                    else:
                        await guard.forever("poll", self.liveness.judged("poll", self.poll_loop), runs)
                if self.in_hand.live:
                    log.info("worker.draining", active_runs=sorted(self.in_hand.live))
            await self._flush_reports()
            await self.runner.uplink.stopped()
            loops.cancel_scope.cancel()
        failed = self.reporter.failed_runs
        log.info("worker.stopped", worker_name=self.settings.worker_name, failed_runs=failed)
        return 1 if self.settings.once and failed else 0

    # ---------------------------------------------------------------- stop

    async def _flush_reports(self) -> None:
        """On the way out, keep trying to deliver what is owed for a while."""
        with trio.move_on_after(FINAL_REPORT_SECONDS):
            while not (await self.reconciler.resolve_pending() and await self.reporter.deliver_owed()):
                await self.outage.pause(1.0)
        self.reporter.give_up()

    # ---------------------------------------------------------------- heartbeat / sync

    async def sync(self) -> None:
        """Read (or create) the pool, give it the default template if empty, heartbeat."""
        self.runner.pool = pool = await ensure_pool(self.client, self.settings, self.once)
        first = not self.status.synced.is_set()
        self.status.synced.set()  # the pool is there and has a template: polling may begin
        await self.client.send_heartbeat(
            self.pool_name, self.settings.worker_name, self.settings.heartbeat_seconds
        )
        if first:
            self.runner.uplink.started(pool)
            log.info("worker.synced", work_pool=self.pool_name, work_pool_id=pool.id)
            self.notifier.ready(self.status.line())

    async def heartbeat_loop(self) -> None:
        while True:
            self.liveness.calls("heartbeat", 4)  # the sync: up to 3; the fence check: 1
            sent_at = trio.current_time()
            try:
                await self.sync()
            except API_ERRORS as exc:
                self.outage.failed(exc, "sync")
                pause = min(self.settings.heartbeat_seconds, self.outage.delay())
                self.liveness.pause("heartbeat", pause)
                await self.outage.pause(pause)
                continue
            self.outage.succeeded()
            self.fence_check_owed |= self.fencer.beat(sent_at)
            if self.fence_check_owed:  # peers may have taken runs while we were silent
                try:
                    await self.fencer.check_live(self.in_hand.live)
                    self.fence_check_owed = False
                except API_ERRORS as exc:
                    self.outage.failed(exc, "fence")
            pause = jittered(self.settings.heartbeat_seconds, self.rng)
            self.liveness.pause("heartbeat", pause)
            await trio.sleep(pause)

    # ---------------------------------------------------------------- polling

    async def poll_once(self, runs: trio.Nursery) -> int:
        """One poll; starts a task for each due run it could take. Returns how many."""
        if not self.status.synced.is_set():
            self.liveness.waiting("poll", "the first sync (the heartbeat loop)")
            await self.status.synced.wait()
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
        except ApiNotFound as exc:
            # an unknown queue (or a deleted pool) is a configuration error: say so, once
            queues = list(self.settings.work_queues)
            self.once.say(
                "poll.not_found", log, "error", "poll.not_found", error=exc.detail, work_queues=queues
            )
            self.status.last_poll = trio.current_time()
            return 0
        self.outage.succeeded()
        self.once.clear("poll.not_found")
        self.status.last_poll = trio.current_time()
        self.metrics.observe_poll(self.status.last_poll - began)
        self.polled.set()
        for run_id, problem in problems:
            self._not_taken(run_id, f"unreadable payload: {problem}", "warning")

        found = decisions.triage(
            flow_runs,
            self.known() | self.runner.shunned.keys(),  # (a run that met a bug here: never again)
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

    def _admit(self, due: list[FlowRun]) -> list[FlowRun]:
        """The due runs the host has memory for (``admission.py``); the rest stay
        SCHEDULED for a worker with room, said once while it lasts."""
        if (
            self.settings.memory_reserve is not None
            and admission.parse_reserve(self.settings.memory_reserve) == 0
        ):
            return due
        book = self.runner.book
        for run_id, handle in self.in_hand.live.items():
            if handle is not None and handle.usage is not None:
                book.using(run_id, handle.usage.rss)
        mem = memory.read()
        reserve = admission.reserve_bytes(self.settings.memory_reserve, mem.total)
        taken, room = book.admit([(r.id, r.deployment_id) for r in due], mem.available, reserve)
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
        return per run and poll (``Runner._defer``)."""
        short_at = self.runner.short_at
        if due and short_at >= self.ended_at and trio.current_time() - short_at < SHORT_HOLD:
            self.short_held = len(due)
            return []
        self.short_held = 0
        return due

    def _released(self, started: bool) -> None:
        """A run left: if runs were held for want of memory, or a started run ended while
        runs were held for a shortage, poll now."""
        if started:
            self.ended_at = trio.current_time()
        if self.metrics.runs_held or (started and self.short_held):
            self.wake.set()

    def known(self) -> set[str]:
        """Runs this worker holds, owes a report for, or has not resolved yet."""
        return self.in_hand.live.keys() | self.reporter.owed.keys() | self.reconciler.pending.keys()

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

    # ---------------------------------------------------------------- events, cancellation, reaping

    async def _events(self) -> None:
        await self.polled.wait()  # off the start-up path: the first poll does not wait for it
        from worker import events

        pool_id = lambda: self.runner.pool.id if self.runner.pool is not None else None  # noqa: E731
        held = lambda run_id: self.in_hand.live.get(run_id) is not None  # noqa: E731
        async with trio.open_nursery() as reads:
            # a CANCELLING event is a hint: the run is read, and cancelled only if the server agrees
            check = events.CancelCheck(self.client.read_flow_run, held, self.in_hand.cancel, reads)
            await events.stream(
                self.settings,
                pool_id,
                self.run_became_due,
                check.heard,
                self._connected,
                self.outage.pause,
            )

    def _connected(self, connected: bool) -> None:
        if connected:
            self.wake.set()  # anything that became due while disconnected: poll now

    def run_became_due(self, run_id: str) -> None:
        """An event says a run of our pool is SCHEDULED: poll now."""
        if run_id not in self.in_hand.live:
            self.wake.set()

    async def cancel_loop(self) -> None:
        while True:
            await trio.sleep(jittered(self.settings.cancel_poll_seconds, self.rng))
            watched = self.in_hand.watched()
            if not watched:
                continue
            try:
                found = await self.client.filter_flow_runs(watched, [StateType.CANCELLING])
            except API_ERRORS as exc:
                self.outage.failed(exc, "cancel_check")
                continue
            for flow_run in found:
                self.in_hand.cancel(flow_run.id, via="poll")

    async def reporter_loop(self) -> None:
        while True:
            await self.outage.pause(REPORT_SECONDS)
            if await self.reconciler.resolve_pending():
                await self.reporter.deliver_owed()
                await self.runner.relabel()
