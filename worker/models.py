"""The API objects the worker reads, as attrs classes, and the one cattrs converter.

Only the fields the worker uses are declared; the converter ignores the rest, so a
newer server that adds fields does not break the worker. Ids and timestamps stay
strings: the worker compares and forwards them, it never does arithmetic on them.
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


def structure(data: Any, cls: type[T]) -> T:
    """Build an API object from a JSON payload; raises :class:`ProtocolError` if it does
    not fit (the server's fault, or a version we do not speak)."""
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"unexpected {cls.__name__} payload from the API: {exc!r}") from None


class ProtocolError(RuntimeError):
    """The server's answer does not have the shape Prefect 3.9's API documents."""
