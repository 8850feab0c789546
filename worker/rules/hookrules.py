"""When a flow's ``on_crashed`` and ``on_cancellation`` hooks are the worker's to run (pure).

Every run's process gets ``PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS=false``
(``SWITCH``), as Prefect's worker sets it from 3.2 on: the engine leaves the cancellation
hooks to the worker, which runs them once the process is gone (so they also run for a
flow that ignores SIGTERM or outlives the kill grace). Up to 3.6 the switch gates the
engine's ``on_crashed`` hooks too; from 3.8 on it does not. So after a crash:

* the worker wrote CRASHED (its proposal moved a run that was not final): nothing else
  ran the hooks, on any version: the worker runs them;
* the engine wrote CRASHED itself: a 3.8+ engine ran them, an older one did not. The
  hook runner is told (``--engine-reported``) and, in the run's own Prefect, runs them
  only before 3.8, so they never run twice and never are skipped.

The decisions here read what the reporter found and did when it delivered a run's owed
state (``Delivered``); ``runs/hooks.py`` acts on them.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from worker.rules.models import SetStateStatus, StateType

SWITCH: Final = {"PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false"}
"""Set in every run's environment (and the hook runner's), over the job's ``env``."""


@attrs.frozen
class Delivered:
    """What delivering one owed report found and did (``reporter.Reporter.deliver``)."""

    kind: str
    """The report's kind (``ledger.Report.kind``)."""
    found: StateType | None
    """The run's state type when read before proposing (None: the run is deleted)."""
    found_ours: bool = False
    """That state was written by this very report (an earlier attempt whose answer was lost)."""
    taken: bool = False
    """Another worker has the run: nothing was written."""
    proposed: StateType | None = None
    status: SetStateStatus | None = None
    started: bool = True
    """The run's process was started (the ledger has its pid): else nothing crashed."""

    @property
    def accepted(self) -> bool:
        return self.proposed is not None and self.status is SetStateStatus.ACCEPT

    @property
    def final(self) -> StateType | None:
        """The run's state after the delivery, as far as the worker knows."""
        return self.proposed if self.accepted else self.found


class Crashed(enum.Enum):
    NONE = "none"
    WORKER = "worker"  # the worker's CRASHED: run the hooks
    ENGINE = "engine"  # the engine's CRASHED: run them only where the engine did not (< 3.8)


CRASH_KINDS: Final = frozenset({"crash", "crash_if_running"})


def crashed_hooks(delivered: Delivered) -> Crashed:
    """Whether a delivered report calls for the flow's ``on_crashed`` hooks.

    ==========================================  ==========  ===================================
    what the delivery found and did             hooks       why
    ==========================================  ==========  ===================================
    the run taken by another worker, deleted    NONE        not ours any more
    its process never started                   NONE        a start that failed is no crash
                                                            of the flow's process
    report ``reschedule``, ``cancelled``,       NONE        not a crash (a stop that
    ``none``                                                reschedules, a cancellation)
    CRASHED proposed and accepted               WORKER      the worker's crash moved a run
                                                            that was not final
    found CRASHED, written by this report       WORKER      an earlier attempt of this report
                                                            wrote it; its answer was lost
    found CRASHED, written by someone else      ENGINE      the engine reported its own crash
    anything else (COMPLETED, FAILED, …)        NONE        the run ended by itself
    ==========================================  ==========  ===================================
    """
    if (
        delivered.taken
        or delivered.found is None
        or not delivered.started
        or delivered.kind not in CRASH_KINDS
    ):
        return Crashed.NONE
    if delivered.accepted and delivered.proposed is StateType.CRASHED:
        return Crashed.WORKER
    if delivered.proposed is None and delivered.found is StateType.CRASHED:
        return Crashed.WORKER if delivered.found_ours else Crashed.ENGINE
    return Crashed.NONE


def cancellation_hooks(proposal: StateType | None, already_ran: bool) -> bool:
    """Whether the flow's ``on_cancellation`` hooks run now, before the proposal is made:
    whenever the worker is about to write CANCELLED (``decisions.owed_proposal``: a run
    it cancelled, or a CANCELLING run whose process is gone), unless they already ran for
    this report (a delivery retried after its answer was lost)."""
    return proposal is StateType.CANCELLED and not already_ran


def cancelled_event(delivered: Delivered) -> bool:
    """Whether ``prefect.runner.cancelled-flow-run`` is emitted: only once the run really
    is CANCELLED by the worker's own proposal (as Prefect 3.9.1's cancellation manager)."""
    return (
        not delivered.taken
        and delivered.final is StateType.CANCELLED
        and (delivered.proposed is StateType.CANCELLED or delivered.found_ours)
    )


ENGINE_MODULES: Final = ("prefect.engine", "prefect.flow_engine")


def interpreter(argv: list[str], default: str) -> list[str]:
    """The argv that starts the run's Python, for its hook runner: what comes before
    ``-m prefect.engine`` (``/venv/bin/python``, ``python -X dev``, ``uv run python``).
    For any other command (a shell, a script) ``default``: the ``python`` setting, else the
    worker's own interpreter (Prefect 3.9.1 runs a custom command's hooks in its worker)."""
    for i in range(1, len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] in ENGINE_MODULES:
            return argv[:i]
    return [default]
