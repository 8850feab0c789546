"""The Prefect REST client: httpx on trio, Prefect's headers and auth, CSRF, retries, typed calls.

Every call here is one of the REST calls in PROTOCOL.md §2, with the same body a
Prefect 3.9.1 worker sends. Errors say whose fault they are:

* :class:`ApiUnavailable`: the server or the network (connection refused, timeouts,
  5xx, 429 after the retries ran out). Callers back off and try again later.
* :class:`ApiRefused`: the server understood and said no (4xx): a wrong key, a
  missing object, a bad name. :class:`ApiNotFound` is the 404 case.
* :class:`~worker.models.ProtocolError`: a 2xx whose body is not what the API documents.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import random
import ssl
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import attrs
import httpx
import structlog
import trio

from worker import templating
from worker.decisions import parse_time
from worker.models import (
    Deployment,
    Flow,
    FlowRun,
    OrchestrationResult,
    ProtocolError,
    State,
    StateType,
    WorkerRecord,
    WorkPool,
    structure,
)
from worker.retry import RetryPolicy
from worker.settings import Settings

PREFECT_VERSION: Final = "3.9.1"
API_VERSION: Final = "0.8.4"
USER_AGENT: Final = f"prefect/{PREFECT_VERSION} (API {API_VERSION})"
PROBE_TIMEOUT: Final = 2.0
PAGE: Final = 200
"""Rows asked per page of a filter (the server's default cap, PREFECT_API_DEFAULT_LIMIT)."""
_MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

log = structlog.get_logger("flow_worker.api")


class ApiError(Exception):
    def __init__(self, method: str, path: str, status: int | None, detail: str) -> None:
        self.method, self.path, self.status, self.detail = method, path, status, detail
        code = f" {status}" if status is not None else ""
        super().__init__(f"{method} {path}{code}: {detail}")


class ApiUnavailable(ApiError):
    """Not our fault: the API could not be reached or is overloaded; try again later."""


class ApiRefused(ApiError):
    """The API refused the request (4xx): a configuration or a programming error."""


class ApiNotFound(ApiRefused):
    """404: the object does not exist (any more)."""


def tls_context(settings: Settings) -> ssl.SSLContext:
    """How the API's certificate is checked, for REST and the events websocket alike:
    against ``api_ssl_cert_file`` if set, else the system's trust store (so a private CA
    installed on the host works, unlike httpx's bundled one); not at all with
    ``api_tls_insecure_skip_verify``."""
    context = ssl.create_default_context(cafile=settings.api_ssl_cert_file)
    if settings.api_tls_insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe(exc: BaseException) -> str:
    """A transport error with its root cause: httpx on trio often says only "ConnectError"
    while the cause (a refused certificate, a refused connection) is in the chain."""
    text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    cause, seen = exc.__cause__ or exc.__context__, 0
    while cause is not None and seen < 8:
        if str(cause) and str(cause) not in text:
            text += f" ({type(cause).__name__}: {cause})"
            break
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return text


def is_certificate_error(exc: BaseException) -> bool:
    """Whether a failure is the API's certificate being refused (a configuration problem)."""
    return "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc, ssl.SSLCertVerificationError)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("exception_message") or body)[:500]
    return str(body)[:500]


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
class PrefectClient:
    """One client per worker process (never per run): its connections are pooled."""

    settings: Settings
    http: httpx.AsyncClient
    retry: RetryPolicy = attrs.Factory(RetryPolicy)
    rng: random.Random = attrs.Factory(random.Random)
    csrf: dict[str, str] | None = None
    requests_sent: int = 0
    fail_fast: Callable[[], bool] = lambda: False
    """True while the API is known to be unreachable: a call that cannot connect then fails
    at once instead of retrying, so its loop waits in a pause the probe can end."""

    @classmethod
    def from_settings(
        cls, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> PrefectClient:
        headers = {
            "User-Agent": USER_AGENT,
            "X-PREFECT-API-VERSION": API_VERSION,
            "X-Prefect-Worker-Name": settings.worker_name,
        }
        if settings.api_auth_string:
            token = base64.b64encode(settings.api_auth_string.encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        elif settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        assert settings.api_url, "settings.validated() checks this"
        headers.update(settings.custom_headers())
        http = httpx.AsyncClient(
            base_url=settings.api_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(settings.api_request_timeout),
            transport=transport,
            verify=tls_context(settings),
        )
        return cls(settings, http)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.http.aclose()

    # ---------------------------------------------------------------- transport

    async def _fetch_csrf_token(self) -> None:
        """Get a CSRF token (only once a server has asked for one: most servers do not)."""
        client_id = str(uuid.uuid4())
        response = await self._send("GET", "csrf-token", params={"client": client_id})
        if response.status_code != 200:
            raise ApiRefused("GET", "/csrf-token", response.status_code, _detail(response))
        token = response.json()["token"]
        self.csrf = {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client_id}

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with retries of what is safe to retry (see ``retry.py``)."""
        policy = self.retry
        while True:
            try:
                self.requests_sent += 1
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if policy.exhausted or self.fail_fast():
                    raise ApiUnavailable(method, "/" + path, None, describe(exc)) from None
                delay = policy.transport_delay(rng=self.rng)
                log.debug(
                    "api.retry",
                    method=method,
                    path=path,
                    error=type(exc).__name__,
                    delay=round(delay, 2),
                )
            else:
                if not policy.is_retryable_status(response.status_code):
                    return response
                if policy.exhausted:
                    raise ApiUnavailable(method, "/" + path, response.status_code, _detail(response))
                delay = policy.delay(response.headers.get("Retry-After"), rng=self.rng)
                log.debug(
                    "api.retry",
                    method=method,
                    path=path,
                    status=response.status_code,
                    delay=round(delay, 2),
                )
            policy = policy.increment()
            await trio.sleep(delay)

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        """A request whose non-2xx answer is raised as the matching :class:`ApiError`."""
        for attempt in range(2):
            headers = self.csrf if method in _MUTATING and self.csrf else None
            response = await self._send(method, path, json=json, params=params, headers=headers)
            if attempt == 0 and response.status_code == 403 and "csrf" in _detail(response).lower():
                await self._fetch_csrf_token()  # missing, expired or rotated: get one, once
                continue
            break
        if response.is_success:
            return response
        detail = _detail(response)
        if response.status_code == 404:
            raise ApiNotFound(method, "/" + path, 404, detail)
        if response.status_code >= 500:
            raise ApiUnavailable(method, "/" + path, response.status_code, detail)
        raise ApiRefused(method, "/" + path, response.status_code, detail)

    async def probe(self) -> bool:
        """Whether the server answers ``GET /health`` now: one try, a short timeout, no
        retries. Used only while the API is unreachable, to notice its return at once."""
        try:
            self.requests_sent += 1
            response = await self.http.get("health", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError:
            return False
        return response.is_success

    async def _get_optional(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """The JSON body of a GET, or None if the object does not exist (404)."""
        try:
            return (await self.request("GET", path, params=params)).json()
        except ApiNotFound:
            return None

    # ---------------------------------------------------------------- work pools

    async def read_work_pool(self, pool: str) -> WorkPool | None:
        data = await self._get_optional(f"work_pools/{pool}")
        return None if data is None else structure(data, WorkPool)

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
        return structure(response.json(), WorkPool)

    async def set_base_job_template(self, pool: str, template: dict[str, Any]) -> None:
        await self.request("PATCH", f"work_pools/{pool}", json={"base_job_template": template})

    async def send_heartbeat(self, pool: str, worker_name: str, interval: float) -> None:
        await self.request(
            "POST",
            f"work_pools/{pool}/workers/heartbeat",
            json={"name": worker_name, "heartbeat_interval_seconds": int(interval)},
        )

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
        rows = response.json()
        if not isinstance(rows, list):
            raise ProtocolError(f"get_scheduled_flow_runs answered {type(rows).__name__}, not a list")
        runs: list[FlowRun] = []
        problems: list[tuple[str | None, str]] = []
        for row in rows:
            payload = row.get("flow_run") if isinstance(row, dict) else None
            try:
                runs.append(structure(payload, FlowRun))
            except ProtocolError as exc:
                run_id = payload.get("id") if isinstance(payload, dict) else None
                problems.append((str(run_id) if run_id else None, str(exc)))
        return runs, problems

    # ---------------------------------------------------------------- reads

    async def read_deployment(self, deployment_id: str) -> Deployment | None:
        data = await self._get_optional(f"deployments/{deployment_id}")
        return None if data is None else structure(data, Deployment)

    async def read_flow(self, flow_id: str) -> Flow:
        return structure((await self.request("GET", f"flows/{flow_id}")).json(), Flow)

    async def read_flow_run(self, run_id: str) -> FlowRun | None:
        data = await self._get_optional(f"flow_runs/{run_id}")
        return None if data is None else structure(data, FlowRun)

    async def read_flow_run_states(self, run_id: str) -> list[State]:
        """The run's state history, oldest first (the server orders by timestamp)."""
        response = await self.request("GET", "flow_run_states/", params={"flow_run_id": run_id})
        return [structure(row, State) for row in response.json()]

    async def filter_flow_runs(
        self, ids: Iterable[str], state_types: Iterable[StateType] | None = None
    ) -> list[FlowRun]:
        flow_runs: dict[str, Any] = {"id": {"any_": list(ids)}}
        if state_types is not None:
            flow_runs["state"] = {"type": {"any_": [t.value for t in state_types]}}
        body = {"flow_runs": flow_runs, "limit": None, "offset": 0}
        response = await self.request("POST", "flow_runs/filter", json=body)
        return [structure(row, FlowRun) for row in response.json()]

    async def read_workers(self, pool: str) -> tuple[list[WorkerRecord], datetime.datetime]:
        """The pool's workers with their last heartbeats, and the server's clock, so
        heartbeat ages never depend on clock skew between hosts: its ``Date`` header (whole
        seconds, rounded down), or the newest heartbeat it recorded if that is later."""
        response = await self.request("POST", f"work_pools/{pool}/workers/filter", json={})
        workers = [structure(row, WorkerRecord) for row in response.json()]
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
            rows = (await self.request("POST", "flow_runs/filter", json=body)).json()
            out.extend(structure(row, FlowRun) for row in rows)
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
            result = structure(response.json(), OrchestrationResult)
            if result.status.value != "WAIT":
                return result
            delay = float(result.details.get("delay_seconds") or 1.0)
            await trio.sleep(min(max(delay, 0.1), 30.0))
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
        await self.request("PATCH", f"flow_runs/{run_id}", json={"infrastructure_pid": str(pid)})

    async def update_labels(self, run_id: str, labels: dict[str, str]) -> None:
        await self.request("PATCH", f"flow_runs/{run_id}/labels", json=labels)

    # ---------------------------------------------------------------- template resolution

    async def read_block_document_by_name(self, slug: str, name: str) -> dict[str, Any] | None:
        doc = await self._get_optional(
            f"block_types/slug/{slug}/block_documents/name/{name}", {"include_secrets": "true"}
        )
        return _block_data(doc)

    async def read_block_document_by_id(self, block_id: str) -> dict[str, Any] | None:
        return _block_data(
            await self._get_optional(f"block_documents/{block_id}", {"include_secrets": "true"})
        )

    async def read_variable_value(self, name: str) -> Any:
        variable = await self._get_optional(f"variables/name/{name}")
        return templating.MISSING if variable is None else variable.get("value")


def _block_data(doc: Any) -> dict[str, Any] | None:
    """A block document's ``data`` (None: no such block)."""
    if doc is None:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    return data if isinstance(data, dict) else {}
