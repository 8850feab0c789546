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

Policy: the socket only ever makes the worker *faster*. The query-interval poll and the
cancellation poll stay as the safety net. The socket reconnects with a jittered backoff
(1 s doubling to 60 s). A server without the endpoint (HTTP 404/403 on the upgrade) or a
refused token turns events off for the life of the process, logged once.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
import trio

from worker.api import tls_context
from worker.retry import backoff
from worker.settings import Settings

log = structlog.get_logger("flow_worker.events")
HANDSHAKE_TIMEOUT: Final = 10.0


class EventsUnavailable(Exception):
    """The server will not stream events to us (no endpoint, or auth refused): stop trying."""


def ws_url(api_url: str) -> str:
    base = api_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + "/events/out"
    return "ws://" + base.removeprefix("http://") + "/events/out"


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


POOL_CHANGED: Final = "POOL_CHANGED"
"""What :func:`classify` says of an event of the pool or one of its queues."""


def classify(frame: dict[str, Any]) -> tuple[str, str] | None:
    """(state type, flow run id) of a flow-run state event frame; (``POOL_CHANGED``,
    resource id) for an event of the pool or a queue (resumed, updated …); else None."""
    if frame.get("type") != "event":
        return None
    event = frame.get("event") or {}
    resource = event.get("resource") or {}
    resource_id = str(resource.get("prefect.resource.id", ""))
    if resource_id.startswith(("prefect.work-queue.", "prefect.work-pool.")):
        return POOL_CHANGED, resource_id
    if not resource_id.startswith("prefect.flow-run."):
        return None
    state_type = str(resource.get("prefect.state-type", ""))
    return state_type, resource_id.removeprefix("prefect.flow-run.")


async def stream(
    settings: Settings,
    pool_id: Callable[[], str | None],
    on_scheduled: Callable[[str], None],
    on_cancelling: Callable[[str], None],
    on_connected: Callable[[bool], None],
    pause: Callable[[float], Awaitable[None]] = trio.sleep,
) -> None:
    """Keep one event subscription open for the life of the worker (see module doc).

    ``pause`` is the wait before a reconnect: the supervisor's ends early when the API
    is found to answer again, so the stream is back within seconds of an outage."""
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    failures = 0
    token = settings.api_auth_string or settings.api_key
    assert settings.api_url is not None
    url = ws_url(settings.api_url)
    context = tls_context(settings) if url.startswith("wss://") else None
    headers = [(k.encode(), v.encode()) for k, v in settings.custom_headers().items()]
    while True:
        pool = pool_id()
        if pool is None:
            await trio.sleep(0.5)
            continue
        try:
            async with open_websocket_url(
                url,
                ssl_context=context,
                subprotocols=["prefect"],
                extra_headers=headers,
                connect_timeout=HANDSHAKE_TIMEOUT,
            ) as ws:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await ws.send_message(json.dumps(auth_frame(token)))
                    answer = json.loads(await ws.get_message())
                    if answer.get("type") != "auth_success":
                        raise EventsUnavailable(f"authentication refused: {answer}")
                    await ws.send_message(json.dumps(subscription(pool)))
                if failures:
                    log.info("events.reconnected", after_failures=failures)
                else:
                    log.info("events.connected", url=url)
                failures = 0
                on_connected(True)
                while True:
                    seen = classify(json.loads(await ws.get_message()))
                    if seen is None:
                        continue
                    state_type, run_id = seen
                    if state_type == "SCHEDULED":
                        on_scheduled(run_id)
                    elif state_type == POOL_CHANGED:
                        on_scheduled("")  # a queue or the pool resumed: what it held may be due
                    elif state_type == "CANCELLING":
                        on_cancelling(run_id)
        except EventsUnavailable as exc:
            on_connected(False)
            log.warning("events.unavailable", reason=str(exc), fallback="polling only")
            return
        except HandshakeError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
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
