"""Event-driven pickup and cancellation: one websocket to the server's ``/api/events/out``.

Pool and queue events (``prefect.work-pool.ready``, ``prefect.work-queue.ready`` when one
is resumed, ``….updated``) also trigger a poll: runs held by a paused queue start the
moment it is resumed, not at the next interval.

What the 3.9.1 server sends (read in ``prefect/server/models/events.py`` and checked
against a live server by ``tests/test_e2e_events.py``): every flow-run state change is an
event named ``prefect.flow-run.<state name>`` (``Scheduled``, ``Late``, ``AwaitingRetry``,
``Cancelling``, ``Pending``, ``Running``, …) whose resource is
``prefect.flow-run.<id>`` with the label ``prefect.state-type`` (``SCHEDULED``,
``CANCELLING``, …), and whose related resources include ``prefect.work-pool.<pool id>``
(role ``work-pool``) when the run belongs to a pool. The payload carries no scheduled
time, so a SCHEDULED event triggers a poll, and the poll decides what is due.

Protocol: subprotocol ``prefect``; first frame ``{"type":"auth","token":…}``, answered by
``{"type":"auth_success"}``; then ``{"type":"filter","filter":…,"backfill":false}``; then
``{"type":"event","event":…}`` frames. A close with 1008 means the token was refused.

Frames are data, never code paths: :func:`classify` is total over any JSON (anything not
shaped like an event it knows is None), and a frame that is not JSON is skipped (said
once, at INFO), so no frame can end the stream, let alone the worker.

A CANCELLING event is a hint, never an order (any API client can emit one): the run is
read first (:class:`CancelCheck`), and stopped only if the server says it is CANCELLING.

Policy: the socket only ever makes the worker *faster*. The query-interval poll and the
cancellation poll stay as the safety net. The socket reconnects with a jittered backoff
(1 s doubling to 60 s). A server without the endpoint (HTTP 404/403 on the upgrade) or a
refused token turns events off for the life of the process, logged once.
"""

from __future__ import annotations

import base64
import datetime
import json
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Final

import attrs
import structlog
import trio

from worker.host.settings import Settings
from worker.prefect.answers import excerpt
from worker.prefect.outage import API_ERRORS
from worker.prefect.session import tls_context
from worker.rules.models import FlowRun, StateType
from worker.rules.retry import backoff

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

log = structlog.get_logger("flow_worker.events")
HANDSHAKE_TIMEOUT: Final = 10.0
CANCEL_READS: Final = 4
"""At most this many reads of runs named by CANCELLING events at once."""


class EventsUnavailable(Exception):
    """The server will not stream events to us (no endpoint, or auth refused): stop trying."""


def ws_url(api_url: str, way: str = "out") -> str:
    """The URL of the server's ``/events/out`` (or ``/events/in``) websocket."""
    base = api_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + "/events/" + way
    return "ws://" + base.removeprefix("http://") + "/events/" + way


@attrs.frozen
class Socket:
    """How one of the server's event websockets is opened (shared by the stream out and
    ``eventsin.EventsIn``): URL, TLS, headers, the ``prefect`` subprotocol and its auth
    frame. ``/events/in`` with an API key alone (Prefect Cloud) is authenticated by an
    ``Authorization`` header instead, without the subprotocol, as Prefect's clients do."""

    url: str
    token: str | None
    context: ssl.SSLContext | None
    headers: list[tuple[bytes, bytes]]
    handshake: bool = True

    @classmethod
    def of(cls, settings: Settings, way: str = "out") -> Socket:
        assert settings.api_url is not None
        url = ws_url(settings.api_url, way)
        context = tls_context(settings) if url.startswith("wss://") else None
        headers = [(k.encode(), v.encode()) for k, v in settings.custom_headers().items()]
        token = settings.api_auth_string or settings.api_key
        if way == "in" and settings.api_auth_string:  # a proxy may check it before the frame
            basic = base64.b64encode(settings.api_auth_string.encode()).decode()
            headers.append((b"Authorization", f"Basic {basic}".encode()))
        elif way == "in" and settings.api_key:
            headers.append((b"Authorization", f"bearer {settings.api_key}".encode()))
            return cls(url, token, context, headers, handshake=False)
        return cls(url, token, context, headers)

    @classmethod
    def at(cls, settings: Settings, url: str) -> Socket:
        """Another of the server's websockets that authenticates with the auth frame (the
        worker channel, ``channel.py``): the same TLS, headers and token."""
        plain = cls.of(settings)
        context = tls_context(settings) if url.startswith("wss://") else None
        return cls(url, plain.token, context, plain.headers)

    def _options(self) -> dict[str, Any]:
        return {
            "ssl_context": self.context,
            "subprotocols": ["prefect"] if self.handshake else [],
            "extra_headers": self.headers,
        }

    def open(self) -> AbstractAsyncContextManager[WebSocketConnection]:
        """The websocket, opened (not yet authenticated: :meth:`authenticate`)."""
        from trio_websocket import open_websocket_url

        wait = HANDSHAKE_TIMEOUT  # to open, and to close (a dead peer's close handshake)
        return open_websocket_url(self.url, connect_timeout=wait, disconnect_timeout=wait, **self._options())

    async def authenticate(self, ws: WebSocketConnection) -> None:
        """The auth frame and its answer: :class:`EventsUnavailable` if refused, ValueError
        if the answer is not one."""
        if not self.handshake:
            return
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await ws.send_message(json.dumps(auth_frame(self.token)))
            message = await ws.get_message()
        answer = parse_frame(message)
        if not isinstance(answer, dict):  # not an answer to auth: reconnect later
            raise ValueError(f"unexpected answer to auth: {str(message)[:120]!r}")
        if answer.get("type") != "auth_success":
            raise EventsUnavailable(f"authentication refused: {str(answer)[:200]}")


def rejected_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused websocket upgrade (trio-websocket's
    ``ConnectionRejected.status_code``), None if there was none."""
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def auth_frame(token: str | None) -> dict[str, Any]:
    """The first frame: the API key (Prefect Cloud) or auth string, or null (an open server);
    the same frame Prefect's own events client sends to both."""
    return {"type": "auth", "token": token}


def subscription(pool_id: str, now: datetime.datetime | None = None) -> dict[str, Any]:
    """The filter frame, from now on: state events of our pool's flow runs, and events of
    the pool itself and of its queues (a resumed pool or queue: poll now)."""
    now = now or datetime.datetime.now(datetime.UTC)
    return {
        "type": "filter",
        "backfill": False,
        "filter": {
            "occurred": {
                "since": (now - datetime.timedelta(seconds=5)).isoformat(),
                "until": (now + datetime.timedelta(days=3650)).isoformat(),
            },
            "event": {"prefix": ["prefect.flow-run.", "prefect.work-queue.", "prefect.work-pool."]},
            # the pool as the event's resource (pool events) or a related one (runs, queues)
            "any_resource": {"id": [f"prefect.work-pool.{pool_id}"]},
        },
    }


CLAIMED: Final = frozenset({"PENDING", "RUNNING"})
"""State types that say a worker holds the run (``on_claimed``)."""

POOL_CHANGED: Final = "POOL_CHANGED"
"""What :func:`classify` says of an event of the pool or one of its queues."""


def classify(frame: Any) -> tuple[str, str] | None:
    """(state type, flow run id) of a flow-run state event frame; (``POOL_CHANGED``,
    resource id) for an event of the pool or a queue (resumed, updated …); else None,
    for anything else whatever its shape (total over any JSON value: it never raises)."""
    if not isinstance(frame, dict) or frame.get("type") != "event":
        return None
    event = frame.get("event")
    resource = event.get("resource") if isinstance(event, dict) else None
    resource_id = resource.get("prefect.resource.id") if isinstance(resource, dict) else None
    if not isinstance(resource_id, str):
        return None
    if resource_id.startswith(("prefect.work-queue.", "prefect.work-pool.")):
        return POOL_CHANGED, resource_id
    run_id = resource_id.removeprefix("prefect.flow-run.")
    state_type = resource.get("prefect.state-type") if isinstance(resource, dict) else None
    if run_id == resource_id or not run_id or not isinstance(state_type, str):
        return None
    return state_type, run_id


NOT_JSON: Final = object()
"""What :func:`parse_frame` returns for a frame that is not JSON."""


def parse_frame(message: str | bytes) -> Any:
    """A frame's JSON; :data:`NOT_JSON` if it is not JSON (or nested too deep to read)."""
    try:
        return json.loads(message)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return NOT_JSON


CONFIRM_DELAYS: Final = (0.0, 0.25, 0.5, 1.0, 2.0)
"""Pauses before each read that confirms a CANCELLING event. A server may publish the
event before a read sees the state (a 3.2 server on SQLite did, in CI): the run is read
again for about 4 s before the event is taken for a forgery. Never a cancel without the
server's word; at most five reads per event of a held run."""


@attrs.define
class CancelCheck:
    """What a CANCELLING event sets off: a read of the run, and its cancellation only if
    the server says it is CANCELLING and it is one of ours (any API client can emit an
    event; only the run's state is the server's word). An event about a run not held
    costs nothing; a run already being read is not read twice; at most
    :data:`CANCEL_READS` reads at once, each in ``nursery`` (the stream never waits). A
    read that fails changes nothing: the cancellation poll is the safety net."""

    read: Callable[[str], Awaitable[FlowRun | None]]
    held: Callable[[str], bool]
    cancel: Callable[[str], None]
    nursery: trio.Nursery
    limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(CANCEL_READS))
    reading: set[str] = attrs.Factory(set)
    unchecked: Callable[[], None] = lambda: None
    """A read failed: the cancellation poll looks soon (``CancelPoll.unchecked``), not at
    its safety interval."""

    def heard(self, run_id: str) -> None:
        """A CANCELLING event named ``run_id``."""
        if run_id in self.reading or not self.held(run_id):
            return
        self.reading.add(run_id)
        self.nursery.start_soon(self._check, run_id)

    async def _check(self, run_id: str) -> None:
        state: StateType | None = None
        try:
            for delay in CONFIRM_DELAYS:
                await trio.sleep(delay)
                async with self.limiter:
                    flow_run = await self.read(run_id)
                state = flow_run.state_type if flow_run is not None else None
                if state is StateType.CANCELLING:
                    if self.held(run_id):
                        self.cancel(run_id)
                    return
                if state is None or state.is_final or not self.held(run_id):
                    break
        except API_ERRORS as exc:
            log.debug(
                "events.cancel_unchecked", flow_run_id=run_id, error=str(exc), fallback="the cancel poll"
            )
            self.unchecked()
            return
        finally:
            self.reading.discard(run_id)
        log.info(
            "events.cancel_not_confirmed",
            flow_run_id=run_id,
            state=state.value if state is not None else None,
            effect="the run goes on: the server does not say it is CANCELLING",
        )


async def stream(
    settings: Settings,
    pool_id: Callable[[], str | None],
    on_scheduled: Callable[[str], None],
    on_cancelling: Callable[[str], None],
    on_connected: Callable[[bool], None],
    pause: Callable[[float], Awaitable[None]] = trio.sleep,
    on_claimed: Callable[[str], None] = lambda run_id: None,
) -> None:
    """Keep one event subscription open for the life of the worker (see module doc).

    ``pause`` is the wait before a reconnect: the supervisor's ends early when the API
    is found to answer again, so the stream is back within seconds of an outage.
    ``on_claimed`` hears of every PENDING and RUNNING run of the pool (the fleet's
    reclaim loop: a claim not ours means a peer is at work)."""
    from trio_websocket import ConnectionClosed, HandshakeError

    failures = skipped = 0
    socket = Socket.of(settings)
    url = socket.url
    while True:
        pool = pool_id()
        if pool is None:
            await trio.sleep(0.5)
            continue
        try:
            async with socket.open() as ws:
                await socket.authenticate(ws)
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await ws.send_message(json.dumps(subscription(pool)))
                if failures:
                    log.info("events.reconnected", after_failures=failures)
                else:
                    log.info("events.connected", url=url)
                failures = 0
                on_connected(True)
                while True:
                    message = await ws.get_message()
                    frame = parse_frame(message)
                    if frame is NOT_JSON:
                        level = "info" if not skipped else "debug"
                        skipped += 1
                        quoted = excerpt(message.encode() if isinstance(message, str) else message)
                        getattr(log, level)("events.frame_skipped", reason="not JSON", frame=quoted)
                        continue
                    seen = classify(frame)
                    if seen is None:
                        continue
                    state_type, run_id = seen
                    if state_type == "SCHEDULED":
                        on_scheduled(run_id)
                    elif state_type == POOL_CHANGED:
                        on_scheduled("")  # a queue or the pool resumed: what it held may be due
                    elif state_type == "CANCELLING":
                        on_cancelling(run_id)
                    elif state_type in CLAIMED:
                        on_claimed(run_id)
        except EventsUnavailable as exc:
            on_connected(False)
            log.warning("events.unavailable", reason=str(exc), fallback="polling only")
            return
        except HandshakeError as exc:
            status = rejected_status(exc)
            if status is not None and 400 <= status < 500:
                on_connected(False)
                log.info(
                    "events.unavailable",
                    reason=f"HTTP {status} on the websocket upgrade",
                    fallback="polling only",
                )
                return
            failures += 1
            log_failure(failures, exc)
        except ConnectionClosed as exc:
            code = getattr(exc.reason, "code", None)
            if code == 1008:
                on_connected(False)
                log.warning("events.unavailable", reason="token refused (1008)", fallback="polling only")
                return
            failures += 1
            log_failure(failures, exc)
        except (OSError, trio.TooSlowError, ValueError, trio.BrokenResourceError) as exc:
            failures += 1
            log_failure(failures, exc)
        on_connected(False)
        await pause(backoff(failures, 1.0, 60.0, 0.2))


def log_failure(failures: int, exc: BaseException) -> None:
    if failures == 1:
        log.info(
            "events.disconnected", error=f"{type(exc).__name__}: {exc}", fallback="polling until reconnected"
        )
    else:
        log.debug("events.retry", failures=failures, error=f"{type(exc).__name__}: {exc}")
