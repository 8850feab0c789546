"""A flow's ``on_crashed`` and ``on_cancellation`` hooks, run by the worker (issue 21).

Nothing in the API says which flows have hooks (Prefect loads the flow to find out, after
every crash), so the worker learns it the same way, and only when it matters: after a
crash or a cancellation it saw, which is rare. A flow without hooks costs nothing on a
normal run, and after a crash one short process that answers ``no_hooks``.

When (``rules/hookrules.py``; :class:`Hooks` is the reporter's ``HookSink``, so every path
that ends a run goes through it: a spawned or forked run, a run adopted after a
restart, a run resolved as CRASHED after a restart, a state delivered after an outage):

* **on_cancellation**: once the run's process is gone (intent, SIGTERM, grace,
  SIGKILL), just before the worker forces CANCELLED. Then, only if the run is CANCELLED,
  ``prefect.runner.cancelled-flow-run`` in Prefect 3.9.1's shape.
* **on_crashed**: once the worker's CRASHED moved a run that was not final, or when the
  engine wrote CRASHED itself (``--engine-reported``: the runner then runs them only under
  a Prefect before 3.8, whose engine did not).

How: ``hookproc.run_hooks`` in the run's runtime (:class:`HookContext`): for a run in
hand, its interpreter, merged environment and working directory as it was started; for
one left by a previous worker, the same rebuilt from the API (its deployment and the
pool's job template, as the run was configured). The run's ``--limit`` slot stays held
while its hooks run, as with Prefect's worker; the hooks of a run no longer in hand (after
a restart or an outage) run in the background. At most ``CONCURRENCY`` runners live at
once, and a flow found without hooks of a kind is remembered for ``NO_HOOKS_TTL`` (a
burst of crashes costs one runner). What the runner said is one ``run.hooks`` line; a
failure the worker saw (``hook_timeout_seconds`` passed, the flow could not be loaded,
the runner could not start) is also a line in the run's logs in the UI
(``run.hooks_failed``).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import attrs
import structlog
import trio

from worker.books.ledger import Entry
from worker.host.settings import Settings
from worker.prefect import ui
from worker.prefect.outage import API_ERRORS
from worker.process import hookproc
from worker.rules import hookrules
from worker.rules.hookrules import Crashed, Delivered
from worker.rules.job import ProcessJobConfiguration
from worker.rules.models import ProtocolError
from worker.runs.inhand import InHand

log = structlog.get_logger("flow_worker")

CONCURRENCY: Final = 8
"""Hook runners alive at once. Each imports Prefect and the flow (a CPU-second or more,
~100 MiB): a burst of crashes (an OOM storm in a backlog) queues its hooks rather than
start dozens of Prefects at once. Each runner's time counts from its start."""
NO_HOOKS_TTL: Final = 60.0
"""Seconds a deployment's flow found without hooks of a kind is remembered (per
deployment and its last update): a burst of crashes of one flow without hooks costs one
runner, not one per run; a flow that gains hooks is seen within a minute of any change."""
QUIET: Final = frozenset({"ok", "no_hooks", "engine_ran", "not_crashed"})
"""Results that are no failure of anyone's."""
WORKERS_FAULT: Final = frozenset(
    {"killed", "not_started", "failed", "timed_out", "load_failed", "api_failed"}
)
"""Results that mean the hooks did not run to their end: said in the run's UI lines too."""


@attrs.frozen
class HookContext:
    """The run's runtime, for its hook runner."""

    prefix: list[str]
    """The run's interpreter (``rules.hookrules.interpreter``)."""
    env: dict[str, str]
    """The run's merged environment, with ``rules.hookrules.SWITCH``."""
    cwd: Path | None
    """The job's working directory; None: a fresh temporary one."""
    related: list[dict[str, str]]
    """The run's related resources, for ``prefect.runner.cancelled-flow-run``."""
    problem: str | None = None
    """Why the interpreter cannot run the hooks (the default one, without Prefect)."""
    flow_key: str | None = None
    """The deployment and its last update: which flow code the run had (None: unknown)."""

    @classmethod
    def of(
        cls,
        config: ProcessJobConfiguration,
        python: str | None,
        related: list[dict[str, str]],
        problem: str | None = None,
        argv: list[str] | None = None,
    ) -> HookContext:
        """``problem``: what the check of the default interpreter found (``interpreter.py``);
        it matters when a custom command's hooks fall back to that interpreter. ``argv``: the
        command the run started with (``RunHandle.argv``: Prefect's ``uv run`` launch, if so),
        else the configured one."""
        env = {k: v for k, v in config.env.items() if v is not None} | hookrules.SWITCH
        default = python or sys.executable
        prefix = hookrules.interpreter(argv or config.argv(), default)
        problem = problem if prefix == [default] else None
        deployment = config.labels.get("prefect.io/deployment-id")
        key = f"{deployment}@{config.labels.get('prefect.io/deployment-updated')}" if deployment else None
        return cls(prefix, env, config.working_dir, ui.runner_related(related), problem, key)


Rebuild = Callable[[str], Awaitable[HookContext | None]]
"""Rebuilds a run's context from the API (``run.Runner.hook_context``); None: the run is gone."""


@attrs.define
class Hooks:
    """Runs the flows' hooks around the reporter's deliveries (``reporter.HookSink``)."""

    settings: Settings
    uplink: ui.Uplink
    in_hand: InHand
    output_dir: Path
    """Where the runner's stderr file is followed from (the runs' output directory)."""
    rebuild: Rebuild
    live: dict[str, HookContext] = attrs.Factory(dict)
    """The runs in hand whose process is gone and whose state is being delivered."""
    background: trio.Nursery | None = None
    """Where hooks of runs no longer in hand run (the runs nursery); None: inline."""
    runners: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(CONCURRENCY))
    no_hooks: dict[tuple[str, str], float] = attrs.Factory(dict)
    """(flow key, kind) → when its flow was last found without such hooks (trio's clock)."""

    async def before_cancelled(self, entry: Entry, run_log: Any) -> None:
        """The flow's ``on_cancellation`` hooks: the process is gone, CANCELLED is next."""
        try:
            context = await self._context(entry.flow_run_id, run_log, "cancellation")
            if context is not None:
                await self._run(entry.flow_run_id, run_log, context, "cancellation", [])
        except Exception as exc:  # a bug here costs the hooks, never the delivery
            run_log.error("run.hooks_bug", kind="cancellation", error=_said(exc), exc_info=exc)

    async def delivered(self, entry: Entry, run_log: Any, delivered: Delivered) -> None:
        """After a delivery: the cancelled event, or the flow's ``on_crashed`` hooks."""
        run_id = entry.flow_run_id
        try:
            event = hookrules.cancelled_event(delivered)
            crashed = hookrules.crashed_hooks(delivered)
            if not event and crashed is Crashed.NONE:
                return
            context = await self._context(run_id, run_log, "cancellation" if event else "crashed")
            if context is None:
                return
            if event:
                self.uplink.add_event(
                    "prefect.runner.cancelled-flow-run", context.related, resource=ui.runner_resource()
                )
            if crashed is Crashed.NONE:
                return
            extra = ["--engine-reported"] if crashed is Crashed.ENGINE else []
            if run_id in self.in_hand.live or self.background is None:  # its slot is held meanwhile
                await self._run(run_id, run_log, context, "crashed", extra)
            else:
                self.background.start_soon(self._guarded, run_id, run_log, context, extra)
        except Exception as exc:  # a bug here costs the hooks, never the delivery
            run_log.error("run.hooks_bug", kind="crashed", error=_said(exc), exc_info=exc)

    async def _guarded(self, run_id: str, run_log: Any, context: HookContext, extra: list[str]) -> None:
        """A background runner's task: a bug costs these hooks, never the runs nursery."""
        try:
            await self._run(run_id, run_log, context, "crashed", extra)
        except Exception as exc:
            run_log.error("run.hooks_bug", kind="crashed", error=_said(exc), exc_info=exc)

    async def _context(self, run_id: str, run_log: Any, kind: str) -> HookContext | None:
        context = self.live.get(run_id)
        if context is not None:
            return context
        try:
            return await self.rebuild(run_id)
        except (*API_ERRORS, ProtocolError, ValueError) as exc:  # ConfigurationError is a ValueError
            why = f"the run's runtime could not be rebuilt from the API: {exc}"
            run_log.error("run.hooks_failed", kind=kind, error=why[:1000])
            return None

    async def _run(
        self, run_id: str, run_log: Any, context: HookContext, kind: str, extra: list[str]
    ) -> None:
        if context.problem is not None:  # no process that could only fail (said at start too)
            run_log.warning("run.hooks_failed", kind=kind, error=f"not run: {context.problem}")
            return
        key = (context.flow_key, kind) if context.flow_key else None
        if self._remembered(key):
            run_log.info("run.hooks", kind=kind, result="no_hooks", remembered=True)
            return
        async with self.runners:
            if self._remembered(key):  # found while this one waited its turn
                run_log.info("run.hooks", kind=kind, result="no_hooks", remembered=True)
                return
            outcome = await hookproc.run_hooks(
                context.prefix,
                kind,
                run_id,
                env=context.env,
                cwd=context.cwd,
                timeout=self.settings.hook_timeout_seconds,
                log=run_log,
                err_path=self.output_dir / f"{run_id}.hooks.err",
                extra=extra,
            )
        if key is not None and outcome.result == "no_hooks":
            self.no_hooks[key] = trio.current_time()
        ran = [
            {"name": h.get("name"), "ok": h.get("ok"), "seconds": h.get("seconds")}
            for h in outcome.report.get("hooks", [])
            if isinstance(h, dict)
        ]
        level = "info" if outcome.result in QUIET else "warning"
        getattr(run_log, level)(
            "run.hooks",
            kind=kind,
            result=outcome.result,
            hooks=ran,
            seconds=outcome.seconds,
            returncode=outcome.returncode,
            **({"error": outcome.error} if outcome.error else {}),
        )
        if outcome.result in WORKERS_FAULT:
            run_log.error("run.hooks_failed", kind=kind, error=f"{outcome.result}: {outcome.error}"[:1000])

    def _remembered(self, key: tuple[str, str] | None) -> bool:
        """Whether the flow was found without hooks of this kind less than ``NO_HOOKS_TTL`` ago."""
        now = trio.current_time()
        self.no_hooks = {k: t for k, t in self.no_hooks.items() if now - t < NO_HOOKS_TTL}
        return key is not None and key in self.no_hooks


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
