"""The supervisor: the nursery tree, the worker's loops, and the stop/drain policy.

Theory of operation
-------------------
Shape (nested nurseries are the shutdown structure)::

    Supervisor.run
    └── loops nursery ─── heartbeat loop   sync: read/create pool, fix an empty template, heartbeat
                      ├── worker channel   where the server has one: heartbeats, the pool (channel.py)
                      ├── cancel loop      CANCELLING among live runs → kill policy (cancelpoll.py)
                      ├── reporter, labels the states owed to the API (reporter.py), run labels (labels.py)
                      ├── reaper loop      reaps re-parented orphans (the worker is a subreaper)
                      ├── probe loop       while the API is unreachable: GET /health (outage.py)
                      ├── reclaim loop     a lost peer's runs → SCHEDULED / CRASHED (reclaim.py)
                      ├── control channel  the engines' cancel/reschedule/relinquish intents
                      ├── signals          1st SIGTERM/SIGINT: drain; 2nd (or timeout): stop runs
                      ├── health server    (with --with-healthcheck)
                      ├── events stream    SCHEDULED → poll, CANCELLING → stop, a claim → look (events.py)
                      ├── liveness         WATCHDOG=1 while poll and heartbeat keep their word (liveness.py)
                      └── runs nursery ─── reconcile (reconcile.py: the previous worker's ledger),
                                           then the poll loop (poller.py) → one task per run (run.py)

Who does what: this module decides *when* (polls, pauses, limits, stopping); one run's
life is ``run.Runner.run``; what is owed to the server is ``reporter.Reporter``; what a
previous worker left is ``reconcile.Reconciler``; every decision is a table in ``decisions.py``.

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

import random
from typing import Final

import attrs
import structlog
import trio

from worker.books.ledger import Ledger
from worker.books.reporter import Reporter
from worker.fleet.reclaim import Fencer, Reclaimer
from worker.host.logs import Once
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.host.systemd import Notifier
from worker.prefect.api import PrefectClient
from worker.prefect.channel import Channel
from worker.prefect.outage import API_ERRORS, Outage
from worker.prefect.pool import ensure_pool, said
from worker.process import reaper
from worker.process.cgroups import Cgroups
from worker.process.usage import Meter
from worker.rules.admission import Book
from worker.rules.models import WorkPool
from worker.rules.retry import jittered
from worker.runs.control import ControlChannel
from worker.runs.inhand import InHand
from worker.runs.reconcile import Reconciler
from worker.runs.run import Runner
from worker.service import guard
from worker.service.cancelpoll import CancelPoll
from worker.service.liveness import Liveness
from worker.service.poller import Poller
from worker.service.status import Status
from worker.service.stopping import Stopper

log = structlog.get_logger("flow_worker")
REPORT_SECONDS: Final = 5.0
FINAL_REPORT_SECONDS: Final = 30.0


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
    poller: Poller = attrs.field(init=False)
    """The poll loop: which due runs to take, and when to look again (``poller.py``)."""
    once: Once = attrs.Factory(Once)
    channel: Channel = attrs.field(init=False)  # heartbeats and the pool, where the server has it
    cancels: CancelPoll = attrs.field(init=False)
    """The cancellation poll, rarer while the events stream is up (``cancelpoll.py``)."""
    channel_up: trio.Event = attrs.Factory(trio.Event)  # set (and replaced) by each pool it brings
    stopper: Stopper = attrs.field(init=False)
    status: Status = attrs.field(init=False)
    poll_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
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
        self.status = Status(
            self.pool_name, self.settings.query_seconds, self.in_hand, self.outage, self.metrics
        )
        self.status.interpreter = self.runner.interpreter
        self.status.liveness = self.liveness
        self.reclaimer.unlabelled = lambda: self.runner.labels.unsupported
        self.poller = Poller(
            self.settings,
            self.client,
            self.runner,
            self.in_hand,
            self.outage,
            self.metrics,
            self.status,
            self.liveness,
            self.notifier,
            self.known,
            self.once,
            self.rng,
        )
        self.in_hand.released = self.poller.released
        self.channel = Channel(self.settings, self.channel_pool, self.beat, self.outage.pause)
        self.cancels = CancelPoll(self.settings, self.client, self.in_hand, self.outage, self.rng)
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
        # before any child: the worker moves into its leaf, runs get cgroups (said in one line)
        cgroups = Cgroups.start(self.settings.cgroups, service=self.settings.service_host is not None)
        self.runner.cgroups = self.reconciler.cgroups = cgroups
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
            cgroups=cgroups.on,
        )
        async with trio.open_nursery() as loops:
            # each loop is restarted after a bug (``guard.py``): never a reason to stop
            for name, loop, *args in (
                ("heartbeat", self.liveness.judged("heartbeat", self.heartbeat_loop)),
                ("cancel", self.cancels.loop),
                ("reporter", self.reporter_loop),
                ("labels", self.runner.labels.loop, lambda: self.runner.pool),
                ("reaper", reaper.reap_loop),
                ("probe", self.outage.probe_loop, self.client),
                ("reclaim", self.reclaimer.loop, self.status.synced),
                ("meter", self.runner.meter.loop),
                ("interpreter", self.runner.interpreter.run),
                ("warm_start", self.runner.warm.serve),
                ("uplink", self.runner.uplink.loop),
                ("liveness", self.liveness.watch, self.notifier, self.status.line),
                ("cgroups", cgroups.watch),
                ("channel", self.channel.run, self.poller.polled),  # (after the first poll, as events)
            ):
                loops.start_soon(guard.forever, name, loop, *args)
            await loops.start(self.control.serve)
            if self.settings.with_healthcheck:
                from worker.host import health

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
                self.runner.hooks.background = runs  # hooks of runs no longer in hand run there
                with self.poll_scope:
                    await self.reconciler.reconcile(runs)
                    if self.settings.once:
                        await guard.forever(
                            "poll", self.liveness.judged("poll", self.poller.drain_once), runs
                        )
                    else:
                        await guard.forever("poll", self.liveness.judged("poll", self.poller.poll_loop), runs)
                if self.in_hand.live:
                    log.info("worker.draining", active_runs=sorted(self.in_hand.live))
            self.runner.hooks.background = None
            await self._flush_reports()
            await self.runner.uplink.stopped()
            loops.cancel_scope.cancel()
        failed = self.reporter.failed_runs
        log.info("worker.stopped", worker_name=self.settings.worker_name, failed_runs=failed)
        return 1 if self.settings.once and failed else 0

    # ---------------------------------------------------------------- stop

    async def _flush_reports(self) -> None:
        """On the way out, keep trying to deliver what is owed, then the ended runs' labels."""
        with trio.move_on_after(FINAL_REPORT_SECONDS):
            while not (await self.reconciler.resolve_pending() and await self.reporter.deliver_owed()):
                await self.outage.pause(1.0)
            await self.runner.labels.relabel(self.runner.pool)  # (the UI shows who ran them)
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
            if not self.channel.up:  # else the channel heartbeats and brings the pool (channel.py)
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
                self.beat(sent_at)
            if self.fence_check_owed:  # peers may have taken runs while we were silent
                self.liveness.calls("heartbeat", 1)
                try:
                    await self.fencer.check_live(self.in_hand.live)
                    self.fence_check_owed = False
                except API_ERRORS as exc:
                    self.outage.failed(exc, "fence")
            pause = jittered(self.settings.heartbeat_seconds, self.rng)
            self.liveness.pause("heartbeat", pause)
            with trio.move_on_after(pause):  # the channel's beats (a gap may end), or its coming up
                await (self.fencer.heard if self.channel.up else self.channel_up).wait()

    def beat(self, sent_at: float) -> None:
        """A heartbeat sent at trio time ``sent_at`` got through (REST or the channel)."""
        self.fence_check_owed |= self.fencer.beat(sent_at)

    def channel_pool(self, pool: WorkPool) -> None:
        self.runner.pool = pool
        said(pool, self.once)
        self.channel_up.set()
        self.channel_up = trio.Event()

    def known(self) -> set[str]:
        """Runs this worker holds, owes a report for, or has not resolved yet."""
        return self.in_hand.live.keys() | self.reporter.owed.keys() | self.reconciler.pending.keys()

    # ---------------------------------------------------------------- events, cancellation, reaping

    async def _events(self) -> None:
        await self.poller.polled.wait()  # off the start-up path: the first poll does not wait for it
        from worker.prefect import events

        pool_id = lambda: self.runner.pool.id if self.runner.pool is not None else None  # noqa: E731
        held = lambda run_id: self.in_hand.live.get(run_id) is not None  # noqa: E731
        async with trio.open_nursery() as reads:  # a CANCELLING event is a hint: read, then stop
            check = events.CancelCheck(
                self.client.read_flow_run, held, self.in_hand.cancel, reads, unchecked=self.cancels.unchecked
            )
            await events.stream(
                self.settings,
                pool_id,
                self.poller.run_became_due,
                check.heard,
                self.connected,
                self.outage.pause,
                self.reclaimer.claimed,
            )

    def connected(self, up: bool) -> None:
        """The events stream is up, or dropped: the polls and the fleet's look adapt."""
        for part in (self.poller, self.cancels, self.reclaimer):
            part.connected(up)

    async def reporter_loop(self) -> None:
        while True:
            await self.outage.pause(REPORT_SECONDS)
            if await self.reconciler.resolve_pending():
                await self.reporter.deliver_owed()
