"""The conversation with a Prefect server: httpx on trio, Prefect's headers and auth, CSRF,
retries within one deadline per call, and the judging of each answer (``answers.py``).

Every call has a total deadline (:data:`CALL_DEADLINE`, retries included), below systemd's
``WatchdogSec``: a server that accepts and never answers costs a loop 45 s, not a restart.
"""

from __future__ import annotations

import base64
import contextlib
import random
import ssl
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Final, Self, TypeVar

import attrs
import httpx
import structlog
import trio

from worker.host.settings import Settings
from worker.prefect.answers import (
    ROUTE_HINT,
    ApiNoAnswer,
    ApiNotFound,
    ApiRefused,
    ApiUnavailable,
    decode,
    describe,
    detail_of,
    endpoint,
    excerpt,
    is_html,
    unexpected_answer,
)
from worker.rules.models import ProtocolError
from worker.rules.retry import RetryPolicy

PREFECT_VERSION: Final = "3.9.1"
API_VERSION: Final = "0.8.4"
USER_AGENT: Final = f"prefect/{PREFECT_VERSION} (API {API_VERSION})"
PROBE_TIMEOUT: Final = 2.0
_MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CALL_DEADLINE: Final = 45.0
"""Seconds one API call may take in all, retries included (``api_request_timeout``, the
per-request timeout, is capped to it): below systemd's ``WatchdogSec=60`` in the unit, so
no single call can outlast the watchdog, with room for the loop's own work."""
T = TypeVar("T")

log = structlog.get_logger("flow_worker.api")


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


@attrs.define
class Session:
    """The conversation with one server: Prefect's headers and auth, CSRF, retries, the
    call deadline, and the judging of answers. :class:`~worker.prefect.api.PrefectClient`
    adds the typed calls; one per worker process (never per run): its connections are pooled."""

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
    def from_settings(cls, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> Self:
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
            raise ApiRefused("GET", "/csrf-token", response.status_code, detail_of(response))
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
        self,
        method: str,
        path: str,
        deadline: float | None = None,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request with retries of what is safe to retry (see ``retry.py``), all
        within ``deadline`` (trio time; default: :attr:`deadline` from now). A retry that
        could not happen before the deadline is not waited for: the failure is raised."""
        if deadline is None:
            deadline = trio.current_time() + self.deadline
        policy = self.retry if retry is None else retry
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
                        raise ApiUnavailable(method, "/" + path, response.status_code, detail_of(response))
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
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        """A request whose non-2xx answer is raised as the matching :class:`ApiError`, and
        whose answer is raised as a :class:`ProtocolError` if it is not the API's (a web
        page, a redirect). The whole call, CSRF token and retries included, is bounded by
        :attr:`deadline`."""
        deadline = trio.current_time() + self.deadline
        with self._within(deadline, method, path):
            for attempt in range(2):
                headers = self.csrf if method in _MUTATING and self.csrf else None
                response = await self._send(
                    method, path, deadline, retry, json=json, params=params, headers=headers
                )
                if attempt == 0 and response.status_code == 403 and "csrf" in detail_of(response).lower():
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
        detail = detail_of(response)
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
