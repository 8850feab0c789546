"""Prefect's worker channel: heartbeats and the work pool over one websocket (Prefect 3.8.8, 3.9).

Prefect's worker (3.8.8 and 3.9 of the tested releases) heartbeats over
``/api/work_pools/<pool>/workers/connect`` instead of ``POST …/workers/heartbeat``, and
is told of its pool's changes there instead of reading the pool at every heartbeat:
idle, it costs its server one poll per interval (issue 22). flow-worker does the same
where the server offers the channel, and keeps the REST heartbeat elsewhere (the
supervisor's heartbeat loop sends it whenever :attr:`Channel.up` is false).

The protocol (``work_pool_worker_channel.v1``, read in Prefect 3.9.1's
``client/schemas/worker_channel.py``, ``server/api/workers.py`` and
``server/utilities/worker_channel.py``; 3.8.8's schema is the same): subprotocol
``prefect``; the events stream's auth frame ``{"type":"auth","token":…}`` answered by
``{"type":"auth_success"}``; then every frame is ``{"type","id","sent_at","payload"}``:

* ``worker.hello.v1`` (ours): consumer id, worker name and type, heartbeat interval (whole
  seconds), the channel versions and capabilities we speak (``worker_heartbeat.v1``,
  ``work_pool_snapshot.v1``: cleanup delivery is not asked for), the work queues,
  ``create_pool_if_not_found`` and the default base job template (the server gives an
  empty pool this one, as the REST sync does). The server records a heartbeat for it.
* ``worker.ready.v1`` (the server's): the same consumer id, the effective heartbeat
  interval, and ``initial_snapshot.work_pool``: the pool, as ``GET /work_pools/<pool>``.
* ``worker.heartbeat.v1`` (ours, every effective interval): consumer id, worker name,
  interval. The server does not answer it; it closes the channel (1011,
  ``heartbeat_persistence_failed``) if it cannot record one. A websocket ping follows
  each: its pong says the frame reached the server (``Fencer.beat``).
* ``work_pool.snapshot.v1`` (the server's, when the pool changes): the pool again.

Close codes: 1008 (authentication, authorization: also an unknown pool without
``create_pool_if_not_found``) and 1002 (protocol) are final, 1011 is transient. A server
without the route (3.6.29 and older) refuses the upgrade with HTTP 403 or 404: then the worker
heartbeats over REST for the life of the process, said once (``channel.unavailable``).
Any other failure is retried with a backoff, REST heartbeats meanwhile.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import quote

import attrs
import structlog
import trio

from worker.host.settings import Settings
from worker.prefect.events import EventsUnavailable, Socket, rejected_status
from worker.rules.job import ProcessJobConfiguration
from worker.rules.models import WorkPool, structure
from worker.rules.retry import backoff

log = structlog.get_logger("flow_worker")

VERSION: Final = "work_pool_worker_channel.v1"
CAPABILITIES: Final = ("worker_heartbeat.v1", "work_pool_snapshot.v1")
SETUP_TIMEOUT: Final = 10.0
"""Seconds for the connection, auth, hello and ready (Prefect's worker allows 10 s)."""
PONG_TIMEOUT: Final = 10.0
"""Seconds within which the ping after a heartbeat must be answered, else reconnect."""


class ChannelUnavailable(Exception):
    """The server will not keep a channel with us: REST heartbeats for good."""


def channel_url(api_url: str, pool: str) -> str:
    base = api_url.rstrip("/")
    scheme, _, rest = base.partition("://")
    ws = "wss" if scheme == "https" else "ws"
    return f"{ws}://{rest}/work_pools/{quote(pool, safe='')}/workers/connect"


def frame(kind: str, payload: dict[str, Any], now: datetime.datetime | None = None) -> dict[str, Any]:
    sent = now or datetime.datetime.now(datetime.UTC)
    return {"type": kind, "id": str(uuid.uuid4()), "sent_at": sent.isoformat(), "payload": payload}


def interval_of(settings: Settings) -> int:
    """The heartbeat interval as the channel takes it: whole seconds, at least 1."""
    return max(1, round(settings.heartbeat_seconds))


def hello(consumer_id: str, settings: Settings) -> dict[str, Any]:
    assert settings.pool is not None
    return frame(
        "worker.hello.v1",
        {
            "consumer_id": consumer_id,
            "worker_name": settings.worker_name,
            "worker_type": "process",
            "heartbeat_interval_seconds": interval_of(settings),
            "supported_channel_versions": [VERSION],
            "requested_capabilities": list(CAPABILITIES),
            "work_queue_names": list(settings.work_queues),
            "create_pool_if_not_found": settings.create_pool_if_not_found,
            "default_base_job_template": ProcessJobConfiguration.default_base_job_template(),
        },
    )


def heartbeat(consumer_id: str, worker_name: str, interval: int) -> dict[str, Any]:
    return frame(
        "worker.heartbeat.v1",
        {"consumer_id": consumer_id, "worker_name": worker_name, "heartbeat_interval_seconds": interval},
    )


def read_ready(message: str | bytes, consumer_id: str) -> tuple[int, WorkPool]:
    """The effective heartbeat interval and the pool, from the answer to our hello."""
    ready = _json(message)
    payload = ready.get("payload") if ready.get("type") == "worker.ready.v1" else None
    if not isinstance(payload, dict) or payload.get("consumer_id") != consumer_id:
        raise ChannelUnavailable(f"not a ready frame for our hello: {str(message)[:200]}")
    interval = payload.get("effective_heartbeat_interval_seconds")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ChannelUnavailable(f"no heartbeat interval in the ready frame: {interval!r}")
    return interval, _pool(payload.get("initial_snapshot"))


def read_snapshot(message: str | bytes) -> WorkPool:
    """The pool from a ``work_pool.snapshot.v1`` frame (any other frame: a protocol error,
    as for Prefect's worker)."""
    data = _json(message)
    if data.get("type") != "work_pool.snapshot.v1":
        raise ChannelUnavailable(f"unexpected frame: {str(message)[:200]}")
    return _pool(data.get("payload"))


def _json(message: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(message)
    except ValueError as exc:
        raise ChannelUnavailable(f"not JSON: {str(message)[:120]!r}") from exc
    if not isinstance(data, dict):
        raise ChannelUnavailable(f"not a frame: {str(message)[:120]!r}")
    return data


def _pool(snapshot: Any) -> WorkPool:
    pool = snapshot.get("work_pool") if isinstance(snapshot, dict) else None
    try:
        return structure(pool, WorkPool)
    except Exception as exc:  # cattrs says why in its own exception group
        raise ChannelUnavailable(f"a work pool snapshot of an unknown shape: {str(pool)[:200]}") from exc


@attrs.define
class Channel:
    """One worker channel for the life of the worker (see the module's doc)."""

    settings: Settings
    on_pool: Callable[[WorkPool], None]
    """The pool as the server sent it (the ready frame, then each change)."""
    on_beat: Callable[[float], None]
    """A heartbeat sent at this trio time reached the server."""
    pause: Callable[[float], Awaitable[None]] = trio.sleep
    consumer_id: str = attrs.Factory(lambda: str(uuid.uuid4()))
    up: bool = False
    """The channel carries the heartbeats now: no REST heartbeat, no pool read."""
    off: str | None = None
    """Why the server keeps no channel with us (REST heartbeats for good)."""

    async def run(self, after: trio.Event) -> None:
        """Keep the channel open, once ``after`` is set (the supervisor's first poll, which
        follows the first REST sync: the websocket's import and handshake are not on the
        way to it); return if the server has none."""
        if self.settings.once:
            return  # --once drains and exits: REST heartbeats suffice
        await after.wait()
        from trio_websocket import ConnectionClosed, HandshakeError

        assert self.settings.api_url is not None and self.settings.pool is not None
        socket = Socket.at(self.settings, channel_url(self.settings.api_url, self.settings.pool))
        failures = 0
        while True:
            try:
                async with socket.open() as ws:
                    await socket.authenticate(ws)
                    interval = await self._setup(ws)
                    log.info("channel.connected", heartbeat_seconds=interval, after_failures=failures)
                    failures = 0
                    try:
                        await self._serve(ws, interval)
                    finally:
                        self.up = False  # REST heartbeats at once, not after the close handshake
            except (ChannelUnavailable, EventsUnavailable) as exc:
                return self._unavailable(str(exc))
            except HandshakeError as exc:
                status = rejected_status(exc)
                if status is not None and 400 <= status < 500:  # no such route: Prefect < 3.8
                    return self._unavailable(f"HTTP {status} on the websocket upgrade (Prefect before 3.8)")
                failures += 1
                self._failed(failures, exc)
            except ConnectionClosed as exc:
                code = getattr(exc.reason, "code", None)
                if code in (1002, 1008):
                    reason = getattr(exc.reason, "reason", None)
                    return self._unavailable(f"closed by the server ({code}: {reason})")
                failures += 1
                self._failed(failures, exc)
            except (OSError, trio.TooSlowError, ValueError, trio.BrokenResourceError) as exc:
                failures += 1
                self._failed(failures, exc)
            finally:
                self.up = False
            await self.pause(backoff(failures, 1.0, 60.0, 0.2))

    async def _setup(self, ws: Any) -> int:
        with trio.fail_after(SETUP_TIMEOUT):  # (authenticated by ``Socket.authenticate``)
            sent = trio.current_time()
            await ws.send_message(json.dumps(hello(self.consumer_id, self.settings)))
            interval, pool = read_ready(await ws.get_message(), self.consumer_id)
        self.up = True
        self.on_pool(pool)
        self.on_beat(sent)  # the server recorded a heartbeat before it answered our hello
        return interval

    async def _serve(self, ws: Any, interval: int) -> None:
        """Heartbeats every ``interval``, and the pool's snapshots between them (one task:
        no exception group to unwrap; trio-websocket answers pings in its own reader)."""
        beat_at = trio.current_time() + interval
        while True:
            with trio.move_on_at(beat_at):
                while True:
                    self.on_pool(read_snapshot(await ws.get_message()))
            sent = trio.current_time()
            beat = heartbeat(self.consumer_id, self.settings.worker_name, interval)
            with trio.fail_after(PONG_TIMEOUT):  # a server that stopped reading: reconnect
                await ws.send_message(json.dumps(beat))
                await ws.ping()  # answered after the server has read the heartbeat
            self.on_beat(sent)
            beat_at = sent + interval

    def _unavailable(self, reason: str) -> None:
        self.off = reason
        log.info("channel.unavailable", reason=reason, fallback="heartbeats over REST")

    def _failed(self, failures: int, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if failures == 1:
            log.info("channel.disconnected", error=error, fallback="heartbeats over REST until reconnected")
        else:
            log.debug("channel.retry", failures=failures, error=error)
