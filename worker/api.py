"""The Prefect REST client: httpx on trio, Prefect's headers and auth, CSRF, retries, typed calls.

Every call here is one of the REST calls in PROTOCOL.md §2, with the same body a
Prefect 3.9.1 worker sends. Errors say whose fault they are:

* :class:`ApiUnavailable`: the server or the network (connection refused, timeouts,
  5xx, 429 after the retries ran out). Callers back off and try again later.
* :class:`ApiRefused`: the server understood and said no (4xx): a wrong key, a
  missing object, a bad name. :class:`ApiNotFound` is the 404 case.
* :class:`~worker.models.ProtocolError`: an answer that is not the API's: a 2xx whose body
  is not JSON of the documented shape, an HTML page, a redirect. Every answer is read
  through :func:`decode` and :meth:`PrefectClient._read`: its shape is data, never a code
  path, so a ``KeyError`` or ``JSONDecodeError`` never escapes from here. The error says
  what came back and from where, with a hint when it is a web page.

Every call has a total deadline (:data:`CALL_DEADLINE`, retries included), below systemd's
``WatchdogSec``: a server that accepts and never answers costs a loop 45 s, not a restart.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import random
import re
import ssl
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, TypeVar

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
CALL_DEADLINE: Final = 45.0
"""Seconds one API call may take in all, retries included (``api_request_timeout``, the
per-request timeout, is capped to it): below systemd's ``WatchdogSec=60`` in the unit, so
no single call can outlast the watchdog, with room for the loop's own work."""
EXCERPT: Final = 120
"""Characters of a strange answer quoted in its error."""
HTML_HINT: Final = (
    "the API answered a web page: is PREFECT_API_URL the UI's address? the API is under /api "
    "(e.g. http://host:4200/api); a login page or a proxy in the way answers HTML too"
)
ROUTE_HINT: Final = (
    "the server has no such route: is PREFECT_API_URL the UI's address? the API is under /api "
    "(e.g. http://host:4200/api)"
)
"""For a 404 that names no object (Prefect's own say which object is missing) from an
address without ``/api``: Prefect 3.9's UI answers an API client so at every other path."""
REDIRECT_HINT: Final = (
    "the API never redirects: check PREFECT_API_URL (https rather than http? the /api suffix?); "
    "a login page or a proxy in the way redirects too"
)
T = TypeVar("T")

log = structlog.get_logger("flow_worker.api")


class ApiError(Exception):
    def __init__(
        self, method: str, path: str, status: int | None, detail: str, *, hint: str | None = None
    ) -> None:
        self.method, self.path, self.status, self.detail = method, path, status, detail
        self.hint = hint
        """What a user can do about it, when the answer says (a wrong ``PREFECT_API_URL``)."""
        code = f" {status}" if status is not None else ""
        super().__init__(f"{method} {path}{code}: {detail}")


class ApiUnavailable(ApiError):
    """Not our fault: the API could not be reached or is overloaded; try again later."""


class ApiRefused(ApiError):
    """The API refused the request (4xx): a configuration or a programming error."""


class ApiNotFound(ApiRefused):
    """404: the object does not exist (any more)."""


class ApiNoAnswer(ApiUnavailable):
    """No answer within :data:`CALL_DEADLINE`: the server accepted the request and hung.

    Its ``status`` is None, as for a server that cannot be reached at all, and on purpose:
    the loops then wait in a pause that the ``GET /health`` probe ends (``outage.py``)
    instead of backing off for up to a minute. A hung server and a black-holed network
    look the same from here (a timeout), the probe costs a hung server one tiny request
    at a time, and it notices the moment the server answers again; backoff exists for a
    server that answers "not now" (429/503), which a hung one does not."""


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
    except (ValueError, RecursionError):
        return excerpt(response.content, 200) or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("exception_message") or body)[:500]
    return str(body)[:500]


# ---------------------------------------------------------------- answers are data


_ID_SEGMENT: Final = re.compile(
    r"/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?=/|$)"
)


_SECRET_PATHS: Final = re.compile(r"/(block_documents|block_types|variables|csrf-token)(/|$)")
"""Endpoints whose answers may carry secrets: never quoted in a message."""


def excerpt(body: bytes, limit: int = EXCERPT) -> str:
    """A short, printable, one-line quote of a body (for a log line, never the whole page)."""
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_html(response: httpx.Response) -> bool:
    """Whether an answer is a web page (Prefect's API never answers one)."""
    content_type = response.headers.get("content-type", "").lower()
    return "text/html" in content_type or response.content.lstrip()[:1] == b"<"


def _request_of(response: httpx.Response) -> tuple[str, str]:
    try:
        return response.request.method, response.request.url.path
    except RuntimeError:  # a response built by hand, without its request
        return "?", "?"


def endpoint(response: httpx.Response) -> str:
    """The endpoint an answer came from, ids left out ("POST /api/flow_runs/{id}/set_state"):
    what the outage's episodes of strange answers are counted by."""
    method, path = _request_of(response)
    return f"{method} {_ID_SEGMENT.sub('/{id}', path)}"


def unexpected_answer(response: httpx.Response, what: str) -> ProtocolError:
    """A :class:`ProtocolError` that says what came back and from where."""
    method, path = _request_of(response)
    content_type = response.headers.get("content-type") or "no content-type"
    quoted = excerpt(response.content)
    body = repr(quoted) if quoted else "an empty body"
    if quoted and _SECRET_PATHS.search(path):  # a block's or variable's value, a CSRF token
        body = f"a body of {len(response.content)} bytes (not quoted: it may hold a secret)"
    hint = None
    if is_html(response):
        hint = HTML_HINT
    elif response.is_redirect:
        hint = REDIRECT_HINT
    return ProtocolError(
        f"{method} {path} answered {response.status_code} ({content_type}) {what}: {body}",
        hint=hint,
        endpoint=endpoint(response),
    )


def decode(response: httpx.Response, expect: type | None = None) -> Any:
    """The JSON body of an answer (of type ``expect`` if given), or :class:`ProtocolError`."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), too deep
        raise unexpected_answer(response, "which is not JSON") from None
    if expect is not None and not isinstance(body, expect):
        raise unexpected_answer(response, f"with a JSON {_json_type(body)}, not {_JSON_TYPES[expect]}")
    return body


_JSON_TYPES: Final[dict[type, str]] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    type(None): "null",
    int: "number",
    float: "number",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _rows(body: Any, cls: type[T]) -> list[T]:
    """A JSON array of API objects."""
    if not isinstance(body, list):
        raise ProtocolError(f"a JSON {_json_type(body)}, not an array of {cls.__name__}")
    return [structure(row, cls) for row in body]


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
    answered: Callable[[str], None] = lambda endpoint: None
    """Called with an :func:`endpoint` each time it gave an answer of the expected shape:
    an episode of strange answers from it ends there (``Outage.answered``)."""
    deadline: float = CALL_DEADLINE
    """Seconds one call may take in all, retries included (see :data:`CALL_DEADLINE`)."""

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
            timeout=httpx.Timeout(min(settings.api_request_timeout, CALL_DEADLINE)),
            transport=transport,
            verify=tls_context(settings),
        )
        return cls(settings, http)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.http.aclose()

    # ---------------------------------------------------------------- transport

    async def _fetch_csrf_token(self, deadline: float) -> None:
        """Get a CSRF token (only once a server has asked for one: most servers do not)."""
        client_id = str(uuid.uuid4())
        response = await self._send("GET", "csrf-token", deadline, params={"client": client_id})
        if response.status_code != 200:
            raise ApiRefused("GET", "/csrf-token", response.status_code, _detail(response))
        token = decode(response, dict).get("token")
        if not isinstance(token, str):
            raise unexpected_answer(response, "without a token")
        self.csrf = {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client_id}

    @contextlib.contextmanager
    def _within(self, deadline: float, method: str, path: str) -> Iterator[None]:
        """Raise :class:`ApiNoAnswer` if the block is still waiting at ``deadline`` (trio time)."""
        with trio.move_on_at(deadline) as scope:
            yield
        if scope.cancelled_caught:
            raise ApiNoAnswer(method, "/" + path, None, f"no answer within {self.deadline:g} s")

    async def _send(
        self, method: str, path: str, deadline: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One request with retries of what is safe to retry (see ``retry.py``), all
        within ``deadline`` (trio time; default: :attr:`deadline` from now). A retry that
        could not happen before the deadline is not waited for: the failure is raised."""
        if deadline is None:
            deadline = trio.current_time() + self.deadline
        policy = self.retry
        with self._within(deadline, method, path):
            while True:
                try:
                    self.requests_sent += 1
                    response = await self.http.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    delay = policy.transport_delay(rng=self.rng)
                    if policy.exhausted or self.fail_fast() or trio.current_time() + delay >= deadline:
                        raise ApiUnavailable(method, "/" + path, None, describe(exc)) from None
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
                    delay = policy.delay(response.headers.get("Retry-After"), rng=self.rng)
                    if policy.exhausted or trio.current_time() + delay >= deadline:
                        raise ApiUnavailable(method, "/" + path, response.status_code, _detail(response))
                    log.debug(
                        "api.retry",
                        method=method,
                        path=path,
                        status=response.status_code,
                        delay=round(delay, 2),
                    )
                policy = policy.increment()
                await trio.sleep(delay)
        raise AssertionError("unreachable")  # (for mypy: _within either returns or raises)

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        """A request whose non-2xx answer is raised as the matching :class:`ApiError`, and
        whose answer is raised as a :class:`ProtocolError` if it is not the API's (a web
        page, a redirect). The whole call, CSRF token and retries included, is bounded by
        :attr:`deadline`."""
        deadline = trio.current_time() + self.deadline
        with self._within(deadline, method, path):
            for attempt in range(2):
                headers = self.csrf if method in _MUTATING and self.csrf else None
                response = await self._send(method, path, deadline, json=json, params=params, headers=headers)
                if attempt == 0 and response.status_code == 403 and "csrf" in _detail(response).lower():
                    await self._fetch_csrf_token(deadline)  # missing, expired or rotated: get one, once
                    continue
                break
            return self._judge(response, method, path)
        raise AssertionError("unreachable")

    def _judge(self, response: httpx.Response, method: str, path: str) -> httpx.Response:
        """The answer if it is a 2xx from the API; else the matching error. Prefect's API
        always answers JSON (or nothing): a web page that is not a 5xx/429 (a proxy's error
        page, said as unavailable) or a 401/403 (said as refused) did not come from it, nor
        did a redirect."""
        status = response.status_code
        if response.is_success:
            if response.content and is_html(response):
                raise unexpected_answer(response, "with a web page, not JSON")
            return response
        if response.is_redirect:
            location = response.headers.get("location") or "nowhere"
            raise unexpected_answer(response, f"with a redirect to {excerpt(location.encode())}")
        if is_html(response) and status < 500 and status not in (401, 403, 408, 429):
            raise unexpected_answer(response, "with a web page")
        detail = _detail(response)
        if status == 404:
            route = detail == "Not Found" and "/api" not in self.http.base_url.path
            raise ApiNotFound(method, "/" + path, 404, detail, hint=ROUTE_HINT if route else None)
        if status >= 500:
            raise ApiUnavailable(method, "/" + path, status, detail)
        raise ApiRefused(method, "/" + path, status, detail)

    async def probe(self) -> bool:
        """Whether the server answers ``GET /health`` now: one try, a short timeout, no
        retries. Used only while the API is unreachable, to notice its return at once."""
        try:
            self.requests_sent += 1
            response = await self.http.get("health", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError:
            return False
        return response.is_success

    def _read(self, response: httpx.Response, read: Callable[[Any], T] | None = None) -> T | None:
        """What ``read`` makes of the answer's JSON (nothing is read if None); any answer it
        cannot read is a :class:`ProtocolError` naming it. Then the endpoint has answered
        as expected (:attr:`answered`)."""
        out = None
        if read is not None:
            body = decode(response)
            try:
                out = read(body)
            except (ProtocolError, LookupError, TypeError, ValueError, AttributeError, RecursionError) as exc:
                raise unexpected_answer(response, f"of an unexpected shape ({exc})") from None
        self.answered(endpoint(response))
        return out

    async def _get_optional(
        self, path: str, read: Callable[[Any], T], params: dict[str, Any] | None = None
    ) -> T | None:
        """What ``read`` makes of a GET's JSON body, or None if the object does not exist (404)."""
        try:
            response = await self.request("GET", path, params=params)
        except ApiNotFound:
            return None
        return self._read(response, read)

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
        return _got(self._read(response, _scheduled_rows))

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
        return _got(self._read(response, lambda body: _rows(body, State)))

    async def filter_flow_runs(
        self, ids: Iterable[str], state_types: Iterable[StateType] | None = None
    ) -> list[FlowRun]:
        flow_runs: dict[str, Any] = {"id": {"any_": list(ids)}}
        if state_types is not None:
            flow_runs["state"] = {"type": {"any_": [t.value for t in state_types]}}
        body = {"flow_runs": flow_runs, "limit": None, "offset": 0}
        response = await self.request("POST", "flow_runs/filter", json=body)
        return _got(self._read(response, lambda body: _rows(body, FlowRun)))

    async def read_workers(self, pool: str) -> tuple[list[WorkerRecord], datetime.datetime]:
        """The pool's workers with their last heartbeats, and the server's clock, so
        heartbeat ages never depend on clock skew between hosts: its ``Date`` header (whole
        seconds, rounded down), or the newest heartbeat it recorded if that is later."""
        response = await self.request("POST", f"work_pools/{pool}/workers/filter", json={})
        workers = _got(self._read(response, lambda body: _rows(body, WorkerRecord)))
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
            rows = _got(self._read(response, lambda body: _rows(body, FlowRun)))
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

    async def update_labels(self, run_id: str, labels: dict[str, str]) -> None:
        self._read(await self.request("PATCH", f"flow_runs/{run_id}/labels", json=labels))

    # ---------------------------------------------------------------- template resolution

    async def read_block_document_by_name(self, slug: str, name: str) -> dict[str, Any] | None:
        return await self._get_optional(
            f"block_types/slug/{slug}/block_documents/name/{name}", _block_data, {"include_secrets": "true"}
        )

    async def read_block_document_by_id(self, block_id: str) -> dict[str, Any] | None:
        return await self._get_optional(
            f"block_documents/{block_id}", _block_data, {"include_secrets": "true"}
        )

    async def read_variable_value(self, name: str) -> Any:
        found = await self._get_optional(f"variables/name/{name}", _variable_value)
        return templating.MISSING if found is None else found[0]


def _got(value: T | None) -> T:
    """What :meth:`PrefectClient._read` read (never None when it was given a reader)."""
    assert value is not None
    return value


def _scheduled_rows(body: Any) -> tuple[list[FlowRun], list[tuple[str | None, str]]]:
    """The due runs, and (run id, problem) for each row that could not be read."""
    if not isinstance(body, list):
        raise ProtocolError(f"a JSON {_json_type(body)}, not an array of runs")
    runs: list[FlowRun] = []
    problems: list[tuple[str | None, str]] = []
    for row in body:
        payload = row.get("flow_run") if isinstance(row, dict) else None
        try:
            runs.append(structure(payload, FlowRun))
        except ProtocolError as exc:
            run_id = payload.get("id") if isinstance(payload, dict) else None
            problems.append((run_id if isinstance(run_id, str) and run_id else None, str(exc)))
    return runs, problems


def _wait_seconds(delay: Any) -> float:
    """How long a WAIT answer asks to wait, within 0.1-30 s (1 s if it does not say)."""
    try:
        seconds = float(delay or 1.0)
    except (TypeError, ValueError):
        seconds = 1.0
    return min(max(seconds, 0.1), 30.0) if seconds == seconds else 1.0  # (NaN: 1 s)


def _variable_value(body: Any) -> tuple[Any]:
    """A variable's value (in a tuple: a variable may hold null)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"a JSON {_json_type(body)}, not a variable")
    return (body.get("value"),)


def _block_data(doc: Any) -> dict[str, Any]:
    """A block document's ``data``."""
    if not isinstance(doc, dict):
        raise ProtocolError(f"a JSON {_json_type(doc)}, not a block document")
    data = doc.get("data")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProtocolError(f"block data is a JSON {_json_type(data)}, not an object")
    return data
