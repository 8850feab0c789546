"""The supervisor: one trio nursery running the worker's loops and its flow runs.

Theory of operation
-------------------
Shape (nested nurseries are the shutdown structure)::

    Supervisor.run
    └── loops nursery ─── heartbeat loop   sync: read/create pool, fix an empty template, heartbeat
                      ├── cancel loop      CANCELLING among live runs → kill policy → CANCELLED
                      ├── reporter loop    delivers states owed to the API (kept in the ledger)
                      ├── reaper loop      reaps re-parented orphans (the worker is a subreaper)
                      ├── control channel  the engines' cancel/reschedule/relinquish intents
                      ├── signals          1st SIGTERM/SIGINT: drain; 2nd (or timeout): stop runs
                      ├── health server    (with --with-healthcheck)
                      └── runs nursery ─── reconcile (ledger of a previous worker), then
                                           poll loop → one task per run, owning one handle

Stopping: the first signal cancels only the poll scope; the runs nursery then waits for
its runs (the drain) while heartbeats and cancellations go on. The second signal, or
``drain_timeout``, stops every remaining run (intent, SIGTERM, grace, SIGKILL) and
reports it (``on_stop``). The loops nursery is cancelled only after every run task has
ended, i.e. every child is reaped and its state reported or kept in the ledger.

A run's task, once it has claimed the run (PENDING accepted), ends on exactly one of:

===============================  =========================================================
what happened                    what is reported (written to the ledger first)
===============================  =========================================================
configuration invalid            CRASHED "Failed to submit flow run to infrastructure: …"
process could not start          CRASHED "Flow run could not start: …"
exit 0, run final                nothing: the engine reported the final state itself
exit 0, run not final            CRASHED: exited 0 without reporting a final state
exit ≠ 0                         CRASHED "Process exited with status code: N. …" (once)
cancelled (CANCELLING seen)      CANCELLED (the engine writes it; forced if it did not)
worker stopped mid-run           CRASHED "The worker stopped before …", or SCHEDULED
===============================  =========================================================

The API is never a reason to stop: every loop catches :class:`~worker.api.ApiError`,
reports the first failure of an outage at WARNING and its end at INFO, and retries
with a jittered backoff. States owed while the API is down stay in the ledger until
delivered. ``--limit`` counts ``live``: a run enters it before its claim and leaves it
in a ``finally``, so its slot is freed on every path (pain point 25); adopted runs are
in it too, so they count against the limit.
"""

from __future__ import annotations

import datetime
import math
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import structlog
import trio

from worker import decisions, reaper
from worker.api import ApiError, ApiNotFound, ApiRefused, ApiUnavailable, PrefectClient
from worker.control import ControlChannel
from worker.job import ConfigurationError, ProcessJobConfiguration, merge_job_variables
from worker.ledger import Entry, Ledger, Report, boot_id
from worker.metrics import Metrics
from worker.models import Deployment, FlowRun, ProtocolError, StateType, WorkPool
from worker.process import AdoptedHandle, RunHandle, StartError, Supervised
from worker.retry import backoff, jittered
from worker.settings import Settings
from worker.systemd import Notifier

log = structlog.get_logger("flow_worker")
CLAIM_CONCURRENCY = 16
"""Claims in flight at once: a burst of due runs starts together without a request storm."""
DEPLOYMENT_TTL = 10.0
FLOW_TTL = 300.0
"""Seconds a deployment / flow read is reused: a burst of runs of one deployment reads it
once; an edited deployment is seen within DEPLOYMENT_TTL (a flow's name never changes)."""


@attrs.define
class ReadCache:
    """API reads reused for a while, with concurrent misses of one key sharing one request."""

    _values: dict[tuple[str, str], tuple[float, Any]] = attrs.Factory(dict)
    _inflight: dict[tuple[str, str], trio.Event] = attrs.Factory(dict)

    async def get(self, key: tuple[str, str], ttl: float, fetch: Callable[[], Awaitable[Any]]) -> Any:
        while True:
            hit = self._values.get(key)
            if hit is not None and hit[0] > trio.current_time():
                return hit[1]
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()  # someone is fetching it: use their answer (or retry theirs)
        done = self._inflight[key] = trio.Event()
        try:
            value = await fetch()
            self._values[key] = (trio.current_time() + ttl, value)
            if len(self._values) > 1024:
                self._values.pop(next(iter(self._values)))
            return value
        finally:
            del self._inflight[key]
            done.set()


API_ERRORS = (ApiError, ProtocolError)
REAP_SECONDS = 60.0
REPORT_SECONDS = 5.0
FINAL_REPORT_SECONDS = 30.0
DRAIN_LOG_SECONDS = 15.0


PROBE_SECONDS = 1.5
"""While the API is unreachable, how often ``GET /health`` asks whether it is back."""


@attrs.define
class Outage:
    """Turns a stream of API failures and successes into two log lines per outage, and
    ends the loops' backoff pauses the moment an unreachable API answers again.

    Backoff (1 s doubling to 60 s, jittered) protects a server that is up but says "not
    now" (429, 503, 5xx). A server that cannot be reached at all (connection refused,
    timeouts) costs nothing to ask, so :meth:`probe_loop` asks ``GET /health`` every
    ``PROBE_SECONDS`` and, on the first answer, wakes every pause at once.
    """

    failing_since: float | None = None
    failures: int = 0
    unreachable: bool = False
    """The last failure never reached the server: the probe runs."""
    metrics: Metrics = attrs.Factory(Metrics)
    _back: trio.Event = attrs.Factory(trio.Event)

    def failed(self, exc: Exception, during: str) -> None:
        self.failures += 1
        self.unreachable = isinstance(exc, ApiUnavailable) and exc.status is None
        kind = (
            "protocol"
            if isinstance(exc, ProtocolError)
            else "refused"
            if isinstance(exc, ApiRefused)
            else "unavailable"
        )
        self.metrics.api_errors[kind] += 1
        if self.failing_since is None:
            self.failing_since = trio.current_time()
            auth = isinstance(exc, ApiRefused) and exc.status in (401, 403)
            if auth:
                log.error(
                    "api.unauthorized",
                    during=during,
                    error=str(exc),
                    hint="check PREFECT_API_KEY / PREFECT_API_AUTH_STRING and PREFECT_API_URL",
                )
            else:
                log.warning("api.unavailable", during=during, error=str(exc))
        else:
            log.debug("api.still_unavailable", during=during, error=str(exc))

    def succeeded(self) -> None:
        if self.failing_since is not None:
            log.info(
                "api.recovered",
                outage_seconds=round(trio.current_time() - self.failing_since, 1),
                failed_calls=self.failures,
            )
            self._wake()
        self.failing_since = None
        self.failures = 0

    def delay(self) -> float:
        return backoff(self.failures, 1.0, 60.0, 0.2)

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the API is found to answer again meanwhile."""
        with trio.move_on_after(seconds):
            await self._back.wait()

    @property
    def back(self) -> trio.Event:
        """Set when an unreachable API answers again (a fresh event after each outage)."""
        return self._back

    def _wake(self) -> None:
        self.unreachable = False
        self._back.set()
        self._back = trio.Event()

    async def probe_loop(self, client: PrefectClient) -> None:
        while True:
            await trio.sleep(PROBE_SECONDS)
            if self.unreachable and await client.probe():
                log.debug("api.answering", after_failures=self.failures)
                self._wake()


@attrs.define
class Supervisor:
    settings: Settings
    client: PrefectClient
    ledger: Ledger
    rng: random.Random = attrs.Factory(random.Random)
    pool: WorkPool | None = None
    synced: trio.Event = attrs.Factory(trio.Event)
    live: dict[str, Supervised | None] = attrs.Factory(dict)
    """Runs between slot and end: None while submitting, the handle once started/adopted."""
    owed: dict[str, Entry] = attrs.Factory(dict)
    """Finished runs whose report is not delivered yet (also on disk)."""
    unresolved: dict[str, Entry] = attrs.Factory(dict)
    """Claims whose answer was lost: resolved against the server like a restart's ledger."""
    metrics: Metrics = attrs.Factory(Metrics)
    outage: Outage = attrs.Factory(lambda self: Outage(metrics=self.metrics), takes_self=True)
    notifier: Notifier = attrs.Factory(Notifier)
    control: ControlChannel = attrs.Factory(ControlChannel)
    started_at: float = attrs.Factory(trio.current_time)
    last_poll: float | None = None
    failed_runs: int = 0
    changed: trio.Event = attrs.Factory(trio.Event)
    stopping: bool = False
    events_connected: bool = False
    stopped_runs: bool = False
    poll_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    wake: trio.Event = attrs.Factory(trio.Event)
    polled: trio.Event = attrs.Factory(trio.Event)
    due_at: float = math.inf
    """trio time at which a run seen ahead of time (by the poll's look-ahead) becomes due."""
    cache: ReadCache = attrs.Factory(ReadCache)
    claims: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(CLAIM_CONCURRENCY))
    _warned: set[str] = attrs.Factory(set)
    _told: dict[tuple[str | None, str], None] = attrs.Factory(dict)

    @property
    def pool_name(self) -> str:
        assert self.settings.pool is not None
        return self.settings.pool

    def healthy(self) -> bool:
        from worker.health import is_healthy

        if not self.synced.is_set():
            return False  # 503 until the API has answered once
        return is_healthy(trio.current_time(), self.last_poll, self.started_at, self.settings.query_seconds)

    async def _events(self) -> None:
        await self.polled.wait()  # off the start-up path: the first poll does not wait for it
        from worker import events

        await events.stream(
            self.settings,
            lambda: self.pool.id if self.pool is not None else None,
            self.run_became_due,
            self.run_is_cancelling,
            self._events_connected,
            self.outage.pause,
        )

    def _events_connected(self, connected: bool) -> None:
        self.events_connected = connected
        if connected:
            self.wake.set()  # anything that became due while disconnected: poll now

    def render_metrics(self) -> str:
        since = trio.current_time() - self.last_poll if self.last_poll is not None else None
        return self.metrics.render(len(self.live), since)

    def status_line(self) -> str:
        """The one-line status shown by ``systemctl status`` (``STATUS=``)."""
        api = "API reachable" if self.outage.failing_since is None else "API UNREACHABLE"
        poll = (
            f"last poll {trio.current_time() - self.last_poll:.0f}s ago"
            if self.last_poll is not None
            else "no poll yet"
        )
        mode = "draining, " if self.stopping else ""
        return f"{mode}{len(self.live)} active runs, {poll}, {api}; pool {self.pool_name}"

    async def _idle(self, seconds: float, wake: trio.Event) -> None:
        """Sleep as a loop's deliberate pause (ended early by ``wake``), feeding the
        systemd watchdog meanwhile.

        The watchdog is fed only from here and after a completed poll, i.e. only while
        the poll loop really runs: a hung loop (or a frozen process) stops the pings.
        """
        deadline = trio.current_time() + seconds
        chunk = (self.notifier.watchdog_seconds or seconds * 3) / 3
        while not wake.is_set():
            self.notifier.watchdog()
            self.notifier.status(self.status_line())
            left = deadline - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(min(left, chunk)):
                await wake.wait()

    async def _poll_pause(self, seconds: float) -> None:
        """The poll loop's pause: ends early when an event says a run became due (coalesced:
        many events, one poll) or when a run seen ahead of time becomes due."""
        deadline = min(trio.current_time() + seconds, self.due_at)
        chunk = (self.notifier.watchdog_seconds or 30.0) / 3
        while True:
            self.notifier.watchdog()
            self.notifier.status(self.status_line())
            left = min(deadline, self.due_at) - trio.current_time()
            if left <= 0:
                return
            wake = self.wake
            with trio.move_on_after(min(left, chunk)):
                await wake.wait()
            if wake.is_set():
                self.wake = trio.Event()
                return

    def run_became_due(self, run_id: str) -> None:
        """An event says a run of our pool is SCHEDULED: poll now."""
        if run_id not in self.live:
            self.wake.set()

    def run_is_cancelling(self, run_id: str) -> None:
        """An event says a run is CANCELLING: stop it now if it is ours."""
        handle = self.live.get(run_id)
        if handle is not None and not handle.stop_requested:
            log.info("run.cancelling", flow_run_id=run_id, pid=handle.pid, via="event")
            handle.cancel("flow run is CANCELLING")

    def _notify_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _run_log(self, run_id: str, run_name: str) -> Any:
        return log.bind(flow_run_id=run_id, flow_run_name=run_name, work_pool=self.pool_name)

    # ---------------------------------------------------------------- top level

    async def run(self, handle_signals: bool = True) -> int:
        """Serve until stopped (or, with ``once``, until the work due now is done)."""
        subreaper = reaper.become_subreaper()
        log.info(
            "worker.starting",
            worker_name=self.settings.worker_name,
            work_pool=self.pool_name,
            work_queues=list(self.settings.work_queues),
            limit=self.settings.limit,
            once=self.settings.once,
            state_dir=str(self.ledger.directory),
            subreaper=subreaper,
        )
        async with trio.open_nursery() as loops:
            loops.start_soon(self.heartbeat_loop)
            loops.start_soon(self.cancel_loop)
            loops.start_soon(self.reaper_loop)
            loops.start_soon(self.reporter_loop)
            loops.start_soon(self.outage.probe_loop, self.client)
            await loops.start(self.control.serve)
            if self.settings.with_healthcheck:
                from worker import health

                await loops.start(
                    health.serve,
                    self.settings.webserver_host,
                    self.settings.webserver_port,
                    self.healthy,
                    self.render_metrics,
                )
            if handle_signals:
                loops.start_soon(self._signal_loop, loops)
            if self.settings.events:
                loops.start_soon(self._events)
            async with trio.open_nursery() as runs:
                with self.poll_scope:
                    await self.reconcile(runs)
                    if self.settings.once:
                        await self.drain_once(runs)
                    else:
                        await self.poll_loop(runs)
                if self.live:
                    log.info("worker.draining", active_runs=self._describe_live())
            await self._flush_reports()
            loops.cancel_scope.cancel()
        log.info("worker.stopped", worker_name=self.settings.worker_name, failed_runs=self.failed_runs)
        return 1 if self.settings.once and self.failed_runs else 0

    def request_stop(self, reason: str, loops: trio.Nursery) -> None:
        """First stop request: claim nothing more, let running flows finish (the drain)."""
        if self.stopping:
            self.stop_runs(reason)
            return
        self.stopping = True
        self.poll_scope.cancel()
        self.notifier.stopping(self.status_line())
        log.info(
            "worker.stopping",
            reason=reason,
            active_runs=self._describe_live(),
            drain_timeout=self.settings.drain_timeout,
        )
        loops.start_soon(self._drain_watch)

    def stop_runs(self, reason: str) -> None:
        """End every remaining run now: intent, SIGTERM, grace, SIGKILL, then ``on_stop``."""
        self.stopped_runs = True
        intent = "reschedule" if self.settings.on_stop == "reschedule" else "relinquish"
        log.warning(
            "worker.stopping_runs",
            reason=reason,
            active_runs=self._describe_live(),
            on_stop=self.settings.on_stop,
        )
        for handle in self.live.values():
            if handle is not None:
                handle.stop(f"worker stopping: {reason}", intent)

    async def _signal_loop(self, loops: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    self.stop_runs(f"second {name}")
                else:
                    self.request_stop(name, loops)

    async def _drain_watch(self) -> None:
        """While draining: keep systemd's watchdog fed and its stop timeout extended (a tick
        at a time, so a hung drain stops asking), log what is awaited, stop runs at the
        deadline."""
        deadline = trio.current_time() + self.settings.drain_timeout
        tick = min(DRAIN_LOG_SECONDS, (self.notifier.watchdog_seconds or 3 * DRAIN_LOG_SECONDS) / 3)
        next_log = trio.current_time() + DRAIN_LOG_SECONDS
        while True:
            now = trio.current_time()
            if now >= deadline and not self.stopped_runs and self.live:
                self.stop_runs(f"drain_timeout of {self.settings.drain_timeout:g}s reached")
            extra = self.settings.cancel_grace_seconds if self.stopped_runs else 0.0
            self.notifier.extend_timeout(tick + extra + 30, self.status_line())
            self.notifier.watchdog()
            if now >= next_log and self.live:
                next_log = now + DRAIN_LOG_SECONDS
                log.info(
                    "worker.draining",
                    active_runs=self._describe_live(),
                    seconds_left=max(0, round(deadline - now)),
                )
            await trio.sleep(tick if now >= deadline else min(tick, deadline - now))

    def _describe_live(self) -> list[str]:
        return sorted(self.live)

    # ---------------------------------------------------------------- heartbeat / sync

    async def sync(self) -> None:
        """Read (or create) the pool, give it the default template if empty, heartbeat."""
        pool = await self.client.read_work_pool(self.pool_name)
        if pool is None:
            if not self.settings.create_pool_if_not_found:
                raise ApiNotFound(
                    "GET", f"/work_pools/{self.pool_name}", 404, f"Work pool {self.pool_name!r} not found!"
                )
            pool = await self.client.create_work_pool(self.pool_name)
            log.info("pool.created", work_pool=self.pool_name)
        if pool.base_job_template == {}:
            template = ProcessJobConfiguration.default_base_job_template()
            await self.client.set_base_job_template(self.pool_name, template)
            pool = attrs.evolve(pool, base_job_template=template)
            log.info("pool.template_set", work_pool=self.pool_name)
        self._warn_once("type", pool.type != "process", "pool.type_mismatch", pool_type=pool.type)
        self._warn_once("paused", pool.is_paused, "pool.paused")
        self.pool = pool
        first = not self.synced.is_set()
        self.synced.set()  # the pool is there and has a template: polling may begin
        await self.client.send_heartbeat(
            self.pool_name, self.settings.worker_name, self.settings.heartbeat_seconds
        )
        if first:
            log.info("worker.synced", work_pool=self.pool_name, work_pool_id=pool.id)
            self.notifier.ready(self.status_line())

    def _warn_once(self, key: str, condition: bool, event: str, **fields: Any) -> None:
        if condition and key not in self._warned:
            self._warned.add(key)
            log.warning(event, work_pool=self.pool_name, **fields)
        elif not condition:
            self._warned.discard(key)

    async def heartbeat_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except API_ERRORS as exc:
                self.outage.failed(exc, "sync")
                await self.outage.pause(min(self.settings.heartbeat_seconds, self.outage.delay()))
                continue
            self.outage.succeeded()
            await trio.sleep(jittered(self.settings.heartbeat_seconds, self.rng))

    # ---------------------------------------------------------------- polling

    async def poll_once(self, runs: trio.Nursery) -> int:
        """One poll; starts a task for each due run it could take. Returns how many."""
        while not self.synced.is_set():  # deliberate wait for the first sync: keep the watchdog fed
            with trio.move_on_after((self.notifier.watchdog_seconds or 30.0) / 3):
                await self.synced.wait()
            self.notifier.watchdog()
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
            if "queue" not in self._warned:
                self._warned.add("queue")
                log.error("poll.not_found", error=exc.detail, work_queues=list(self.settings.work_queues))
            self.last_poll = trio.current_time()
            return 0
        self.outage.succeeded()
        self._warned.discard("queue")
        self.last_poll = trio.current_time()
        self.metrics.observe_poll(self.last_poll - began)
        self.polled.set()
        for run_id, problem in problems:
            self._skipped(run_id, f"unreadable payload: {problem}", "warning")
        taken = 0
        self.due_at = math.inf
        for flow_run in flow_runs:
            known = flow_run.id in self.live or flow_run.id in self.owed or flow_run.id in self.unresolved
            verdict = decisions.poll_verdict(
                flow_run, known, due_before, _parse_time(flow_run.next_scheduled_start_time)
            )
            if verdict.verdict is decisions.Verdict.SKIP:
                self._skipped(flow_run.id, verdict.reason, "info", flow_run_name=flow_run.name)
            if verdict.verdict is decisions.Verdict.LATER:
                self.due_at = min(self.due_at, trio.current_time() + verdict.due_in)
            if verdict.verdict is not decisions.Verdict.TAKE:
                continue
            if self.settings.limit is not None and len(self.live) >= self.settings.limit:
                # adopted runs are in ``live`` too: they count against the limit
                self._skipped(flow_run.id, f"limit of {self.settings.limit} active runs reached", "debug")
                break
            self.live[flow_run.id] = None
            runs.start_soon(self._run_task, flow_run)
            taken += 1
        return taken

    def _skipped(self, run_id: str | None, reason: str, level: str, **fields: Any) -> None:
        """Log a polled run that is not taken, once per run and reason (bounded memory)."""
        key = (run_id, reason)
        if key in self._told:
            return
        self._told[key] = None
        if len(self._told) > 4096:
            self._told.pop(next(iter(self._told)))
        getattr(log, level)("poll.run_not_taken", flow_run_id=run_id, reason=reason, **fields)

    async def poll_loop(self, runs: trio.Nursery) -> None:
        while True:
            try:
                await self.poll_once(runs)
            except API_ERRORS as exc:
                self.outage.failed(exc, "poll")
                await self._idle(min(self.settings.query_seconds, self.outage.delay()), self.outage.back)
                continue
            await self._poll_pause(jittered(self.settings.query_seconds, self.rng))

    async def drain_once(self, runs: trio.Nursery) -> None:
        """``--once``: take every run due now (re-polling as slots free up), wait for all."""
        while True:
            changed = self.changed
            try:
                taken = await self.poll_once(runs)
            except API_ERRORS as exc:
                self.outage.failed(exc, "poll")
                await self.outage.pause(self.outage.delay())
                continue
            if taken == 0 and not self.live:
                return
            if taken == 0 or self.settings.limit is not None:
                await changed.wait()

    # ---------------------------------------------------------------- one run

    async def _run_task(self, flow_run: FlowRun) -> None:
        run_log = self._run_log(flow_run.id, flow_run.name)
        try:
            await self._submit(flow_run, run_log)
        except API_ERRORS as exc:
            self.outage.failed(exc, "submit")
            run_log.warning("run.submit_failed", error=str(exc))
        finally:
            self.live.pop(flow_run.id, None)
            self.control.unregister(flow_run.id)
            self._notify_change()

    def _entry(self, flow_run: FlowRun, phase: str, transition_id: str) -> Entry:
        return Entry(
            flow_run_id=flow_run.id,
            flow_run_name=flow_run.name,
            pool=self.pool_name,
            worker_name=self.settings.worker_name,
            phase=phase,
            transition_id=transition_id,
            claimed_at=time.time(),
        )

    async def _submit(self, flow_run: FlowRun, run_log: Any) -> None:
        assert self.pool is not None
        async with self.claims:  # a burst claims concurrently, but boundedly
            claimed = await self._claim(flow_run, run_log)
        if claimed is None:
            return
        deployment, entry, run_log = claimed
        # From here the run is ours: every path ends in a started child or a state owed.
        try:
            config = await self._configure(flow_run, deployment)
        except (ConfigurationError, *API_ERRORS) as exc:
            run_log.error("run.bad_configuration", error=str(exc))
            self.failed_runs += 1
            await self._finish(entry, run_log, "crash", decisions.SUBMIT_FAILED.format(exc))
            return
        if self.stopping:
            await self._finish(entry, run_log, "reschedule", decisions.NEVER_STARTED)
            return
        await self._execute(flow_run, entry, config, run_log)

    async def _claim(self, flow_run: FlowRun, run_log: Any) -> tuple[Deployment | None, Entry, Any] | None:
        """Read the deployment, propose PENDING, verify the claim. None: not ours."""
        deployment = None
        if flow_run.deployment_id:
            deployment = await self.cache.get(
                ("deployment", flow_run.deployment_id),
                DEPLOYMENT_TTL,
                lambda: self.client.read_deployment(flow_run.deployment_id or ""),
            )
            if deployment is None:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    StateType.CANCELLED,
                    "Cancelled",
                    f"Deployment {flow_run.deployment_id} no longer exists, cancelled run.",
                    force=True,
                )
                run_log.warning("run.deployment_missing", deployment_id=flow_run.deployment_id)
                return None
            run_log = run_log.bind(deployment_id=deployment.id, deployment_name=deployment.name)
        transition_id = str(uuid.uuid4())
        # the ledger knows of the claim before the server does: a crash in between is recoverable
        entry = self._entry(flow_run, "claiming", transition_id)
        self.ledger.write(entry)
        try:
            result = await self.client.set_flow_run_state(
                flow_run.id, StateType.PENDING, "Pending", transition_id=transition_id
            )
        except API_ERRORS:
            # did the server write it? The reporter loop asks it once the API answers again.
            self.unresolved[flow_run.id] = entry
            raise
        claim = decisions.claim_outcome(result, transition_id)
        if not claim.proceed:
            self.ledger.remove(flow_run.id)
            run_log.info("run.not_claimed", reason=claim.reason)
            return None
        displaced = decisions.displaced_state(
            await self.client.read_flow_run_states(flow_run.id), transition_id
        )
        if displaced is not None:
            # another worker ran it after our poll: put its final state back, run nothing
            await self.client.set_flow_run_state(
                flow_run.id,
                displaced.type,
                displaced.name or displaced.type.value.title(),
                displaced.message,
                force=True,
                state_details=displaced.state_details,
                data=displaced.data,
            )
            self.ledger.remove(flow_run.id)
            run_log.warning("run.claim_raced", restored_state=displaced.type.value)
            return None
        entry = self.ledger.update(entry, phase="claimed")
        run_log.info("run.claimed", worker_name=self.settings.worker_name)
        self.metrics.runs_claimed += 1
        return deployment, entry, run_log

    async def _configure(self, flow_run: FlowRun, deployment: Any) -> ProcessJobConfiguration:
        assert self.pool is not None
        flow = None
        if flow_run.flow_id:
            flow_id = flow_run.flow_id
            flow = await self.cache.get(("flow", flow_id), FLOW_TTL, lambda: self.client.read_flow(flow_id))
        values = merge_job_variables(deployment.job_variables if deployment else None, flow_run.job_variables)
        config = await ProcessJobConfiguration.from_template_and_values(
            self.pool.base_job_template, values, self.client
        )
        config.prepare_for_flow_run(
            flow_run,
            deployment,
            flow,
            self.pool,
            self.settings.worker_name,
            settings_env=self.settings.child_prefect_env(),
            python=self.settings.python,
        )
        return config

    async def _execute(
        self, flow_run: FlowRun, entry: Entry, config: ProcessJobConfiguration, run_log: Any
    ) -> None:
        handle = RunHandle(
            flow_run.id,
            run_log,
            grace=self.settings.cancel_grace_seconds,
            send_intent=self.control.send_intent,
            config=config,
            output_dir=self.ledger.directory / "output",
        )
        try:
            pid = await handle.start(extra_env=self.control.register(flow_run.id))
        except (StartError, ConfigurationError) as exc:
            run_log.error("run.start_failed", error=str(exc))
            self.failed_runs += 1
            await self._finish(entry, run_log, "crash", decisions.START_FAILED.format(exc))
            return
        facts = reaper.process_facts(pid)
        entry = self.ledger.update(
            entry,
            phase="started",
            pid=pid,
            pgid=pid,
            start_time=facts.start_time if facts else None,
            boot_id=boot_id(),
            started_at=time.time(),
        )
        self.live[flow_run.id] = handle
        run_log = run_log.bind(pid=pid)
        run_log.info("run.started", command=config.command, cwd=str(config.working_dir or handle.tmpdir))
        if self.stopped_runs:
            handle.stop(
                "worker stopping", "reschedule" if self.settings.on_stop == "reschedule" else "relinquish"
            )
        try:
            await self.client.set_infrastructure_pid(flow_run.id, pid)
        except ApiError as exc:
            run_log.warning("run.pid_not_reported", error=str(exc))
        try:
            returncode = await handle.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                self.failed_runs += 1
                rc = handle.process.returncode if handle.process is not None else None
                reason = decisions.exit_message(rc if rc is not None else -15)
                self._owe(entry, "crash", decisions.WORKER_STOPPED.format(reason))
            raise
        run_log.info("run.exited", returncode=returncode, stopped=handle.stop_requested, intent=handle.intent)
        kind, message = self._outcome(handle, returncode)
        if kind == "crash":
            self.failed_runs += 1
        await self._finish(entry, run_log, kind, message)

    def _outcome(self, handle: Supervised, returncode: int | None) -> tuple[str, str]:
        """The report owed for a run whose process is gone (``None``: exit status unknown)."""
        if handle.cancel_requested:
            return "cancelled", decisions.CANCELLED_MESSAGE
        if handle.stop_requested:
            code = decisions.exit_message(returncode) if returncode is not None else "exit status unknown"
            if self.settings.on_stop == "reschedule":
                return "reschedule", decisions.WORKER_STOPPED.format(code)
            return "crash", decisions.WORKER_STOPPED.format(code)
        if returncode is None:
            adopted = isinstance(handle, AdoptedHandle)
            return "crash_if_running", decisions.ADOPTED_EXIT if adopted else decisions.EXIT_UNKNOWN
        if returncode != 0:
            return "crash", decisions.exit_message(returncode)
        return "crash_if_running", decisions.EXIT_0_NOT_FINAL

    # ---------------------------------------------------------------- reports (owed states)

    def _owe(self, entry: Entry, kind: str, message: str) -> Entry:
        report = Report(kind=kind, message=message, transition_id=str(uuid.uuid4()))
        entry = self.ledger.update(entry, phase="finished", finished_at=time.time(), report=report)
        self.owed[entry.flow_run_id] = entry
        return entry

    async def _finish(self, entry: Entry, run_log: Any, kind: str, message: str) -> None:
        """Record the owed state, then try to deliver it now (else the reporter loop will).

        The one exception to "ledger first": a clean exit (``crash_if_running``, the
        common case) is delivered first and written only if that fails. If the worker dies
        in between, the ledger still says "started" and a restarted worker finds the
        process gone and checks the run the same way; this saves two fsyncs per run,
        which were the largest cost of a burst in the profile.
        """
        if kind == "crash_if_running":
            report = Report(kind=kind, message=message, transition_id=str(uuid.uuid4()))
            quick = attrs.evolve(entry, phase="finished", finished_at=time.time(), report=report)
            try:
                await self.deliver(quick, run_log)
                return
            except API_ERRORS as exc:
                self.outage.failed(exc, "report")
        entry = self._owe(entry, kind, message)
        try:
            await self.deliver(entry, run_log)
        except API_ERRORS as exc:
            self.outage.failed(exc, "report")
            run_log.warning("run.report_deferred", kind=kind, error=str(exc))

    async def deliver(self, entry: Entry, run_log: Any | None = None) -> None:
        """Deliver one owed report; on success the ledger entry is removed."""
        assert entry.report is not None
        report = entry.report
        run_log = run_log or self._run_log(entry.flow_run_id, entry.flow_run_name)
        current = None
        if report.kind in ("crash_if_running", "cancelled", "crash"):
            current = await self.client.read_flow_run(entry.flow_run_id)
        current_type = current.state_type if current is not None else None
        proposal = decisions.owed_proposal(report.kind, current_type)
        outcome = "run deleted" if current is None and report.kind != "reschedule" else "not needed"
        if proposal is not None:
            details: dict[str, Any] = {}
            message = report.message
            if proposal.type is StateType.CANCELLED:
                details = dict(current.state.state_details) if current and current.state else {}
                message = decisions.CANCELLED_MESSAGE
            elif proposal.type is StateType.SCHEDULED:
                details = {"scheduled_time": datetime.datetime.now(datetime.UTC).isoformat()}
            result = await self.client.set_flow_run_state(
                entry.flow_run_id,
                proposal.type,
                proposal.name,
                message,
                force=proposal.force,
                state_details=details,
                transition_id=report.transition_id,
            )
            outcome = f"{proposal.type.value} {result.status.value}"
            if report.kind == "crash_if_running" and outcome == "CRASHED ACCEPT":
                self.failed_runs += 1  # e.g. exit 0 without a final state: --once says so
        self.outage.succeeded()
        self.ledger.remove(entry.flow_run_id)
        self.owed.pop(entry.flow_run_id, None)
        final = (
            outcome.split()[0]
            if outcome.endswith("ACCEPT")
            else (current_type.value if current_type else None)
        )
        if final is not None and (final == "SCHEDULED" or StateType(final).is_final):
            self.metrics.runs_finished[final] += 1
        if report.kind == "crash_if_running" and outcome == "not needed":
            # the usual end: the engine reported the final state itself, nothing was owed
            run_log.info("run.finished", state=current_type.value if current_type else None)
            return
        level = "warning" if report.kind == "crash_if_running" else "info"
        getattr(run_log, level)("run.reported", kind=report.kind, outcome=outcome, message=report.message)

    async def reporter_loop(self) -> None:
        while True:
            await self.outage.pause(REPORT_SECONDS)
            await self._deliver_owed()

    async def _deliver_owed(self) -> None:
        for entry in list(self.unresolved.values()):
            try:
                await self._reconcile_entry(entry, None)
            except API_ERRORS as exc:
                self.outage.failed(exc, "report")
                return
            self.unresolved.pop(entry.flow_run_id, None)
        for entry in list(self.owed.values()):
            try:
                await self.deliver(entry)
            except API_ERRORS as exc:
                self.outage.failed(exc, "report")
                return

    async def _flush_reports(self) -> None:
        """On the way out, keep trying to deliver what is owed for a while."""
        with trio.move_on_after(FINAL_REPORT_SECONDS):
            while self.owed or self.unresolved:
                await self._deliver_owed()
                if self.owed:
                    await trio.sleep(1.0)
        if self.owed:
            log.error(
                "worker.reports_pending",
                flow_run_ids=sorted(self.owed),
                hint="kept in the ledger; delivered when the worker starts again",
            )

    # ---------------------------------------------------------------- reconcile

    async def reconcile(self, runs: trio.Nursery) -> None:
        """Before the first poll: adopt, report or return every run a previous worker owned."""
        entries, bad = self.ledger.entries()
        for problem in bad:
            log.error("ledger.unreadable", problem=problem)
        mine = [e for e in entries if e.pool == self.pool_name]
        if not mine:
            return
        log.info("ledger.reconciling", runs=len(mine))
        this_boot = boot_id()
        pending = []
        for entry in mine:
            alive = (
                entry.phase == "started"
                and entry.pid is not None
                and entry.boot_id == this_boot
                and reaper.is_same_process(entry.pid, entry.start_time)
            )
            if alive and entry.report is None:
                self._adopt(entry, runs)
            else:
                pending.append(entry)
        while pending:
            try:
                await self._reconcile_entry(pending[0], None)
            except API_ERRORS as exc:
                self.outage.failed(exc, "reconcile")
                await self.outage.pause(self.outage.delay())
                continue
            pending.pop(0)

    async def _reconcile_entry(self, entry: Entry, runs: trio.Nursery | None) -> None:
        run_log = self._run_log(entry.flow_run_id, entry.flow_run_name)
        if entry.report is not None:
            self.owed[entry.flow_run_id] = entry
            await self.deliver(entry, run_log)
            return
        current = await self.client.read_flow_run(entry.flow_run_id)
        state = current.state if current is not None else None
        decision = decisions.reconcile(
            entry.phase,
            False,
            False,
            state.type if state else None,
            state.state_details.get("transition_id") if state else None,
            entry.transition_id,
            entry.pid,
        )
        run_log.info(
            "ledger.entry",
            phase=entry.phase,
            run_state=str(state.type) if state else None,
            action=decision.action.value,
        )
        if decision.action is decisions.Action.FORGET:
            self.ledger.remove(entry.flow_run_id)
            return
        kind = "reschedule" if decision.action is decisions.Action.RESCHEDULE else "crash"
        await self._finish(entry, run_log, kind, decision.message)

    def _adopt(self, entry: Entry, runs: trio.Nursery) -> None:
        run_log = self._run_log(entry.flow_run_id, entry.flow_run_name).bind(pid=entry.pid)
        handle = AdoptedHandle(
            entry.flow_run_id,
            run_log,
            grace=self.settings.cancel_grace_seconds,
            adopted_pid=entry.pid or 0,
            adopted_pgid=entry.pgid,
            start_time=entry.start_time,
            output_dir=self.ledger.directory / "output",
        )
        self.live[entry.flow_run_id] = handle
        run_log.info("run.adopted", started_at=entry.started_at)
        runs.start_soon(self._adopted_task, entry, handle, run_log)

    async def _adopted_task(self, entry: Entry, handle: AdoptedHandle, run_log: Any) -> None:
        try:
            await handle.wait()
            run_log.info("run.exited", returncode=None, stopped=handle.stop_requested, adopted=True)
            kind, message = self._outcome(handle, None)
            await self._finish(entry, run_log, kind, message)
        finally:
            self.live.pop(entry.flow_run_id, None)
            self._notify_change()

    # ---------------------------------------------------------------- cancellation, reaping

    async def check_cancellations(self) -> None:
        watched = {run_id: h for run_id, h in self.live.items() if h is not None and not h.stop_requested}
        if not watched:
            return
        found = await self.client.filter_flow_runs(watched, [StateType.CANCELLING])
        for flow_run in found:
            handle = watched.get(flow_run.id)
            if handle is not None:
                log.info("run.cancelling", flow_run_id=flow_run.id, pid=handle.pid)
                handle.cancel("flow run is CANCELLING")

    async def cancel_loop(self) -> None:
        while True:
            await trio.sleep(jittered(self.settings.cancel_poll_seconds, self.rng))
            try:
                await self.check_cancellations()
            except API_ERRORS as exc:
                self.outage.failed(exc, "cancel_check")

    async def reaper_loop(self) -> None:
        """Reap re-parented orphans when a child exits (SIGCHLD; trio itself waits on
        pidfds, not on SIGCHLD), with a slow periodic sweep as a safety net."""
        with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
            while True:
                with trio.move_on_after(REAP_SECONDS):
                    await sigchld.__anext__()
                await reaper.CHILDREN.wait_idle()  # a child mid-spawn is not an orphan
                reaped = reaper.CHILDREN.reap_orphans()
                if reaped:
                    log.debug("reaper.reaped", pids=reaped)


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace(" ", "T"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)
