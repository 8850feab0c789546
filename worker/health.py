"""The health endpoint: a tiny h11 server on trio for ``GET /health`` (PROTOCOL §5).

``/health`` answers 200 ``{"message":"OK"}`` while the worker has polled within
``30 * query_seconds`` (measured from process start until the first poll), else 503
``{"message":"Worker may be unresponsive at this time"}``. Other paths are 404, other
methods on ``/health`` 405. One request per connection; a peer that sends garbage gets
400 and the connection is closed (its fault, logged at DEBUG).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

import h11
import structlog
import trio

log = structlog.get_logger("flow_worker.health")
MAX_REQUEST: Final = 16 * 1024
READ_TIMEOUT: Final = 10.0


def is_healthy(now: float, last_poll: float | None, started: float, query_seconds: float) -> bool:
    """The staleness rule, in total seconds (pain point #22900: not ``.seconds``)."""
    since = now - (last_poll if last_poll is not None else started)
    return since <= 30 * query_seconds


def respond(method: bytes, target: bytes, healthy: bool) -> tuple[int, dict[str, str]]:
    path = target.split(b"?", 1)[0]
    if path != b"/health":
        return 404, {"detail": "Not Found"}
    if method not in (b"GET", b"HEAD"):
        return 405, {"detail": "Method Not Allowed"}
    if healthy:
        return 200, {"message": "OK"}
    return 503, {"message": "Worker may be unresponsive at this time"}


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The request head, or None if the peer closed or was too slow (READ_TIMEOUT)."""
    with trio.move_on_after(READ_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
                continue
            return event if isinstance(event, h11.Request) else None
    return None


async def _handle(stream: trio.SocketStream, healthy: Callable[[], bool]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        request = await _read_request(conn, stream)
        if request is None:
            return
        status, body = respond(request.method, request.target, healthy())
        payload = json.dumps(body).encode()
        headers = [
            ("content-type", "application/json"),
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
    finally:
        await stream.aclose()


async def serve(
    host: str,
    port: int,
    healthy: Callable[[], bool],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port through ``task_status``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("health.listening", host=host, port=bound)
    task_status.started(bound)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, healthy)

    await trio.serve_listeners(handler, listeners)
