"""The API objects the worker reads, as attrs classes, and the one cattrs converter.

Only the fields the worker uses are declared; the converter ignores the rest, so a
newer server that adds fields does not break the worker. Ids and timestamps stay
strings: the worker compares and forwards them, it never does arithmetic on them.

Read defensively, by what every Prefect 3 server sends (3.0 to 3.9):

* ``null`` for a field that has a default means the default (``tags: null``,
  ``state_details: null``, ``base_job_template: null`` …), never a failed read.
* A flow run's state is read from ``state`` when the server fills it, else from the
  top-level ``state_type`` / ``state_name`` that every Prefect 3 server sends: servers
  before 3.9.1 answer ``get_scheduled_flow_runs`` with ``"state": null``.
* A state type this worker does not know (a newer server's) is kept by name in
  ``FlowRun.unknown_state`` and the run has no ``state``: it is never started, and the
  caller says why.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import attrs
import cattrs


class StateType(enum.StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})


@attrs.frozen
class State:
    type: StateType
    id: str | None = None
    name: str | None = None
    message: str | None = None
    timestamp: str | None = None
    state_details: dict[str, Any] = attrs.Factory(dict)
    data: Any = None


@attrs.frozen
class FlowRun:
    id: str
    name: str = ""
    flow_id: str | None = None
    deployment_id: str | None = None
    state: State | None = None
    job_variables: dict[str, Any] | None = None
    parameters: dict[str, Any] = attrs.Factory(dict)
    infrastructure_pid: str | None = None
    work_pool_name: str | None = None
    work_queue_name: str | None = None
    next_scheduled_start_time: str | None = None
    tags: list[str] = attrs.Factory(list)
    labels: dict[str, Any] = attrs.Factory(dict)
    """Since Prefect 3.1; ``prefect.worker.name`` says which worker claimed it."""
    unknown_state: str | None = None
    """The state type the server sent when it is not one this worker knows."""

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state is not None else None


@attrs.frozen
class Deployment:
    id: str
    name: str
    flow_id: str | None = None
    job_variables: dict[str, Any] | None = None
    entrypoint: str | None = None
    path: str | None = None
    updated: str | None = None
    pull_steps: list[Any] | None = None


@attrs.frozen
class Flow:
    id: str
    name: str


@attrs.frozen
class WorkPool:
    id: str
    name: str
    type: str = "process"
    base_job_template: dict[str, Any] = attrs.Factory(dict)
    is_paused: bool = False
    status: str | None = None
    concurrency_limit: int | None = None


@attrs.frozen
class WorkerRecord:
    """A worker of a pool as the server recorded its heartbeats."""

    name: str
    last_heartbeat_time: str | None = None
    heartbeat_interval_seconds: float | None = None


class SetStateStatus(enum.StrEnum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


@attrs.frozen
class OrchestrationResult:
    status: SetStateStatus
    state: State | None = None
    details: dict[str, Any] = attrs.Factory(dict)

    @property
    def reason(self) -> str:
        return str(self.details.get("reason") or "")


converter = cattrs.Converter(forbid_extra_keys=False)
T = TypeVar("T")
_STATE_TYPES: frozenset[str] = frozenset(t.value for t in StateType)


def _without_nulls(data: Any, cls: type) -> Any:
    """``data`` without the ``null`` values of fields that have a default."""
    if not isinstance(data, dict) or not attrs.has(cls):
        return data
    defaulted = {f.name for f in attrs.fields(cls) if f.default is not attrs.NOTHING}
    return {k: v for k, v in data.items() if v is not None or k not in defaulted}


def _flow_run_payload(data: Any) -> Any:
    """A flow run's payload with its state taken from wherever this server put it."""
    if not isinstance(data, dict):
        return data
    data = _without_nulls(data, FlowRun)
    state = data.get("state")
    if not isinstance(state, dict) or state.get("type") is None:
        state_type = data.get("state_type")
        state = {"type": state_type, "name": data.get("state_name")} if state_type else None
    if state is not None and str(state.get("type")) not in _STATE_TYPES:
        return {**data, "state": None, "unknown_state": str(state.get("type"))}
    return {**data, "state": state}


def structure(data: Any, cls: type[T]) -> T:
    """Build an API object from a JSON payload; raises :class:`ProtocolError` if it does
    not fit (the server's fault, or a version we do not speak): anything that is not a
    JSON object, a missing field, a value of the wrong type."""
    if attrs.has(cls) and not isinstance(data, dict):
        raise ProtocolError(
            f"unexpected {cls.__name__} payload from the API: {type(data).__name__}, not an object"
        )
    try:
        if cls is FlowRun:
            data = _flow_run_payload(data)
        return converter.structure(_without_nulls(data, cls), cls)
    except (
        cattrs.BaseValidationError,
        ValueError,
        TypeError,
        LookupError,
        AttributeError,
        RecursionError,
    ) as exc:
        raise ProtocolError(f"unexpected {cls.__name__} payload from the API: {exc!r}"[:500]) from None


converter.register_structure_hook(
    State, lambda data, cls: converter.structure_attrs_fromdict(_without_nulls(data, State), State)
)


class ProtocolError(RuntimeError):
    """The server's answer does not have the shape Prefect 3.9's API documents.

    ``hint`` says what a user can do about it (an HTML page: the UI's address?);
    ``endpoint`` names where it came from, ids left out (``api.endpoint``): the outage
    says an episode of strange answers once per endpoint."""

    def __init__(self, message: str, *, hint: str | None = None, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.endpoint = endpoint
