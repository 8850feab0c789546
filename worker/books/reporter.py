"""States owed to the API: written to the ledger first, delivered once, kept through outages.

A run whose process is gone owes the server a report (``ledger.Report``): CRASHED with
the reason, CANCELLED, SCHEDULED again, or "CRASHED if the engine did not finish it"
(``crash_if_running``, the common case after a clean exit). :meth:`Reporter.finish`
records it and tries to deliver it at once; what cannot be delivered stays in
:attr:`Reporter.owed` and in the ledger, and :meth:`Reporter.deliver_owed` (the
supervisor's reporter loop) retries it until the API answers. Delivery writes only what
``decisions.owed_proposal`` says is still needed given the run's current state, so a
report delivered twice, or after the engine finished the run itself, changes nothing.

How the current state is known (:meth:`Reporter._current`): mostly by a read, but reads
of runs finishing together are one request (:class:`Reads`: while one
``POST /flow_runs/filter`` is under way, the runs asked for meanwhile wait for the next),
so a burst of clean exits costs a few requests, not one per run. A ``crash`` report (a
non-zero exit: a write follows anyway) of a run no peer can have taken
(:attr:`Reporter.undisputed`: no heartbeat gap since its claim, ``Fencer.undisputed``) is
proposed without a read: ABORT or REJECT carry the current state (final, CANCELLING, or
ours replayed), so nothing else is written, or CANCELLED is next; an ACCEPT reads the
history, to know what it replaced and to put back a SCHEDULED state it must not have
replaced. Not for a clean exit (``crash_if_running``): there the engine has nearly always
finished the run, and a proposal answered ABORT would still take the server's write lock
(on SQLite, ``BEGIN IMMEDIATE``) where a read takes none.

A flow's hooks ride on the delivery (``rules/hookrules.py``, run by ``runs/hooks.py`` through
:attr:`Reporter.hooks`): its ``on_cancellation`` hooks just before CANCELLED is proposed,
its ``on_crashed`` hooks once the delivery is done, from what it found and did.
"""

from __future__ import annotations

import datetime
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any, Final, Protocol

import attrs
import structlog
import trio

from worker.books.ledger import Entry, Ledger, Report
from worker.host.metrics import Metrics
from worker.prefect.answers import ApiNotFound
from worker.prefect.api import PrefectClient
from worker.prefect.outage import API_ERRORS, Outage
from worker.rules import decisions, fleet, hookrules
from worker.rules.hookrules import Delivered
from worker.rules.models import FlowRun, OrchestrationResult, StateType

log = structlog.get_logger("flow_worker")


def run_logger(run_id: str, run_name: str, pool: str) -> Any:
    """The logger bound to one run: every line about it carries its id, name and pool."""
    return log.bind(flow_run_id=run_id, flow_run_name=run_name, work_pool=pool)


class HookSink(Protocol):
    """Where the flow's hooks are run (``runs/hooks.Hooks``); it never raises."""

    async def before_cancelled(self, entry: Entry, run_log: Any) -> None: ...

    async def delivered(self, entry: Entry, run_log: Any, delivered: Delivered) -> None: ...


BATCH: Final = 100
"""At most this many runs per read (the server's default page is 200)."""


@attrs.define
class _Asked:
    done: trio.Event = attrs.Factory(trio.Event)
    found: FlowRun | None = None
    error: BaseException | None = None


@attrs.define
class Reads:
    """Current states of runs, read together: one reader at a time (a fair lock) reads,
    with one ``POST /flow_runs/filter``, every run asked for until then; who asks
    meanwhile queues on the lock, and finds its answer there or reads the next batch
    itself. An answer without a run means it is deleted (None), as a 404 of
    ``GET /flow_runs/{id}``; a failed read fails every asker of its batch; a reader
    cancelled mid-read puts its batch back for the next. No asker waits on another's
    promise to wake it (review of issue 22: such a hand-over could be lost, and every
    later read then waited for ever)."""

    client: PrefectClient
    waiting: dict[str, list[_Asked]] = attrs.Factory(dict)
    gather: Callable[[], float] = lambda: 0.0
    """Seconds a reader waits for other askers before it reads (set by the runner: a
    moment while other runs are in hand, so that runs ending near each other share a read)."""
    _turn: trio.Lock = attrs.Factory(trio.Lock)

    @property
    def reading(self) -> bool:
        return self._turn.locked()

    async def read(self, run_id: str) -> FlowRun | None:
        asked = _Asked()
        self.waiting.setdefault(run_id, []).append(asked)
        try:
            while not asked.done.is_set():
                async with self._turn:
                    if asked.done.is_set():  # answered by the batch of the reader before
                        break
                    await trio.sleep(self.gather())
                    await self._read_batch()
            return _answer(asked)
        finally:  # (answered, failed or cancelled: nothing of it stays)
            askers = self.waiting.get(run_id, [])
            if asked in askers:
                askers.remove(asked)
                if not askers:
                    del self.waiting[run_id]

    async def _read_batch(self) -> None:
        ids = list(itertools.islice(self.waiting, BATCH))
        batch = {run_id: self.waiting.pop(run_id) for run_id in ids}
        try:
            found = {r.id: r for r in await self.client.filter_flow_runs(ids)} if ids else {}
        except Exception as exc:  # (each asker of the batch raises it)
            for asked in itertools.chain.from_iterable(batch.values()):
                asked.error = exc
                asked.done.set()
            return
        except BaseException:  # (cancelled: the batch is the next reader's)
            for run_id, askers in batch.items():
                self.waiting.setdefault(run_id, []).extend(askers)
            raise
        for run_id, askers in batch.items():
            for asked in askers:
                asked.found = found.get(run_id)
                asked.done.set()


def _answer(asked: _Asked) -> FlowRun | None:
    if asked.error is not None:
        raise asked.error
    return asked.found


@attrs.define
class Reporter:
    client: PrefectClient
    ledger: Ledger
    outage: Outage
    metrics: Metrics
    pool: str
    worker_name: str = ""
    """This worker's name: with the entry's, a name under which a run is still ours
    (a run adopted after a restart is relabelled with the new name)."""
    owed: dict[str, Entry] = attrs.Factory(dict)
    """Finished runs whose report is not delivered yet (also on disk)."""
    failed_runs: int = 0
    """Runs reported as crashed (``--once`` exits 1 if any)."""
    hooks: HookSink | None = None
    """Runs the flows' hooks around deliveries (set by the runner); None: no hooks."""
    hooks_ran: set[str] = attrs.Factory(set)
    """Runs whose ``on_cancellation`` hooks ran and whose CANCELLED is not delivered yet."""
    delivering: set[str] = attrs.Factory(set)
    """Runs whose report is being delivered now (its hooks may take minutes): the reporter
    loop leaves them alone, so a report is never delivered twice at once."""
    reads: Reads = attrs.field(init=False)
    """The runs' current states, read together (:class:`Reads`)."""
    undisputed: Callable[[Entry], bool] = lambda entry: False
    """Whether no peer can have taken the entry's run since its claim (``Fencer.undisputed``,
    set by the runner): its crash report is then proposed without reading the run first."""

    def __attrs_post_init__(self) -> None:
        self.reads = Reads(self.client)

    def owe(self, entry: Entry, kind: str, message: str) -> Entry:
        """Record a report in the ledger (fsync'd) and in :attr:`owed`; deliver later."""
        if kind == "crash":
            self.failed_runs += 1
        report = Report(kind=kind, message=message, transition_id=str(uuid.uuid4()))
        ran = entry.hooks_ran or entry.flow_run_id in self.hooks_ran
        entry = attrs.evolve(entry, phase="finished", finished_at=time.time(), report=report, hooks_ran=ran)
        try:
            self.ledger.write(entry)
        except OSError as exc:  # a full disk, no descriptors: deliver it all the same
            log.warning(
                "ledger.write_failed",
                flow_run_id=entry.flow_run_id,
                error=f"{type(exc).__name__}: {exc}",
                effect="the state owed is kept in memory only until delivered",
            )
        self.owed[entry.flow_run_id] = entry
        return entry

    async def finish(self, entry: Entry, run_log: Any, kind: str, message: str) -> None:
        """Record the owed state, then try to deliver it now (else the reporter loop will).

        The one exception to "ledger first": a clean exit (``crash_if_running``, the
        common case) is delivered first and written only if that fails. If the worker dies
        in between, the ledger still says "started" and a restarted worker finds the
        process gone and checks the run the same way; this saves two fsyncs per run,
        which were the largest cost of a burst in the profile.
        """
        if kind == "none":  # a peer took the run (the fence): nothing is owed to anyone
            self.ledger.remove(entry.flow_run_id)
            self.owed.pop(entry.flow_run_id, None)
            run_log.warning("run.not_reported", reason=message)
            return
        if kind == "crash_if_running":
            report = Report(kind=kind, message=message, transition_id=str(uuid.uuid4()))
            quick = attrs.evolve(entry, phase="finished", finished_at=time.time(), report=report)
            try:
                await self.deliver(quick, run_log)
                return
            except API_ERRORS as exc:
                self.outage.failed(exc, "report")
        entry = self.owe(entry, kind, message)
        try:
            await self.deliver(entry, run_log)
        except API_ERRORS as exc:
            self.outage.failed(exc, "report")
            run_log.warning("run.report_deferred", kind=kind, error=str(exc))

    async def deliver(self, entry: Entry, run_log: Any | None = None) -> Delivered:
        """Deliver one owed report; on success the ledger entry is removed. The flow's
        hooks run around it (:attr:`hooks`); what it found and did is returned."""
        self.delivering.add(entry.flow_run_id)
        try:
            return await self._deliver(entry, run_log)
        finally:
            self.delivering.discard(entry.flow_run_id)

    async def _deliver(self, entry: Entry, run_log: Any | None) -> Delivered:
        assert entry.report is not None
        report = entry.report
        run_log = run_log or run_logger(entry.flow_run_id, entry.flow_run_name, self.pool)
        current, first = await self._current(entry)
        current_type = current.state_type if current is not None else None
        owner = fleet.owner(current) if current is not None else None
        taken = owner is not None and owner not in (entry.worker_name, self.worker_name)
        proposal = decisions.owed_proposal(report.kind, current_type, taken)
        found_ours = bool(
            current is not None
            and current.state is not None
            and current.state.state_details.get("transition_id") == report.transition_id
        )
        proposed = proposal.type if proposal is not None else None
        ran = entry.hooks_ran or entry.flow_run_id in self.hooks_ran
        if self.hooks is not None and hookrules.cancellation_hooks(proposed, ran):
            await self.hooks.before_cancelled(entry, run_log)  # the process is gone; CANCELLED next
            self.hooks_ran.add(entry.flow_run_id)  # a retry runs them no more; nor, from the
            entry = attrs.evolve(entry, hooks_ran=True)  # ledger, a restarted worker
            if entry.flow_run_id in self.owed:
                self.owed[entry.flow_run_id] = entry
            try:
                self.ledger.write(entry)
            except OSError:
                pass  # memory remembers (``hooks_ran``) while this worker lives
        status = None
        outcome = (
            f"taken by worker {owner!r}"
            if taken
            else "run deleted"
            if current is None and report.kind != "reschedule"
            else "not needed"
        )
        if proposal is not None:
            details: dict[str, Any] = {}
            message = report.message
            if proposal.type is StateType.CANCELLED:
                details = dict(current.state.state_details) if current and current.state else {}
                message = decisions.CANCELLED_MESSAGE
            elif proposal.type is StateType.SCHEDULED:
                details = {"scheduled_time": datetime.datetime.now(datetime.UTC).isoformat()}
            if first is not None and proposal.type is StateType.CRASHED:
                result = first  # (proposed already: its answer is the outcome)
            else:
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
            status = result.status
            if report.kind == "crash_if_running" and outcome == "CRASHED ACCEPT":
                self.failed_runs += 1  # e.g. exit 0 without a final state: --once says so
        self.outage.succeeded()
        self.ledger.remove(entry.flow_run_id)
        self.owed.pop(entry.flow_run_id, None)
        self.hooks_ran.discard(entry.flow_run_id)
        done = Delivered(
            report.kind, current_type, found_ours, taken, proposed, status, entry.pid is not None
        )
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
        else:
            level = "warning" if report.kind == "crash_if_running" else "info"
            getattr(run_log, level)("run.reported", kind=report.kind, outcome=outcome, message=report.message)
        if self.hooks is not None:
            await self.hooks.delivered(entry, run_log, done)
        return done

    async def _current(self, entry: Entry) -> tuple[FlowRun | None, OrchestrationResult | None]:
        """The run as it is before the report is written (None: deleted), and the answer to
        the CRASHED already proposed, if it was (see the module's docstring)."""
        assert entry.report is not None
        run_id = entry.flow_run_id
        if entry.report.kind != "crash" or not self.undisputed(entry):
            return await self.reads.read(run_id), None
        try:
            first = await self.client.set_flow_run_state(
                run_id,
                StateType.CRASHED,
                "Crashed",
                entry.report.message,
                transition_id=entry.report.transition_id,
            )
        except ApiNotFound:
            return None, None
        if first.status.value != "ACCEPT":
            return FlowRun(run_id, entry.flow_run_name, state=first.state), first
        replaced = decisions.newest_other(
            await self.client.read_flow_run_states(run_id), entry.report.transition_id
        )
        if replaced is None:  # (our CRASHED alone in the history: it replaced nothing known)
            return FlowRun(run_id, entry.flow_run_name, state=first.state), first
        if decisions.owed_proposal(entry.report.kind, replaced.type) is None:
            await self.client.restore_state(run_id, replaced)  # e.g. SCHEDULED: it will run again
        return FlowRun(run_id, entry.flow_run_name, state=replaced), first

    async def deliver_owed(self) -> bool:
        """Try every owed report once; False if the API failed (the rest wait)."""
        for entry in list(self.owed.values()):
            if entry.flow_run_id in self.delivering:
                continue  # (its delivery is under way: its hooks are running)
            try:
                await self.deliver(entry)
            except API_ERRORS as exc:
                self.outage.failed(exc, "report")
                return False
        return True

    def give_up(self) -> None:
        """At exit: say what stays owed (it is in the ledger for the next worker)."""
        if self.owed:
            log.error(
                "worker.reports_pending",
                flow_run_ids=sorted(self.owed),
                hint="kept in the ledger; delivered when the worker starts again",
            )
