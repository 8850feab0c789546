"""The engine's control channel (PROTOCOL §4, protocol v1): tell a flow *why* it is stopped.

One loopback listener serves the whole worker (Prefect opens one per run). Each run gets
a one-time token; the child's engine connects when the flow starts, sends
``token + "\\n"`` and a 5-byte hello (``b"\\x00PF\\x02\\x01"``, which a v1 peer ignores:
we never answer it, so the engine settles on v1). Before SIGTERM the worker sends one
intent byte and waits up to ``ACK_TIMEOUT`` for ``b"a"``:

==========  =========  ==================================================================
intent      byte       what the engine does on the SIGTERM that follows
==========  =========  ==================================================================
cancel      ``c``      exits without touching the state: runs carry
                       ``PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS=false``, so the
                       worker runs the ``on_cancellation`` hooks, then forces CANCELLED
                       (``hooks.py``)
reschedule  ``r``      exits without touching the state (the worker proposes SCHEDULED)
relinquish  ``q``      exits without touching the state (the worker proposes CRASHED)
==========  =========  ==================================================================

Without an acknowledgement (the flow had not started, or the engine is too old) the
worker falls back to plain signals.

Anyone on the host can connect before showing a token, so the listener is a ``gate.Gate``
(shared with the ``/health`` server): at most ``CONTROL_CAP`` connections without a valid
token are open at once, each closed ``HANDSHAKE_TIMEOUT`` after it was accepted unless its
token line came; at the cap a new connection is closed at once (an engine refused so falls
back to plain signals, as an old engine does). A connection with a valid token is released
from the gate: there is at most one per run held. Running out of descriptors on accept is
said once and retried; nothing a peer does ends the listener.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio

from worker.host.gate import Gate

ACK_TIMEOUT: Final = 1.0
HANDSHAKE_TIMEOUT: Final = 5.0
"""How long a connection may take to send its token line. An engine sends it right after
connecting, so even on a loaded host it is there by the time the worker accepts; a peer
silent this long is not an engine, and holds one of ``CONTROL_CAP`` for no longer."""
CONTROL_CAP: Final = 64
"""Connections open at once that have not shown a valid token. Only engines of runs
starting within the same few milliseconds are ever in their handshake together, so 64 is
far above a real need, and bounds what a local flood holds to 64 descriptors (the runs'
own connections, one per run held, are not counted)."""
INTENT_BYTES: Final = {"cancel": b"c", "reschedule": b"r", "relinquish": b"q"}

log = structlog.get_logger("flow_worker.control")


@attrs.define
class _Session:
    flow_run_id: str
    stream: trio.SocketStream | None = None
    done: trio.Event = attrs.Factory(trio.Event)


@attrs.define
class ControlChannel:
    port: int = 0
    gate: Gate = attrs.Factory(lambda: Gate("control", CONTROL_CAP, HANDSHAKE_TIMEOUT))
    _by_token: dict[str, _Session] = attrs.Factory(dict)
    _by_run: dict[str, str] = attrs.Factory(dict)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await self.gate.serve(listeners, self._handle)

    def register(self, flow_run_id: str) -> dict[str, str]:
        """The env vars that let the run's engine connect (empty if not serving)."""
        if not self.port:
            return {}
        token = secrets.token_hex(16)
        self._by_token[token] = _Session(flow_run_id)
        self._by_run[flow_run_id] = token
        return {"PREFECT__CONTROL_PORT": str(self.port), "PREFECT__CONTROL_TOKEN": token}

    def unregister(self, flow_run_id: str) -> None:
        token = self._by_run.pop(flow_run_id, None)
        session = self._by_token.pop(token, None) if token else None
        if session is not None:
            session.done.set()  # its connection handler returns and the stream is closed

    def connected(self, flow_run_id: str) -> bool:
        token = self._by_run.get(flow_run_id)
        session = self._by_token.get(token) if token else None
        return session is not None and session.stream is not None

    async def _handle(self, stream: trio.SocketStream, release: Callable[[], None]) -> None:
        """One connection: its token line within ``HANDSHAKE_TIMEOUT`` (the gate's deadline),
        then, if the token is a run's, held open until the run ends (the gate closes it)."""
        buffer = b""
        while b"\n" not in buffer and len(buffer) < 256:
            chunk = await stream.receive_some(256)
            if not chunk:
                break
            buffer += chunk
        token = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
        session = self._by_token.get(token)
        if session is None or session.stream is not None or b"\n" not in buffer:
            log.debug("control.rejected", reason="unknown or reused token")  # the peer's fault
            return
        release()  # a run's engine: no longer a stranger's connection
        session.stream = stream  # bytes after the token are the hello, ignored
        log.debug("control.connected", flow_run_id=session.flow_run_id)
        try:
            await session.done.wait()  # keep the connection open until the run ends
        finally:
            session.stream = None

    async def send_intent(self, flow_run_id: str, intent: str) -> bool:
        """Send an intent; True if the engine acknowledged it within ``ACK_TIMEOUT``."""
        token = self._by_run.get(flow_run_id)
        session = self._by_token.get(token) if token else None
        if session is None or session.stream is None:
            return False
        stream = session.stream
        try:
            await stream.send_all(INTENT_BYTES[intent])
            with trio.move_on_after(ACK_TIMEOUT):
                while True:
                    data = await stream.receive_some(64)
                    if not data:
                        return False
                    if b"a" in data:  # the hello bytes never contain b"a"
                        return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return False
