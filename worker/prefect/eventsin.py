"""The worker's events sent as Prefect's clients send them: over the ``/api/events/in``
websocket (one event a text frame, the shape ``POST /api/events`` takes), and over
``POST /api/events`` where the websocket cannot be opened (older servers, proxies).

One connection lives as long as the uplink's loop (opened when the first batch goes).
A batch counts as delivered once a ping sent after it is answered, as Prefect's client
checkpoints; a connection lost before that keeps the batch for the next try (the server
may then see an event twice, with the same id). If the websocket cannot be opened and
``POST`` then works, events go by ``POST`` for the life of the process: said once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

import attrs
import structlog
import trio

from worker.prefect.answers import ApiUnavailable
from worker.prefect.events import HANDSHAKE_TIMEOUT, EventsUnavailable, Socket

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

log = structlog.get_logger("flow_worker")
PATH: Final = "/events/in"


@attrs.define
class EventsIn:
    """The events websocket of one uplink (module doc); ``socket`` None: ``POST`` only."""

    socket: Socket | None
    nursery: trio.Nursery | None = None
    """Where the connection lives (the uplink's loop); None: not now, ``POST`` instead."""
    over_post: bool = False
    """Decided once: the websocket could not be opened and ``POST`` worked."""
    unopened: str | None = None
    """Why the websocket could not be opened last time (None: it could, or never tried)."""
    _ws: WebSocketConnection | None = None
    _done: trio.Event = attrs.Factory(trio.Event)

    async def send(self, batch: list[dict[str, Any]]) -> bool:
        """Send ``batch``: True once the server has it; False if the caller should ``POST``
        it instead. Raises :class:`ApiUnavailable` if the connection was lost on the way."""
        from trio_websocket import ConnectionClosed, HandshakeError

        if self.over_post or self.socket is None:
            return False
        if self._ws is None or self._ws.closed is not None:
            await self.close()  # (one closed by the server: its task ends)
            if self.nursery is None:
                return False
            try:
                await self.nursery.start(self._hold)
            except (
                EventsUnavailable,
                HandshakeError,
                ConnectionClosed,
                OSError,
                ValueError,
                trio.TooSlowError,
            ) as exc:
                self.unopened = _said(exc)
                return False
            self.unopened = None
        ws = self._ws
        if ws is None:
            return False
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                for event in batch:
                    await ws.send_message(json.dumps(event))
                await ws.ping()
        except (ConnectionClosed, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            await self.close()
            raise ApiUnavailable("WS", PATH, None, _said(exc)) from None
        return True

    def posted(self) -> None:
        """A batch went by ``POST``: if the websocket could not be opened, it never will."""
        if self.unopened is not None and not self.over_post:
            self.over_post = True
            log.info(
                "uplink.events_over_post",
                reason=f"the {PATH} websocket could not be opened: {self.unopened}",
                effect="events are sent by POST /events",
            )

    async def _hold(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the websocket and hold it open until :meth:`close` (in :attr:`nursery`,
        its own task: a connection's failure never reaches the uplink's loop)."""
        assert self.socket is not None
        done, opened = trio.Event(), False
        try:
            async with self.socket.open() as ws:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await self.socket.authenticate(ws)
                self._ws, self._done, opened = ws, done, True
                task_status.started()
                await done.wait()
        except Exception as exc:
            if not opened:
                raise
            log.debug("uplink.events_socket_lost", error=_said(exc))
        finally:
            if self._done is done:
                self._ws = None

    async def close(self) -> None:
        """Close the websocket (if open): its task ends."""
        self._ws = None
        self._done.set()
        await trio.lowlevel.checkpoint()


def _said(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"HTTP {status} on the upgrade" if status is not None else f"{type(exc).__name__}: {exc}"
