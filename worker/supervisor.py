"""The supervisor: one trio nursery running the worker's loops and its flow runs.

Theory of operation
-------------------
Shape (nested nurseries are the shutdown structure)::

    Supervisor.run
    └── loops nursery ─── heartbeat loop   sync: read/create pool, fix an empty template, heartbeat
                      ├── cancel loop      CANCELLING among live children → kill policy → CANCELLED
                      ├── health server    (with --with-healthcheck)
                      └── poll loop        get_scheduled_flow_runs → submit each (limiter slot first)
                          └── runs nursery: one task per run, owning one RunHandle

A run's task, once it has claimed the run (PENDING accepted), ends on exactly one of:

===============================  =========================================================
what happened                    what is reported
===============================  =========================================================
configuration invalid            CRASHED "Failed to submit flow run to infrastructure: …"
process could not start          CRASHED "Flow run could not start: …"
exit 0                           nothing: the engine reported the final state itself
exit ≠ 0, not cancelled          CRASHED "Process exited with status code: N. …" (once)
cancelled (CANCELLING seen)      CANCELLED (force), after the kill policy
worker stopped mid-run           CRASHED "The worker stopped before the flow run finished…"
===============================  =========================================================

The API is never a reason to stop: every loop catches :class:`~worker.api.ApiError`,
reports the first failure of an outage at WARNING and its end at INFO, and retries
with a jittered backoff. The limiter slot is taken before the claim and released in a
``finally``, so it is freed on every path (pain point 25).
"""

from __future__ import annotations

import datetime
import random
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from worker import decisions
from worker.api import ApiError, ApiNotFound, ApiRefused, PrefectClient
from worker.job import ConfigurationError, ProcessJobConfiguration, merge_job_variables
from worker.models import FlowRun, ProtocolError, StateType, WorkPool
from worker.process import RunHandle, StartError
from worker.retry import backoff, jittered
from worker.settings import Settings

log = structlog.get_logger("flow_worker")


@attrs.define
class Outage:
    """Turns a stream of API failures and successes into two log lines per outage."""

    failing_since: float | None = None
    failures: int = 0

    def failed(self, exc: Exception, during: str) -> None:
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = trio.current_time()
            level = "error" if isinstance(exc, ApiRefused) and exc.status in (401, 403) else "warning"
            hint = "check PREFECT_API_KEY / PREFECT_API_AUTH_STRING" if level == "error" else None
            getattr(log, level)("api.unavailable", during=during, error=str(exc), hint=hint)
        else:
            log.debug("api.still_unavailable", during=during, error=str(exc))

    def succeeded(self) -> None:
        if self.failing_since is not None:
            log.info(
                "api.recovered",
                outage_seconds=round(trio.current_time() - self.failing_since, 1),
                failed_calls=self.failures,
            )
        self.failing_since = None
        self.failures = 0

    def delay(self) -> float:
        return backoff(self.failures, 1.0, 60.0, 0.2)


@attrs.define
class Supervisor:
    settings: Settings
    client: PrefectClient
    rng: random.Random = attrs.Factory(random.Random)
    pool: WorkPool | None = None
    synced: trio.Event = attrs.Factory(trio.Event)
    live: dict[str, RunHandle | None] = attrs.Factory(dict)
    """Runs between slot and end: None while submitting, the handle once started."""
    outage: Outage = attrs.Factory(Outage)
    started_at: float = attrs.Factory(trio.current_time)
    last_poll: float | None = None
    failed_runs: int = 0
    completed_children: int = 0
    changed: trio.Event = attrs.Factory(trio.Event)
    limiter: trio.CapacityLimiter | None = None
    _pool_warnings: set[str] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        if self.settings.limit is not None:
            self.limiter = trio.CapacityLimiter(self.settings.limit)

    @property
    def pool_name(self) -> str:
        assert self.settings.pool is not None
        return self.settings.pool

    def healthy(self) -> bool:
        from worker.health import is_healthy

        return is_healthy(trio.current_time(), self.last_poll, self.started_at, self.settings.query_seconds)

    def _notify_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # ---------------------------------------------------------------- top level

    async def run(self, shutdown: Callable[[], Any] | None = None) -> int:
        """Run until ``shutdown`` (an async callable) returns, or, with ``once``, until the
        work due now is done. Returns the exit code."""
        log.info(
            "worker.starting",
            worker_name=self.settings.worker_name,
            work_pool=self.pool_name,
            work_queues=list(self.settings.work_queues),
            limit=self.settings.limit,
            once=self.settings.once,
        )
        async with trio.open_nursery() as loops:
            loops.start_soon(self.heartbeat_loop)
            loops.start_soon(self.cancel_loop)
            if self.settings.with_healthcheck:
                from worker import health

                await loops.start(
                    health.serve,
                    self.settings.webserver_host,
                    self.settings.webserver_port,
                    self.healthy,
                )
            if shutdown is not None:
                loops.start_soon(self._watch_shutdown, shutdown, loops.cancel_scope)
            async with trio.open_nursery() as runs:
                if self.settings.once:
                    await self.drain_once(runs)
                else:
                    await self.poll_loop(runs)
            loops.cancel_scope.cancel()
        log.info("worker.stopped", worker_name=self.settings.worker_name, failed_runs=self.failed_runs)
        return 1 if self.failed_runs else 0

    async def _watch_shutdown(self, shutdown: Callable[[], Any], scope: trio.CancelScope) -> None:
        reason = await shutdown()
        log.info("worker.stopping", reason=str(reason), active_runs=len(self.live))
        scope.cancel()

    # ---------------------------------------------------------------- heartbeat / sync

    async def sync(self) -> None:
        """Read (or create) the pool, give it the default template if empty, heartbeat."""
        pool = await self.client.read_work_pool(self.pool_name)
        if pool is None:
            if not self.settings.create_pool_if_not_found:
                raise ApiNotFound(
                    "GET",
                    f"/work_pools/{self.pool_name}",
                    404,
                    f"Work pool {self.pool_name!r} not found!",
                )
            pool = await self.client.create_work_pool(self.pool_name)
            log.info("pool.created", work_pool=self.pool_name)
        if pool.base_job_template == {}:
            template = ProcessJobConfiguration.default_base_job_template()
            await self.client.set_base_job_template(self.pool_name, template)
            pool = attrs.evolve(pool, base_job_template=template)
            log.info("pool.template_set", work_pool=self.pool_name)
        if pool.type != "process" and "type" not in self._pool_warnings:
            self._pool_warnings.add("type")
            log.warning("pool.type_mismatch", work_pool=self.pool_name, pool_type=pool.type)
        if pool.is_paused and "paused" not in self._pool_warnings:
            self._pool_warnings.add("paused")
            log.warning("pool.paused", work_pool=self.pool_name)
        elif not pool.is_paused:
            self._pool_warnings.discard("paused")
        await self.client.send_heartbeat(
            self.pool_name, self.settings.worker_name, self.settings.heartbeat_seconds
        )
        self.pool = pool
        if not self.synced.is_set():
            log.info("worker.synced", work_pool=self.pool_name, work_pool_id=pool.id)
            self.synced.set()

    async def heartbeat_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except (ApiError, ProtocolError) as exc:
                self.outage.failed(exc, "sync")
                await trio.sleep(min(self.settings.heartbeat_seconds, self.outage.delay()))
                continue
            self.outage.succeeded()
            await trio.sleep(jittered(self.settings.heartbeat_seconds, self.rng))

    # ---------------------------------------------------------------- polling

    async def poll_once(self, runs: trio.Nursery) -> int:
        """One poll; starts a task for each due run it could take. Returns how many."""
        await self.synced.wait()
        scheduled_before = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            seconds=int(self.settings.prefetch_seconds)
        )
        try:
            flow_runs = await self.client.get_scheduled_flow_runs(
                self.pool_name, self.settings.work_queues, scheduled_before
            )
        except ApiNotFound as exc:
            # an unknown queue (or a deleted pool) is a configuration error: say so, once
            if "queue" not in self._pool_warnings:
                self._pool_warnings.add("queue")
                log.error("poll.not_found", error=exc.detail, work_queues=list(self.settings.work_queues))
            self.last_poll = trio.current_time()
            return 0
        self.outage.succeeded()
        self._pool_warnings.discard("queue")
        self.last_poll = trio.current_time()
        taken = 0
        for flow_run in flow_runs:
            if flow_run.id in self.live:
                continue
            if flow_run.state_type is not StateType.SCHEDULED:
                log.debug("run.skipped", flow_run_id=flow_run.id, state=str(flow_run.state_type))
                continue
            token = object()
            if self.limiter is not None:
                try:
                    self.limiter.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    log.debug("poll.limit_reached", limit=self.settings.limit, active_runs=len(self.live))
                    break
            self.live[flow_run.id] = None
            runs.start_soon(self._run_task, flow_run, token)
            taken += 1
        return taken

    async def poll_loop(self, runs: trio.Nursery) -> None:
        while True:
            try:
                await self.poll_once(runs)
            except (ApiError, ProtocolError) as exc:
                self.outage.failed(exc, "poll")
                await trio.sleep(min(self.settings.query_seconds, self.outage.delay()))
                continue
            await trio.sleep(jittered(self.settings.query_seconds, self.rng))

    async def drain_once(self, runs: trio.Nursery) -> None:
        """``--once``: take every run due now (re-polling as slots free up), wait for all."""
        while True:
            changed = self.changed
            try:
                taken = await self.poll_once(runs)
            except (ApiError, ProtocolError) as exc:
                self.outage.failed(exc, "poll")
                await trio.sleep(self.outage.delay())
                continue
            if taken == 0 and not self.live:
                return
            if taken == 0 or self.limiter is not None:
                await changed.wait()

    # ---------------------------------------------------------------- one run

    async def _run_task(self, flow_run: FlowRun, token: object) -> None:
        run_log = log.bind(flow_run_id=flow_run.id, flow_run_name=flow_run.name, work_pool=self.pool_name)
        try:
            await self._submit(flow_run, run_log)
        except (ApiError, ProtocolError) as exc:
            self.outage.failed(exc, "submit")
            run_log.warning("run.submit_failed", error=str(exc))
        finally:
            if self.limiter is not None:
                self.limiter.release_on_behalf_of(token)
            self.live.pop(flow_run.id, None)
            self._notify_change()

    async def _submit(self, flow_run: FlowRun, run_log: Any) -> None:
        assert self.pool is not None
        deployment = None
        if flow_run.deployment_id:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            if deployment is None:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    StateType.CANCELLED,
                    "Cancelled",
                    f"Deployment {flow_run.deployment_id} no longer exists, cancelled run.",
                    force=True,
                )
                run_log.warning("run.deployment_missing", deployment_id=flow_run.deployment_id)
                return
            run_log = run_log.bind(deployment_id=deployment.id, deployment_name=deployment.name)
        transition_id = str(uuid.uuid4())
        result = await self.client.set_flow_run_state(
            flow_run.id, StateType.PENDING, "Pending", transition_id=transition_id
        )
        claim = decisions.claim_outcome(result, transition_id)
        if not claim.proceed:
            run_log.info("run.not_claimed", reason=claim.reason)
            return
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
            run_log.warning("run.claim_raced", restored_state=displaced.type.value)
            return
        run_log.info("run.claimed", worker_name=self.settings.worker_name)
        # From here the run is ours: every path ends in a started child or a reported state.
        try:
            config = await self._configure(flow_run, deployment)
        except ConfigurationError as exc:
            run_log.error("run.bad_configuration", error=str(exc))
            self.failed_runs += 1
            await self._report_crash(flow_run, decisions.SUBMIT_FAILED.format(exc), run_log)
            return
        except (ApiError, ProtocolError) as exc:
            run_log.error("run.configuration_unavailable", error=str(exc))
            self.failed_runs += 1
            await self._report_crash(flow_run, decisions.SUBMIT_FAILED.format(exc), run_log)
            return
        await self._execute(flow_run, config, run_log)

    async def _configure(self, flow_run: FlowRun, deployment: Any) -> ProcessJobConfiguration:
        assert self.pool is not None
        flow = await self.client.read_flow(flow_run.flow_id) if flow_run.flow_id else None
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
        config.env["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
        return config

    async def _execute(self, flow_run: FlowRun, config: ProcessJobConfiguration, run_log: Any) -> None:
        handle = RunHandle(flow_run.id, config, run_log, grace=self.settings.cancel_grace_seconds)
        try:
            pid = await handle.start()
        except (StartError, ConfigurationError) as exc:
            run_log.error("run.start_failed", error=str(exc))
            self.failed_runs += 1
            await self._report_crash(flow_run, decisions.START_FAILED.format(exc), run_log)
            return
        self.live[flow_run.id] = handle
        run_log = run_log.bind(pid=pid)
        run_log.info("run.started", command=config.command, cwd=str(config.working_dir or handle.tmpdir))
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
                message = decisions.WORKER_STOPPED.format(
                    decisions.exit_message(rc if rc is not None else -15)
                )
                await self._report_crash(flow_run, message, run_log, deadline=10.0)
            raise
        run_log.info("run.exited", returncode=returncode, cancelled=handle.cancel_requested)
        if handle.cancel_requested:
            await self._report_cancelled(flow_run, run_log)
        elif returncode != 0:
            self.failed_runs += 1
            await self._report_crash(flow_run, decisions.exit_message(returncode), run_log)

    async def _report_crash(
        self, flow_run: FlowRun, message: str, run_log: Any, deadline: float = 60.0
    ) -> None:
        """Propose CRASHED once, retrying transient API failures up to ``deadline``."""
        transition_id = str(uuid.uuid4())
        with trio.move_on_after(deadline):
            while True:
                try:
                    result = await self.client.set_flow_run_state(
                        flow_run.id,
                        StateType.CRASHED,
                        "Crashed",
                        message,
                        transition_id=transition_id,
                    )
                except (ApiError, ProtocolError) as exc:
                    self.outage.failed(exc, "report")
                    await trio.sleep(min(5.0, self.outage.delay()))
                    continue
                run_log.info(
                    "run.crashed",
                    message=message,
                    status=result.status.value,
                    reason=result.reason or None,
                )
                return
        run_log.error("run.crash_not_reported", message=message)

    async def _report_cancelled(self, flow_run: FlowRun, run_log: Any) -> None:
        with trio.move_on_after(60.0):
            while True:
                try:
                    current = await self.client.read_flow_run(flow_run.id)
                    details = dict(current.state.state_details) if current and current.state else {}
                    result = await self.client.set_flow_run_state(
                        flow_run.id,
                        StateType.CANCELLED,
                        "Cancelled",
                        decisions.CANCELLED_MESSAGE,
                        force=True,
                        state_details=details,
                    )
                except (ApiError, ProtocolError) as exc:
                    self.outage.failed(exc, "report")
                    await trio.sleep(min(5.0, self.outage.delay()))
                    continue
                run_log.info("run.cancelled", status=result.status.value)
                return
        run_log.error("run.cancel_not_reported")

    # ---------------------------------------------------------------- cancellation

    async def check_cancellations(self) -> None:
        started = {run_id: h for run_id, h in self.live.items() if h is not None and not h.cancel_requested}
        if not started:
            return
        found = await self.client.filter_flow_runs(started, [StateType.CANCELLING])
        for flow_run in found:
            handle = started.get(flow_run.id)
            if handle is not None:
                log.info("run.cancelling", flow_run_id=flow_run.id, pid=handle.pid)
                handle.cancel("flow run is CANCELLING")

    async def cancel_loop(self) -> None:
        while True:
            await trio.sleep(jittered(self.settings.cancel_poll_seconds, self.rng))
            try:
                await self.check_cancellations()
            except (ApiError, ProtocolError) as exc:
                self.outage.failed(exc, "cancel_check")
