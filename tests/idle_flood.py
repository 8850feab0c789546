"""Strangers' idle connections against a capped port (``control.Gate``): shared by the
control channel's and the health server's tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

from worker.host.gate import Gate

STRANGERS = 200


async def closed(stream: trio.SocketStream) -> bool:
    """True once the server closed it (EOF, or a reset)."""
    try:
        return await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        return True


@attrs.define
class Flood:
    streams: list[trio.SocketStream]
    connected_in: float
    closed_after: list[float]


async def flood(
    port: int, gate: Gate, cap: int, at_cap: Callable[[], Awaitable[None]] | None = None
) -> Flood:
    """Open ``STRANGERS`` connections that never speak: at most ``cap`` are held and the
    rest closed at once (then ``at_cap`` runs); returns once the held ones are closed too."""
    began = trio.current_time()
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(STRANGERS)]
    result = Flood(streams, trio.current_time() - began, [])

    async def watch(stream: trio.SocketStream) -> None:
        assert await closed(stream)
        result.closed_after.append(trio.current_time() - began)

    with trio.fail_after(gate.idle_timeout + 5):
        async with trio.open_nursery() as watchers:
            for stream in streams:
                watchers.start_soon(watch, stream)
            await trio.sleep(gate.idle_timeout / 3)
            assert gate.held == cap
            assert len(result.closed_after) == STRANGERS - cap, "past the cap: closed at once"
            if at_cap is not None:
                await at_cap()
    last = max(result.closed_after)
    print(f"{STRANGERS} connections in {result.connected_in:.2f} s; closed after {last:.2f} s")
    return result
