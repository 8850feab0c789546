"""Runs a previous worker left in the ledger: adopted, reported, or returned to the queue.

Before its first poll the worker reads the ledger (``ledger.py``). An entry whose
process still runs (same pid, start time and boot id) is *adopted*: watched like a
spawned run, still cancellable, reported when it ends. Every other entry is *resolved*
against the server by ``decisions.reconcile``: a report still owed is delivered, a lost
process is CRASHED, a claim that never started goes back to SCHEDULED, the rest is
forgotten. Claims whose answer was lost in an outage (``pending``) are resolved the
same way once the API answers again. A resolved entry's output files are removed, as
are output files the ledger no longer knows of.

With per-run cgroups (``cgroups.py``) the runs are also found by their cgroups
(``run-<id>`` under the unit): an adopted run keeps its cgroup (watched, killed and
accounted through it); the ledger's pid identity still says whether its leader runs,
and a leader not in its cgroup is said. A cgroup whose run is not adopted (its leader is
gone, its claim never recorded a start, or the ledger does not know it) is emptied with
``cgroup.kill`` and removed before its run is resolved, so nothing of it runs on while
it is returned to the queue or reported.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import structlog
import trio

from worker.books.ledger import Entry, Ledger, boot_id
from worker.books.reporter import Reporter, run_logger
from worker.host.settings import Settings
from worker.prefect.api import PrefectClient
from worker.prefect.outage import API_ERRORS, Outage
from worker.process import reaper
from worker.process.adopted import AdoptedHandle
from worker.process.cgroups import Cgroups, RunCgroup
from worker.process.handle import remove_output
from worker.process.usage import Meter, Usage
from worker.rules import decisions
from worker.rules.admission import Book
from worker.rules.models import FlowRun
from worker.rules.runlimits import RunLimits
from worker.runs.inhand import InHand

log = structlog.get_logger("flow_worker")


@attrs.define
class Reconciler:
    settings: Settings
    client: PrefectClient
    ledger: Ledger
    reporter: Reporter
    outage: Outage
    in_hand: InHand
    meter: Meter = attrs.Factory(Meter)
    book: Book = attrs.Factory(Book)
    unlabelled: dict[str, FlowRun] = attrs.Factory(dict)
    """Runs to label with this worker's name (``Runner.relabel``, shared)."""
    pending: dict[str, Entry] = attrs.Factory(dict)
    """Claims whose answer was lost: resolved against the server like a restart's ledger."""
    cgroups: Cgroups = attrs.Factory(lambda: Cgroups(reason="not set up"))
    """The worker's delegated cgroup subtree (the supervisor's), where a previous worker's
    runs are found."""

    @property
    def pool(self) -> str:
        return self.reporter.pool

    async def reconcile(self, runs: trio.Nursery) -> None:
        """Before the first poll: adopt, report or return every run a previous worker owned."""
        entries, bad = self.ledger.entries()
        for problem in bad:
            log.error("ledger.unreadable", problem=problem)
        self._remove_stray_output({e.flow_run_id for e in entries})
        mine = [e for e in entries if e.pool == self.pool]
        found = self.cgroups.found()
        if mine:
            log.info("ledger.reconciling", runs=len(mine), cgroups=len(found))
        this_boot = boot_id()
        todo = []
        for entry in mine:
            alive = (
                entry.phase == "started"
                and entry.pid is not None
                and entry.boot_id == this_boot
                and reaper.is_same_process(entry.pid, entry.start_time)
            )
            cgroup = found.pop(entry.flow_run_id, None)
            if alive and entry.report is None:
                self.adopt(entry, runs, cgroup)
                continue
            if cgroup is not None:
                await self.end_stray(cgroup, f"its run is not adopted (ledger phase {entry.phase})")
            todo.append(entry)
        for cgroup in found.values():
            await self.end_stray(cgroup, "the ledger holds no run of that id")
        while todo:
            try:
                await self.resolve(todo[0])
            except API_ERRORS as exc:
                self.outage.failed(exc, "reconcile")
                await self.outage.pause(self.outage.delay())
                continue
            except Exception as exc:  # one entry's bug costs that entry (kept for the next start)
                self._bug(todo[0], exc)
            todo.pop(0)

    async def resolve(self, entry: Entry) -> None:
        """Settle one entry whose process is not running (see ``decisions.reconcile``); its
        output files go (nobody follows them any more, and a flow's output may hold secrets)."""
        remove_output(self.ledger.output_dir, entry.flow_run_id)
        run_log = run_logger(entry.flow_run_id, entry.flow_run_name, self.pool)
        if entry.report is not None:
            self.reporter.owed[entry.flow_run_id] = entry
            await self.reporter.deliver(entry, run_log)
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
        await self.reporter.finish(entry, run_log, kind, decision.message)

    async def resolve_pending(self) -> bool:
        """Resolve the claims whose answer was lost; False if the API failed (retry later)."""
        for entry in list(self.pending.values()):
            try:
                await self.resolve(entry)
            except API_ERRORS as exc:
                self.outage.failed(exc, "report")
                return False
            except Exception as exc:
                self._bug(entry, exc)
            self.pending.pop(entry.flow_run_id, None)
        return True

    def _remove_stray_output(self, held: set[str]) -> None:
        """Output files of runs the ledger no longer holds (a worker that died between the
        two removals): before anything starts, nobody writes them."""
        try:
            found = list(self.ledger.output_dir.iterdir())
        except OSError:
            return
        for path in found:
            run_id, _, stream = path.name.rpartition(".")
            if stream in ("out", "err") and run_id not in held:
                remove_output(self.ledger.output_dir, run_id)

    def _bug(self, entry: Entry, exc: Exception) -> None:
        """A bug met while settling one entry: said with its traceback; the others go on."""
        run_logger(entry.flow_run_id, entry.flow_run_name, self.pool).error(
            "run.internal_error", error=f"{type(exc).__name__}: {exc}"[:500], phase=entry.phase, exc_info=exc
        )

    async def end_stray(self, cgroup: RunCgroup, why: str) -> None:
        """A run's cgroup no run is adopted with: whatever is in it is killed, then it is removed."""
        pids = cgroup.pids()
        _, removed = await cgroup.end()
        log.warning("cgroups.stray", cgroup=str(cgroup.path), reason=why, killed=pids, removed=removed)

    def adopt(self, entry: Entry, runs: trio.Nursery, cgroup: RunCgroup | None = None) -> None:
        """Watch a previous worker's live process as one of ours (it counts against --limit),
        in its cgroup if it has one."""
        run_log = run_logger(entry.flow_run_id, entry.flow_run_name, self.pool).bind(pid=entry.pid)
        if cgroup is not None:
            if entry.pid is not None and not cgroup.contains(entry.pid):
                run_log.warning(
                    "run.cgroup_mismatch",
                    cgroup=str(cgroup.path),
                    effect="adopted by its pid; its cgroup is still ended with it",
                )
            # the controllers were off while no worker ran (``delegated.Switch``): limits again
            self.cgroups.apply(cgroup, RunLimits(**(entry.limits or {})), run_log)
        handle = AdoptedHandle(
            entry.flow_run_id,
            run_log,
            grace=self.settings.cancel_grace_seconds,
            adopted_pid=entry.pid or 0,
            adopted_pgid=entry.pgid,
            start_time=entry.start_time,
            output_dir=self.ledger.output_dir,
            claim=entry.transition_id,
            owner=entry.worker_name,
            cgroup=cgroup,
        )
        self.in_hand.live[entry.flow_run_id] = handle
        exact = cgroup is not None and "memory" in self.cgroups.controllers  # memory.peak at its end
        handle.usage = Usage() if exact else self.meter.track(entry.pid or 0)
        self.book.book(entry.flow_run_id, None)
        # peers judge a started run's owner by its label: name this worker (a fresh default
        # name, or the previous worker died before its label write, made after the start, landed)
        self.unlabelled[entry.flow_run_id] = FlowRun(id=entry.flow_run_id, name=entry.flow_run_name)
        run_log.info("run.adopted", started_at=entry.started_at, cgroup=cgroup.path.name if cgroup else None)
        runs.start_soon(self._watch_adopted, entry, handle, run_log)

    async def _watch_adopted(self, entry: Entry, handle: AdoptedHandle, run_log: Any) -> None:
        try:
            await handle.wait()
            self.meter.untrack(entry.pid or 0)
            oom = handle.out_of_memory(handle.cgroup.limits.memory_max if handle.cgroup else None)
            run_log.info(
                "run.exited",
                returncode=None,
                stopped=handle.stop_requested,
                adopted=True,
                **({"out_of_memory": oom} if oom else {}),
            )
            kind, message = decisions.run_outcome(
                handle.cancel_requested,
                handle.stop_requested,
                None,
                self.settings.on_stop,
                adopted=True,
                stderr_tail=handle.stderr_tail(),
                lost=handle.lost,
                oom=oom,
            )
            await self.reporter.finish(entry, run_log, kind, message)
        except Exception as exc:  # a bug costs this run (CRASHED with it), never the worker
            self._bug(entry, exc)
            why = decisions.INTERNAL_ERROR.format(f"{type(exc).__name__}: {exc}"[:500])
            with contextlib.suppress(Exception):
                await self.reporter.finish(entry, run_log, "crash", why)
        finally:
            self.meter.untrack(entry.pid or 0)
            self.book.finished(entry.flow_run_id, None, None)
            self.in_hand.release(entry.flow_run_id)
