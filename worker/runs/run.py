"""One flow run's life, top to bottom: claim, configure, spawn, watch, outcome, report.

:meth:`Runner.run` is the task the poll starts for each due run. Read it in order:

1. ``claim.Claimer.claim``: read the deployment (cached), write the claim to the ledger,
   propose PENDING with a fixed ``transition_id`` and this worker's name in its message
   (``fleet.claim_message``), judge the answer (``decisions.claim_outcome``), and unless
   the answer shows it replaced a SCHEDULED state (``decisions.claimed_from_scheduled``),
   check the run's history for a state another worker finished meanwhile
   (``decisions.displaced_state``): if so, put it back and run nothing.
2. :meth:`Runner.configure`: the pool's base job template + the deployment's and run's
   job variables → a :class:`~worker.job.ProcessJobConfiguration`.
3. :meth:`Runner.execute`: spawn the child (``spawned.RunHandle``), record pid and start
   time in the ledger, report ``infrastructure_pid`` and write the run's labels
   (``labels.Labeller``) in the background, watch it until it is reaped.
4. ``decisions.run_outcome`` → :meth:`Reporter.finish <worker.reporter.Reporter.finish>`:
   what the server is owed, written to the ledger first, delivered once.

Along the way the UI is told (``ui.py``): the ``prefect.worker.submitted-flow-run`` and
``…executed-flow-run`` events, and, through the logging tap, the run's worker lines.

From a successful claim on, every path ends in a started child or a state owed; the
run leaves :class:`InHand` in a ``finally``, so its ``--limit`` slot is freed on every
path (pain point 25).
"""

from __future__ import annotations

import shlex
import sys
import time
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
from worker.prefect.cache import FLOW_TTL, ReadCache
from worker.prefect.outage import API_ERRORS, Outage
from worker.process import reaper
from worker.process.cgroups import Cgroups
from worker.process.handle import StartDeferred, StartError, Supervised
from worker.process.spawned import RunHandle
from worker.process.usage import Meter, Usage
from worker.process.warm import WarmStarts
from worker.rules import decisions, runlimits
from worker.rules.admission import MIB, Book
from worker.rules.hookrules import SWITCH
from worker.rules.job import ConfigurationError, ProcessJobConfiguration, merge_job_variables
from worker.rules.models import Deployment, Flow, FlowRun, ProtocolError, WorkPool
from worker.rules.runlimits import RunLimits
from worker.runs.claim import Claimer
from worker.runs.control import ControlChannel
from worker.runs.faults import Faults
from worker.runs.hooks import HookContext, Hooks
from worker.runs.inhand import InHand
from worker.runs.interpreter import InterpreterCheck
from worker.runs.labels import Labeller

log = structlog.get_logger("flow_worker")

CLAIM_CONCURRENCY: Final = 16
"""Claims in flight at once: a burst of due runs starts together without a request storm."""


READ_GATHER: Final = 0.25
"""While other runs are in hand, a run's end waits this long for others' before its state
is read (``reporter.Reads``): a burst's ends share reads; a lone run's is read at once."""


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
    cgroups: Cgroups = attrs.Factory(lambda: Cgroups(reason="not set up"))
    """The worker's delegated cgroup subtree, set up by the supervisor (``cgroups.py``)."""
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
    claimer: Claimer = attrs.field(init=False)
    """Claims a due run and verifies the claim (``claim.py``)."""

    def __attrs_post_init__(self) -> None:
        self.uplink = ui.Uplink(self.client, self.settings.worker_name, self.settings.log_to_api)
        self.hooks = Hooks(
            self.settings, self.uplink, self.in_hand, self.ledger.output_dir, self.hook_context
        )
        self.reporter.hooks = self.hooks
        self.reporter.undisputed = self.fencer.undisputed  # (a crash report needs no read first)
        self.reporter.reads.gather = lambda: READ_GATHER if len(self.in_hand.live) > 1 else 0.0
        self.interpreter = InterpreterCheck(self.settings.python or sys.executable)
        self.warm = WarmStarts(enabled=self.settings.warm_start)
        self.faults = Faults(self.reporter, self.metrics, self.lost_claims)
        self.labels = Labeller(self.client, self.settings, self.in_hand, self.unlabelled)
        self.fencer.unlabelled = self.labels.unconfirmed
        self.claimer = Claimer(
            self.settings,
            self.client,
            self.ledger,
            self.metrics,
            self.outage,
            self.fencer,
            self.cache,
            self.lost_claims,
            self.pool_name,
        )

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
                claimed = await self.claimer.claim(flow_run, run_log)
            if claimed is None:
                return
            deployment, entry, run_log = claimed
            # Peers know the owner of a PENDING run by the claim's own mark (its message:
            # ``fleet.claim_message``), so no label write comes before the start: the labels
            # go on in the background right after it (``execute``).
            # From here the run is ours: every path ends in a started child, a state owed,
            # or (after a heartbeat gap) the finding that a peer has taken it.
            try:
                config, flow, limits = await self.configure(flow_run, deployment)
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
            if not await self.claimer.still_ours(entry, claimed_at, run_log):
                return
            related = ui.run_related(flow_run, deployment, flow, self.pool)
            await self.execute(flow_run, entry, config, run_log, related, limits)
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
            self.labels.writing.discard(flow_run.id)
            self.in_hand.release(flow_run.id)

    async def configure(
        self, flow_run: FlowRun, deployment: Deployment | None
    ) -> tuple[ProcessJobConfiguration, Flow | None, RunLimits]:
        """Template + job variables → what to spawn, and the run's resource limits
        (``ConfigurationError`` names the problem)."""
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
        try:
            limits = runlimits.combine(config.limits, values, self.settings.run_limits())
        except runlimits.LimitError as exc:
            raise ConfigurationError(str(exc)) from None
        self.book.limited(flow_run.id, flow_run.deployment_id, limits.memory_max)
        return config, flow, limits

    async def execute(
        self,
        flow_run: FlowRun,
        entry: Entry,
        config: ProcessJobConfiguration,
        run_log: Any,
        related: list[dict[str, str]],
        limits: RunLimits,
    ) -> None:
        """Spawn (in its cgroup, with its limits), record, watch until reaped, report the outcome."""
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
            output_dir=self.ledger.output_dir,
            claim=entry.transition_id,
            meter=self.meter,
            warm=self.warm,
            interpreter=self.interpreter.dirs,
            cgroups=self.cgroups,
            limits=limits,
        )
        try:
            pid = await handle.start(extra_env=self.control.register(flow_run.id) | SWITCH)
        except StartDeferred as exc:
            await self.faults.defer(flow_run, entry, run_log, exc.short, config.mask(str(exc)))
            return
        except (StartError, ConfigurationError) as exc:  # (it may quote the command: masked)
            run_log.error("run.start_failed", error=config.mask(str(exc)))
            why = decisions.START_FAILED.format(config.mask(str(exc)))
            await self.reporter.finish(entry, run_log, "crash", why)
            return
        self.labels.writing.add(flow_run.id)  # our labels are not on yet: the fence knows
        self.in_hand.live[flow_run.id] = handle  # at once: whatever happens next, it is watched
        self.faults.started()
        exact = handle.cgroup is not None and "memory" in self.cgroups.controllers  # memory.peak at its end
        handle.usage = Usage() if exact else self.meter.track(pid)
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
            limits=limits.items() or None,
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
        run_log.info(  # what came from blocks and {{ $NAME }} masked: this goes to the journal and the UI
            "run.started",
            command=config.mask(shlex.join(handle.argv) if handle.argv else (config.command or "")),
            cwd=config.mask(str(config.working_dir or handle.tmpdir)),
            start=handle.started_as,
            **({"cgroup": handle.cgroup.path.name} if handle.cgroup else {}),
            **({"limits": limits.describe()} if handle.cgroup and limits else {}),
        )
        if self.in_hand.stopped_runs:
            handle.stop("worker stopping", self.stop_intent)

        pool = self.pool
        assert pool is not None

        async def report_pid() -> None:  # beside the output's following: a flood never waits for the API
            try:
                await self.client.set_infrastructure_pid(flow_run.id, pid)
            except Exception as exc:  # (a bug here must not cost the run: it is only the UI's)
                run_log.warning("run.pid_not_reported", error=f"{type(exc).__name__}: {exc}"[:500])

        async def label() -> None:  # the UI's and the fleet's labels, after the start
            try:
                await self.labels.label(flow_run, run_log, pool)
            except Exception as exc:  # (a bug here must not cost the run)
                run_log.warning("run.labels_not_set", error=f"{type(exc).__name__}: {exc}"[:500])

        async def beside() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report_pid)
                nursery.start_soon(label)

        try:
            returncode = await handle.wait(beside=beside)
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
        oom = handle.out_of_memory(limits.memory_max)
        run_log.info(
            "run.exited",
            returncode=returncode,
            stopped=handle.stop_requested,
            intent=handle.intent,
            **({"stderr_tail": tail} if tail else {}),
            **({"out_of_memory": oom} if oom else {}),
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
            oom=oom,
        )
        self.hooks.live[flow_run.id] = HookContext.of(  # in the runtime it started in (`uv run` …)
            config, self.settings.python, related, self.interpreter.problem, handle.argv
        )
        try:  # the flow's hooks run with the delivery, in the run's runtime (``hooks.py``)
            await self.reporter.finish(entry, run_log, kind, message)
        finally:
            self.hooks.live.pop(flow_run.id, None)
        self.labels.later(flow_run)  # not on yet (a busy server at its start): the relabel pass

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
        config, flow, _ = await self.configure(flow_run, deployment)
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
