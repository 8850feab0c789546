"""The health endpoint: a tiny h11 server on trio for ``GET /health`` (PROTOCOL §5).

``/health`` answers 200 ``{"message":"OK"}`` while the worker has polled within
``30 * query_seconds`` (measured from process start until the first poll), else 503
``{"message":"Worker may be unresponsive at this time"}``, or 503 with the reason when the
worker knows what is wrong (an interpreter that cannot import prefect). Other paths are 404, other
methods on ``/health`` 405. One request per connection; a peer that sends garbage gets
400 and the connection is closed (its fault, logged at DEBUG).

Nobody is authenticated here, so the listener is a ``control.Gate``: at most
``HEALTH_CAP`` connections open at once, each closed ``IDLE_TIMEOUT`` after it was
accepted (a request is answered within milliseconds), a new one past the cap closed at
once; descriptors running out on accept are said once and retried. A flood of idle
connections thus holds the endpoint for ``IDLE_TIMEOUT`` at most, and never ends it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

import h11
import structlog
import trio

from worker.host.gate import Gate

log = structlog.get_logger("flow_worker.health")
MAX_REQUEST: Final = 16 * 1024
IDLE_TIMEOUT: Final = 5.0
"""How long a connection may stay open: a probe sends its request as it connects and is
answered at once; a peer silent this long holds one of ``HEALTH_CAP`` no longer (and the
next probe, from a fresh connection, is answered)."""
HEALTH_CAP: Final = 16
"""Connections open at once. Who asks: the service manager's or orchestrator's probe and a
metrics scrape, one short request each: a handful at once. 16 leaves room for several
probers and bounds what a flood of idle connections holds to 16 descriptors."""


def is_healthy(now: float, last_poll: float | None, started: float, query_seconds: float) -> bool:
    """The staleness rule, in total seconds (pain point #22900: not ``.seconds``)."""
    since = now - (last_poll if last_poll is not None else started)
    return since <= 30 * query_seconds


JSON: Final = "application/json"
PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"


def respond(
    method: bytes,
    target: bytes,
    healthy: Callable[[], bool],
    metrics: Callable[[], str] | None = None,
    problem: Callable[[], str | None] | None = None,
) -> tuple[int, str, bytes]:
    """Status, content type and body for one request (pure; the routing table)."""
    path = target.split(b"?", 1)[0]
    if path not in (b"/health", b"/metrics") or (path == b"/metrics" and metrics is None):
        return 404, JSON, json.dumps({"detail": "Not Found"}).encode()
    if method not in (b"GET", b"HEAD"):
        return 405, JSON, json.dumps({"detail": "Method Not Allowed"}).encode()
    if path == b"/metrics":
        assert metrics is not None
        return 200, PROMETHEUS, metrics().encode()
    said = problem() if problem is not None else None
    if said is not None:
        return 503, JSON, json.dumps({"message": said}).encode()
    if healthy():
        return 200, JSON, json.dumps({"message": "OK"}).encode()
    return 503, JSON, json.dumps({"message": "Worker may be unresponsive at this time"}).encode()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The request head, or None if the peer closed (the gate's deadline bounds the wait)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
            continue
        return event if isinstance(event, h11.Request) else None


async def _handle(
    stream: trio.SocketStream,
    healthy: Callable[[], bool],
    metrics: Callable[[], str] | None,
    problem: Callable[[], str | None] | None = None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        request = await _read_request(conn, stream)
        if request is None:
            return
        status, content_type, payload = respond(request.method, request.target, healthy, metrics, problem)
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(payload))),
            ("connection", "close"),
        ]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        if request.method != b"HEAD":
            await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    except h11.RemoteProtocolError as exc:
        log.debug("health.bad_request", error=str(exc))
        try:
            await stream.send_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        except trio.BrokenResourceError:
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve(
    host: str,
    port: int,
    healthy: Callable[[], bool],
    metrics: Callable[[], str] | None = None,
    problem: Callable[[], str | None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    *,
    gate: Gate | None = None,
) -> None:
    """Serve until cancelled; reports the bound port through ``task_status``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("health.listening", host=host, port=bound)
    task_status.started(bound)

    async def handler(stream: trio.SocketStream, release: Callable[[], None]) -> None:
        await _handle(stream, healthy, metrics, problem)  # never released: IDLE_TIMEOUT in all

    await (gate or Gate("health", HEALTH_CAP, IDLE_TIMEOUT)).serve(listeners, handler)
