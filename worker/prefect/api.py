"""The Prefect REST client's typed calls: one method per REST call of PROTOCOL.md §2, with the
same body a Prefect 3.9.1 worker sends, its answer read into the API's objects.

The conversation itself (headers, auth, CSRF, retries, the call deadline) is
``session.Session``; whose fault an error is, and how every answer is decoded, is
``answers.py``.
"""

from __future__ import annotations

import datetime
import email.utils
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeVar

import attrs
import structlog
import trio

from worker.prefect.answers import (
    ApiRefused,
    block_data,
    read_rows,
    scheduled_rows,
    variable_value,
)
from worker.prefect.session import Session
from worker.rules import templating
from worker.rules.decisions import parse_time
from worker.rules.models import (
    Deployment,
    Flow,
    FlowRun,
    OrchestrationResult,
    State,
    StateType,
    WorkerRecord,
    WorkPool,
    structure,
)

PAGE: Final = 200
"""Rows asked per page of a filter (the server's default cap, PREFECT_API_DEFAULT_LIMIT)."""
T = TypeVar("T")

log = structlog.get_logger("flow_worker.api")


def _state_body(
    state_type: StateType,
    name: str,
    run_id: str,
    message: str | None,
    force: bool,
    state_details: dict[str, Any] | None,
    transition_id: str,
    data: Any = None,
) -> dict[str, Any]:
    details = {**(state_details or {}), "flow_run_id": run_id, "transition_id": transition_id}
    return {
        "state": {
            "type": state_type.value,
            "name": name,
            "message": message,
            "state_details": details,
            "data": data,
        },
        "force": force,
    }


@attrs.define
class PrefectClient(Session):
    """The typed REST calls of PROTOCOL.md §2 (the conversation itself: :class:`Session`)."""

    # ---------------------------------------------------------------- work pools

    async def read_work_pool(self, pool: str) -> WorkPool | None:
        return await self._get_optional(f"work_pools/{pool}", lambda body: structure(body, WorkPool))

    async def create_work_pool(self, pool: str, template: dict[str, Any] | None = None) -> WorkPool:
        """Create a process pool (bare, as Prefect's worker does, unless a template is given);
        409 means it exists now."""
        body: dict[str, Any] = {"name": pool, "type": "process"}
        if template is not None:
            body["base_job_template"] = template
        try:
            response = await self.request("POST", "work_pools/", json=body)
        except ApiRefused as exc:
            if exc.status != 409:
                raise
            found = await self.read_work_pool(pool)
            if found is None:
                raise
            return found
        return _got(self._read(response, lambda body: structure(body, WorkPool)))

    async def set_base_job_template(self, pool: str, template: dict[str, Any]) -> None:
        self._read(await self.request("PATCH", f"work_pools/{pool}", json={"base_job_template": template}))

    async def send_heartbeat(self, pool: str, worker_name: str, interval: float) -> None:
        response = await self.request(
            "POST",
            f"work_pools/{pool}/workers/heartbeat",
            json={"name": worker_name, "heartbeat_interval_seconds": int(interval)},
        )
        self._read(response)

    async def get_scheduled_flow_runs(
        self, pool: str, queues: Sequence[str], scheduled_before: datetime.datetime
    ) -> tuple[list[FlowRun], list[tuple[str | None, str]]]:
        """The due runs, and (run id, problem) for each row that could not be read: one
        bad row costs that run, not the whole poll."""
        response = await self.request(
            "POST",
            f"work_pools/{pool}/get_scheduled_flow_runs",
            json={"work_queue_names": list(queues), "scheduled_before": str(scheduled_before)},
        )
        return _got(self._read(response, scheduled_rows))

    # ---------------------------------------------------------------- reads

    async def read_deployment(self, deployment_id: str) -> Deployment | None:
        return await self._get_optional(
            f"deployments/{deployment_id}", lambda body: structure(body, Deployment)
        )

    async def read_flow(self, flow_id: str) -> Flow:
        response = await self.request("GET", f"flows/{flow_id}")
        return _got(self._read(response, lambda body: structure(body, Flow)))

    async def read_flow_run(self, run_id: str) -> FlowRun | None:
        return await self._get_optional(f"flow_runs/{run_id}", lambda body: structure(body, FlowRun))

    async def read_flow_run_states(self, run_id: str) -> list[State]:
        """The run's state history, oldest first (the server orders by timestamp)."""
        response = await self.request("GET", "flow_run_states/", params={"flow_run_id": run_id})
        return _got(self._read(response, lambda body: read_rows(body, State)))

    async def filter_flow_runs(
        self, ids: Iterable[str], state_types: Iterable[StateType] | None = None
    ) -> list[FlowRun]:
        flow_runs: dict[str, Any] = {"id": {"any_": list(ids)}}
        if state_types is not None:
            flow_runs["state"] = {"type": {"any_": [t.value for t in state_types]}}
        body = {"flow_runs": flow_runs, "limit": None, "offset": 0}
        response = await self.request("POST", "flow_runs/filter", json=body)
        return _got(self._read(response, lambda body: read_rows(body, FlowRun)))

    async def read_workers(self, pool: str) -> tuple[list[WorkerRecord], datetime.datetime]:
        """The pool's workers with their last heartbeats, and the server's clock, so
        heartbeat ages never depend on clock skew between hosts: its ``Date`` header (whole
        seconds, rounded down), or the newest heartbeat it recorded if that is later."""
        response = await self.request("POST", f"work_pools/{pool}/workers/filter", json={})
        workers = _got(self._read(response, lambda body: read_rows(body, WorkerRecord)))
        try:  # (a proxy may add a Date of its own: "date1, date2" is not a date)
            now = email.utils.parsedate_to_datetime(response.headers["date"])
        except (KeyError, TypeError, ValueError, IndexError):
            now = datetime.datetime.now(datetime.UTC)
        if now.tzinfo is None:  # "-0000": UTC, says RFC 2822
            now = now.replace(tzinfo=datetime.UTC)
        beats = [parse_time(w.last_heartbeat_time) for w in workers]
        return workers, max([now, *(b for b in beats if b is not None)])

    async def pool_flow_runs(self, pool: str, state_types: Iterable[StateType]) -> list[FlowRun]:
        """Every run of ``pool`` in one of ``state_types`` (paged: the server caps a page)."""
        out: list[FlowRun] = []
        while True:
            body = {
                "work_pools": {"name": {"any_": [pool]}},
                "flow_runs": {"state": {"type": {"any_": [t.value for t in state_types]}}},
                "sort": "ID_DESC",
                "limit": PAGE,
                "offset": len(out),
            }
            response = await self.request("POST", "flow_runs/filter", json=body)
            rows = _got(self._read(response, lambda body: read_rows(body, FlowRun)))
            out.extend(rows)
            if len(rows) < PAGE:
                return out

    # ---------------------------------------------------------------- writes

    async def set_flow_run_state(
        self,
        run_id: str,
        state_type: StateType,
        name: str,
        message: str | None = None,
        *,
        force: bool = False,
        state_details: dict[str, Any] | None = None,
        transition_id: str | None = None,
        data: Any = None,
    ) -> OrchestrationResult:
        """Propose a state. The ``transition_id`` is fixed across retries, so a proposal
        replayed after a lost answer is recognisable (``decisions.claim_outcome``)."""
        body = _state_body(
            state_type,
            name,
            run_id,
            message,
            force,
            state_details,
            transition_id or str(uuid.uuid4()),
            data,
        )
        for _ in range(10):
            response = await self.request("POST", f"flow_runs/{run_id}/set_state", json=body)
            result = _got(self._read(response, lambda body: structure(body, OrchestrationResult)))
            if result.status.value != "WAIT":
                return result
            await trio.sleep(_wait_seconds(result.details.get("delay_seconds")))
        return result

    async def restore_state(self, run_id: str, state: State) -> OrchestrationResult:
        """Put ``state`` back (forced, with its details and data): undoes a transition
        made on a stale read (``decisions.displaced_state``)."""
        return await self.set_flow_run_state(
            run_id,
            state.type,
            state.name or state.type.value.title(),
            state.message,
            force=True,
            state_details=state.state_details,
            data=state.data,
        )

    async def set_infrastructure_pid(self, run_id: str, pid: int) -> None:
        self._read(await self.request("PATCH", f"flow_runs/{run_id}", json={"infrastructure_pid": str(pid)}))

    async def update_labels(self, run_id: str, labels: dict[str, str], essential: bool = False) -> None:
        """For the UI and the peers' reclaim (``labels.Labeller`` tries again until set):
        not essential but for an ended run's, so held back while the server is busy
        (``throttle.py``)."""
        path = f"flow_runs/{run_id}/labels"
        self._read(await self.request("PATCH", path, json=labels, essential=essential))

    # ---------------------------------------------------------------- template resolution

    async def read_block_document_by_name(self, slug: str, name: str) -> dict[str, Any] | None:
        return await self._get_optional(
            f"block_types/slug/{slug}/block_documents/name/{name}", block_data, {"include_secrets": "true"}
        )

    async def read_block_document_by_id(self, block_id: str) -> dict[str, Any] | None:
        return await self._get_optional(
            f"block_documents/{block_id}", block_data, {"include_secrets": "true"}
        )

    async def read_variable_value(self, name: str) -> Any:
        found = await self._get_optional(f"variables/name/{name}", variable_value)
        return templating.MISSING if found is None else found[0]


def _got(value: T | None) -> T:
    """What :meth:`PrefectClient._read` read (never None when it was given a reader)."""
    assert value is not None
    return value


def _wait_seconds(delay: Any) -> float:
    """How long a WAIT answer asks to wait, within 0.1-30 s (1 s if it does not say)."""
    try:
        seconds = float(delay or 1.0)
    except (TypeError, ValueError):
        seconds = 1.0
    return min(max(seconds, 0.1), 30.0) if seconds == seconds else 1.0  # (NaN: 1 s)
