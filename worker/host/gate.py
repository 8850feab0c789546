"""Admission for an unauthenticated listener: the control port and the ``/health`` port.

Anyone on the host can connect to either before showing anything, so each listener is a
:class:`Gate`: a cap on the connections held, an idle deadline on each, and accept errors
(out of descriptors) and peer resets that never end the listener.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import structlog
import trio

ACCEPT_BACKOFF: Final = 0.1
"""The pause after a failed ``accept`` (out of descriptors): the pending connection stays
in the listen queue, so retrying at once would spin."""
EPISODE_QUIET: Final = 60.0
"""A gate's warning (accept failing, cap reached) is said again only after this long
without the condition: one line per flood, not one per connection."""

log = structlog.get_logger("flow_worker.control")  # as before the move: the same logger name in the journal


Handler = Callable[[trio.SocketStream, Callable[[], None]], Awaitable[None]]
"""Serves one connection; calling its second argument releases the connection from the
gate (it then no longer counts against the cap nor has a deadline)."""


@attrs.define(eq=False)
class Gate:
    """Admission for an unauthenticated listener: at most ``cap`` connections held, each
    closed ``idle_timeout`` after it was accepted unless its handler released it; past the
    cap, new connections are closed at once. Nothing a connection does, and no failing
    ``accept``, ends :meth:`serve`."""

    name: str
    cap: int
    idle_timeout: float
    held: int = 0
    peak: int = 0
    """The most connections held at once."""
    refused: int = 0
    """Connections closed at once because the cap was reached."""
    timed_out: int = 0
    _said: dict[str, float] = attrs.Factory(dict)

    async def serve(
        self, listeners: Sequence[trio.abc.Listener[trio.SocketStream]], handler: Handler
    ) -> None:
        """Accept on every listener until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, handler, nursery)

    def _episode(self, what: str, event: str, **fields: object) -> None:
        """Say ``event`` (WARNING) unless ``what`` was seen within ``EPISODE_QUIET``."""
        now = trio.current_time()
        last = self._said.get(what)
        self._said[what] = now
        if last is None or now - last > EPISODE_QUIET:
            log.warning(event, **fields)

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.SocketStream], handler: Handler, nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno or 0, "?")
                    self._episode(
                        "accept",
                        f"{self.name}.accept_failed",
                        error=f"{name}: {exc.strerror}",
                        effect=f"new connections wait; accept is retried every {ACCEPT_BACKOFF:g} s",
                    )
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if self.held >= self.cap:
                    self.refused += 1
                    self._episode(
                        "cap",
                        f"{self.name}.connections_capped",
                        cap=self.cap,
                        effect="new connections are closed at once until held ones end "
                        f"(each within {self.idle_timeout:g} s)",
                    )
                    stream.socket.close()  # at once: no checkpoint, the flood waits in the queue
                    continue
                self.held += 1
                self.peak = max(self.peak, self.held)
                nursery.start_soon(self._one, stream, handler)

    async def _one(self, stream: trio.SocketStream, handler: Handler) -> None:
        deadline = trio.CancelScope(deadline=trio.current_time() + self.idle_timeout)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held -= 1
                deadline.deadline = math.inf

        try:
            with deadline:
                await handler(stream, release)
            if deadline.cancelled_caught:
                self.timed_out += 1
                log.debug(f"{self.name}.connection_timed_out", after=self.idle_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug(f"{self.name}.connection_failed", error=f"{type(exc).__name__}: {exc}")  # the peer's
        except Exception as exc:  # a bug: it ends this connection, never the listener
            log.error(f"{self.name}.connection_error", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        finally:
            release()
            with trio.CancelScope(shield=True):
                await stream.aclose()
