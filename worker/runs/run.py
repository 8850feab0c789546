"""One flow run's life, top to bottom: claim, configure, spawn, watch, outcome, report.

:meth:`Runner.run` is the task the poll starts for each due run. Read it in order:

1. :meth:`Runner.claim`: read the deployment (cached), write the claim to the ledger,
   propose PENDING with a fixed ``transition_id``, judge the answer
   (``decisions.claim_outcome``), and check the run's history for a state another
   worker finished meanwhile (``decisions.displaced_state``): if so, put it back and
   run nothing.
2. :meth:`Runner.configure`: the pool's base job template + the deployment's and run's
   job variables → a :class:`~worker.job.ProcessJobConfiguration`.
3. :meth:`Runner.execute`: spawn the child (``spawned.RunHandle``), record pid and start
   time in the ledger, report ``infrastructure_pid``, watch it until it is reaped.
4. ``decisions.run_outcome`` → :meth:`Reporter.finish <worker.reporter.Reporter.finish>`:
   what the server is owed, written to the ledger first, delivered once.

Along the way the UI is told (``ui.py``): the ``prefect.worker.submitted-flow-run`` and
``…executed-flow-run`` events, and, through the logging tap, the run's worker lines.

From a successful claim on, every path ends in a started child or a state owed; the
run leaves :class:`InHand` in a ``finally``, so its ``--limit`` slot is freed on every
path (pain point 25).
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any, Final

import attrs
import structlog
import trio

from worker.books.ledger import Entry, Ledger, boot_id
from worker.books.reporter import Reporter, run_logger
from worker.fleet.reclaim import Fencer
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.prefect import ui
from worker.prefect.answers import ApiRefused, ApiUnavailable
from worker.prefect.api import PrefectClient
from worker.prefect.cache import DEPLOYMENT_TTL, FLOW_TTL, ReadCache
from worker.prefect.outage import API_ERRORS, Outage
from worker.process import reaper
from worker.process.handle import StartDeferred, StartError, Supervised
from worker.process.spawned import RunHandle
from worker.process.usage import Meter
from worker.process.warm import WarmStarts
from worker.rules import decisions
from worker.rules.admission import MIB, Book
from worker.rules.hookrules import SWITCH
from worker.rules.job import ConfigurationError, ProcessJobConfiguration, merge_job_variables
from worker.rules.models import Deployment, Flow, FlowRun, ProtocolError, StateType, WorkPool
from worker.runs.control import ControlChannel
from worker.runs.faults import Faults
from worker.runs.hooks import HookContext, Hooks
from worker.runs.inhand import InHand
from worker.runs.interpreter import InterpreterCheck
from worker.runs.labels import Labeller

log = structlog.get_logger("flow_worker")

CLAIM_CONCURRENCY: Final = 16
"""Claims in flight at once: a burst of due runs starts together without a request storm."""


def _leaf(exc: Exception) -> Exception:
    """The one exception inside nested single-exception groups (a nursery wraps what its
    task raised), so it is classified and named by what it is."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@attrs.define
class Runner:
    """Everything one run's life needs, passed in; one Runner serves every run."""

    settings: Settings
    client: PrefectClient
    ledger: Ledger
    reporter: Reporter
    outage: Outage
    metrics: Metrics
    control: ControlChannel
    in_hand: InHand
    lost_claims: dict[str, Entry]
    """Where a claim whose answer was lost goes (``Reconciler.pending``)."""
    fencer: Fencer
    """Whether peers may have taken our claims during a heartbeat gap (``reclaim.py``)."""
    pool: WorkPool | None = None
    """The pool as last synced (its base job template); set by the supervisor."""
    cache: ReadCache = attrs.Factory(ReadCache)
    meter: Meter = attrs.Factory(Meter)
    """Samples every run's tree (``usage.py``): its task is started by the supervisor."""
    book: Book = attrs.Factory(Book)
    """Expected run sizes and the runs in hand, for admission by memory (``admission.py``)."""
    claims: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(CLAIM_CONCURRENCY))
    unlabelled: dict[str, FlowRun] = attrs.Factory(dict)
    """Live runs whose labels could not be set yet: peers need them to know the owner."""
    faults: Faults = attrs.field(init=False)
    """What a run that went wrong is owed; the runs shunned, the host's shortages (``faults.py``)."""
    labels: Labeller = attrs.field(init=False)
    """Who runs each run, in its labels (``labels.py``)."""
    warm: WarmStarts = attrs.field(init=False)
    """The engine servers runs are forked from with ``warm_start`` (``warm.py``)."""
    interpreter: InterpreterCheck = attrs.field(init=False)
    """The check of the default command's interpreter (``interpreter.py``)."""
    uplink: ui.Uplink = attrs.field(init=False)
    """Where the worker's lines and events about runs go, for the Prefect UI (``ui.py``)."""
    hooks: Hooks = attrs.field(init=False)
    """The flows' on_crashed / on_cancellation hooks, run around deliveries (``hooks.py``)."""

    def __attrs_post_init__(self) -> None:
        self.uplink = ui.Uplink(self.client, self.settings.worker_name, self.settings.log_to_api)
        output = self.ledger.directory / "output"
        self.hooks = Hooks(self.settings, self.uplink, self.in_hand, output, self.hook_context)
        self.reporter.hooks = self.hooks
        self.interpreter = InterpreterCheck(self.settings.python or sys.executable)
        self.warm = WarmStarts(enabled=self.settings.warm_start)
        self.faults = Faults(self.reporter, self.metrics, self.lost_claims)
        self.labels = Labeller(self.client, self.settings, self.in_hand, self.unlabelled)

    @property
    def pool_name(self) -> str:
        return self.reporter.pool

    async def run(self, flow_run: FlowRun) -> None:
        """The task of one polled run (already in ``in_hand.live``): its whole life.

        A run is the unit of failure: whatever goes wrong here ends this run at most,
        never the worker. The API's errors back off (``outage.py``); a host short of
        descriptors, memory or disk returns the run to the queue (``Faults.defer``); any
        other exception is a bug, and the run is CRASHED with it (``Faults.internal_error``).
        """
        run_log = run_logger(flow_run.id, flow_run.name, self.pool_name)
        claimed_at = trio.current_time()
        entry: Entry | None = None
        try:
            async with self.claims:  # a burst claims concurrently, but boundedly
                claimed = await self.claim(flow_run, run_log)
            if claimed is None:
                return
            deployment, entry, run_log = claimed
            # Peers judge a PENDING run by the worker its labels name: until ours are on it, a
            # rescheduled run still names its lost previous owner, and a start that waits
            # (interpreter check, block reads, a slow server) would look to them like a claim
            # that owner never started. So the labels go on before anything else.
            assert self.pool is not None
            await self.labels.label(flow_run, run_log, self.pool)
            # From here the run is ours: every path ends in a started child, a state owed,
            # or (after a heartbeat gap) the finding that a peer has taken it.
            try:
                config, flow = await self.configure(flow_run, deployment)
            except (ApiUnavailable, ProtocolError) as exc:  # not the run's fault: resolved as a lost claim
                self.outage.failed(exc, "submit")
                run_log.warning("run.not_started", reason=f"could not read what it needs: {exc}")
                self.lost_claims[entry.flow_run_id] = entry  # (back to SCHEDULED while still ours)
                return
            except (ConfigurationError, ApiRefused) as exc:
                run_log.error("run.bad_configuration", error=str(exc))
                await self.reporter.finish(entry, run_log, "crash", decisions.SUBMIT_FAILED.format(exc))
                return
            if self.in_hand.stopping:
                await self.reporter.finish(entry, run_log, "reschedule", decisions.NEVER_STARTED)
                return
            if not await self._still_ours(entry, claimed_at, run_log):
                return
            related = ui.run_related(flow_run, deployment, flow, self.pool)
            await self.execute(flow_run, entry, config, run_log, related)
        except API_ERRORS as exc:
            self.outage.failed(exc, "submit")
            run_log.warning("run.submit_failed", error=str(exc))
        except Exception as exc:
            exc = _leaf(exc)
            handle = self.in_hand.live.get(flow_run.id)
            short = decisions.shortage(exc)
            if short is not None and handle is None:  # not started: for later, or a peer
                await self.faults.defer(flow_run, entry, run_log, short, short)
            else:  # a started run is never put back in the queue: it may have run
                await self.faults.internal_error(flow_run, entry, run_log, exc, handle)
        finally:
            handle = self.in_hand.live.get(flow_run.id)
            peak = handle.usage.peak if handle is not None and handle.usage is not None else None
            self.book.finished(flow_run.id, flow_run.deployment_id, peak)
            self.control.unregister(flow_run.id)
            self.in_hand.release(flow_run.id)

    async def claim(self, flow_run: FlowRun, run_log: Any) -> tuple[Deployment | None, Entry, Any] | None:
        """Read the deployment, propose PENDING, verify the claim. None: not ours."""
        deployment = None
        if flow_run.deployment_id:
            deployment_id = flow_run.deployment_id
            deployment = await self.cache.get(
                ("deployment", deployment_id),
                DEPLOYMENT_TTL,
                lambda: self.client.read_deployment(deployment_id),
            )
            if deployment is None:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    StateType.CANCELLED,
                    "Cancelled",
                    f"Deployment {deployment_id} no longer exists, cancelled run.",
                    force=True,
                )
                run_log.warning("run.deployment_missing", deployment_id=deployment_id)
                return None
            run_log = run_log.bind(deployment_id=deployment.id, deployment_name=deployment.name)
        transition_id = str(uuid.uuid4())
        # the ledger knows of the claim before the server does: a crash in between is recoverable
        entry = Entry(
            flow_run_id=flow_run.id,
            flow_run_name=flow_run.name,
            pool=self.pool_name,
            worker_name=self.settings.worker_name,
            phase="claiming",
            transition_id=transition_id,
            claimed_at=time.time(),
        )
        self.ledger.write(entry)
        try:
            result = await self.client.set_flow_run_state(
                flow_run.id, StateType.PENDING, "Pending", transition_id=transition_id
            )
            claim = decisions.claim_outcome(result, transition_id)
            if not claim.proceed:
                self.ledger.remove(flow_run.id)
                run_log.info("run.not_claimed", reason=claim.reason)
                return None
            if not await self._undo_if_raced(flow_run, transition_id, run_log):
                return None
            entry = self.ledger.update(entry, phase="claimed")
        except Exception:
            # Proposed, perhaps written (a lost answer, a failed check, a ledger that cannot
            # be written, a bug): the claim is resolved against the server by the reporter
            # loop, as a lost answer is (back to SCHEDULED while it is still ours).
            self.lost_claims[flow_run.id] = entry
            raise
        run_log.info("run.claimed", worker_name=self.settings.worker_name)
        self.metrics.runs_claimed += 1
        return deployment, entry, run_log

    async def _still_ours(self, entry: Entry, claimed_at: float, run_log: Any) -> bool:
        """After a heartbeat gap since the claim, a peer may have taken the run: check
        first (``Fencer.still_ours``). Unknowable now: the claim is resolved later, as
        one whose answer was lost (back to SCHEDULED if still ours)."""
        try:
            lost = await self.fencer.still_ours(entry.flow_run_id, entry.transition_id, claimed_at)
        except API_ERRORS as exc:
            self.outage.failed(exc, "submit")
            run_log.warning("run.not_started", reason=f"could not check the claim after a gap: {exc}")
            self.lost_claims[entry.flow_run_id] = entry
            return False
        if lost:
            self.metrics.runs_lost += 1
            run_log.warning("run.lost_to_peer", reason=lost)
            self.ledger.remove(entry.flow_run_id)
        return not lost

    async def _undo_if_raced(self, flow_run: FlowRun, transition_id: str, run_log: Any) -> bool:
        """True if the claim stands; False if another worker had finished the run after
        our poll, in which case its final state is put back (PROTOCOL §7.6)."""
        displaced = decisions.displaced_state(
            await self.client.read_flow_run_states(flow_run.id), transition_id
        )
        if displaced is None:
            return True
        await self.client.restore_state(flow_run.id, displaced)
        self.ledger.remove(flow_run.id)
        run_log.warning("run.claim_raced", restored_state=displaced.type.value)
        return False

    async def configure(
        self, flow_run: FlowRun, deployment: Deployment | None
    ) -> tuple[ProcessJobConfiguration, Flow | None]:
        """Template + job variables → what to spawn (``ConfigurationError`` names the problem)."""
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
        return config, flow

    async def execute(
        self,
        flow_run: FlowRun,
        entry: Entry,
        config: ProcessJobConfiguration,
        run_log: Any,
        related: list[dict[str, str]],
    ) -> None:
        """Spawn, record, watch until reaped, report the outcome."""
        if not config.command_configured:  # the default engine command: is its interpreter usable?
            await self.interpreter.done.wait()
            if self.interpreter.problem is not None:
                run_log.error("run.start_failed", error=self.interpreter.problem)
                why = decisions.START_FAILED.format(self.interpreter.problem)
                await self.reporter.finish(entry, run_log, "crash", why)
                return
        handle = RunHandle(
            flow_run.id,
            run_log,
            grace=self.settings.cancel_grace_seconds,
            send_intent=self.control.send_intent,
            config=config,
            output_dir=self.ledger.directory / "output",
            claim=entry.transition_id,
            meter=self.meter,
            warm=self.warm,
        )
        try:
            pid = await handle.start(extra_env=self.control.register(flow_run.id) | SWITCH)
        except StartDeferred as exc:
            await self.faults.defer(flow_run, entry, run_log, exc.short, str(exc))
            return
        except (StartError, ConfigurationError) as exc:
            run_log.error("run.start_failed", error=str(exc))
            await self.reporter.finish(entry, run_log, "crash", decisions.START_FAILED.format(exc))
            return
        self.in_hand.live[flow_run.id] = handle  # at once: whatever happens next, it is watched
        self.faults.started()
        handle.usage = self.meter.track(pid)
        self.metrics.runs_started[handle.started_as] += 1
        facts = reaper.process_facts(pid)
        started = attrs.evolve(
            entry,
            phase="started",
            pid=pid,
            pgid=pid,
            start_time=facts.start_time if facts else None,
            boot_id=boot_id(),
            started_at=time.time(),
        )
        try:
            self.ledger.write(started)
        except OSError as exc:  # the run is started: it goes on, watched, without its record
            run_log.warning(
                "ledger.write_failed",
                error=f"{type(exc).__name__}: {exc}",
                effect="the run goes on; if the worker dies before it ends, it is not adopted",
            )
        entry = started
        submitted = self.uplink.add_event("prefect.worker.submitted-flow-run", related)
        run_log = run_log.bind(pid=pid)
        run_log.info(
            "run.started",
            command=config.command,
            cwd=str(config.working_dir or handle.tmpdir),
            start=handle.started_as,
        )
        if self.in_hand.stopped_runs:
            handle.stop("worker stopping", self.stop_intent)

        async def report_pid() -> None:  # beside the output's following: a flood never waits for the API
            try:
                await self.client.set_infrastructure_pid(flow_run.id, pid)
            except Exception as exc:  # (a bug here must not cost the run: it is only the UI's)
                run_log.warning("run.pid_not_reported", error=f"{type(exc).__name__}: {exc}"[:500])

        try:
            returncode = await handle.wait(beside=report_pid)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                rc = handle.status if handle.status is not None else -15
                self.reporter.owe(entry, "crash", decisions.WORKER_STOPPED.format(decisions.exit_message(rc)))
            raise
        finally:
            self.meter.untrack(pid)
        spent = self.spent(handle)
        run_log = run_log.bind(**spent)  # run.finished / run.reported carry them too
        tail = handle.stderr_tail() if returncode != 0 else ""
        run_log.info(
            "run.exited",
            returncode=returncode,
            stopped=handle.stop_requested,
            intent=handle.intent,
            **({"stderr_tail": tail} if tail else {}),
        )
        self.uplink.add_event(
            "prefect.worker.executed-flow-run", ui.with_exit(related, pid, returncode), follows=submitted
        )
        kind, message = decisions.run_outcome(
            handle.cancel_requested,
            handle.stop_requested,
            returncode,
            self.settings.on_stop,
            stderr_tail=tail,
            lost=handle.lost,
        )
        self.hooks.live[flow_run.id] = HookContext.of(
            config, self.settings.python, related, self.interpreter.problem
        )
        try:  # the flow's hooks run with the delivery, in the run's runtime (``hooks.py``)
            await self.reporter.finish(entry, run_log, kind, message)
        finally:
            self.hooks.live.pop(flow_run.id, None)

    async def hook_context(self, run_id: str) -> HookContext | None:
        """The runtime of a run this worker did not start (adopted, or left by a previous
        worker), rebuilt from the API as :meth:`configure` built it; None: the run is gone."""
        flow_run = await self.client.read_flow_run(run_id)
        if flow_run is None:
            return None
        deployment = (
            await self.client.read_deployment(flow_run.deployment_id) if flow_run.deployment_id else None
        )
        if self.pool is None:  # before the first sync (a restart's reconcile)
            self.pool = await self.client.read_work_pool(self.pool_name)
            if self.pool is None:
                return None
        config, flow = await self.configure(flow_run, deployment)
        related = ui.run_related(flow_run, deployment, flow, self.pool)
        return HookContext.of(config, self.settings.python, related, self.interpreter.problem)

    def spent(self, handle: Supervised) -> dict[str, Any]:
        """What the run's tree cost (``usage.py``), as log fields; counted in /metrics."""
        usage = handle.usage
        if usage is None or not usage.peak:
            return {}
        self.metrics.observe_run(usage.peak, usage.cpu_seconds)
        return {
            "peak_memory_mib": round(usage.peak / MIB, 1),
            "cpu_seconds": round(usage.cpu_seconds, 2),
        }

    @property
    def stop_intent(self) -> str:
        """What the engine is told when the worker stops its run (``on_stop``)."""
        return decisions.stop_intent(self.settings.on_stop)
