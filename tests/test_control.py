"""The engines' control channel (real sockets on loopback, the server in-process): tokens,
intents, and what strangers' connections may cost (issue 19: nothing capped them)."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio

from tests.idle_flood import STRANGERS, closed, flood
from tests.said import Said
from worker.host import gate
from worker.host.gate import Gate
from worker.runs import control
from worker.runs.control import CONTROL_CAP, ControlChannel

HELLO = b"\x00PF\x02\x01"


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> Said:
    recorder = Said()
    monkeypatch.setattr(control, "log", recorder)
    monkeypatch.setattr(gate, "log", recorder)
    return recorder


async def engine(port: int, env: dict[str, str]) -> trio.SocketStream:
    """What a run's engine does when its flow starts: connect, send the token and hello."""
    assert env["PREFECT__CONTROL_PORT"] == str(port)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(env["PREFECT__CONTROL_TOKEN"].encode() + b"\n" + HELLO)
    return stream


async def acknowledge(stream: trio.SocketStream) -> bytes:
    """The engine's side of an intent: read the byte, answer ``a``."""
    intent = await stream.receive_some(1)
    await stream.send_all(b"a")
    return intent


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_an_engine_with_its_token_gets_the_intent() -> None:
    channel = ControlChannel()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(channel.serve)
        stream = await engine(port, channel.register("run-1"))
        await wait_until(lambda: channel.connected("run-1"))
        async with trio.open_nursery() as both:
            both.start_soon(acknowledge, stream)
            assert await channel.send_intent("run-1", "cancel")
        channel.unregister("run-1")
        with trio.fail_after(5):
            assert await closed(stream), "the run's end closes its connection"
        assert channel.gate.held == 0
        nursery.cancel_scope.cancel()


async def test_a_flood_of_idle_connections_is_capped_and_timed_out(said: Said) -> None:
    """200 connections that never send a token: at most ``CONTROL_CAP`` are held, the rest
    closed at once, the held ones closed after the handshake timeout; the channel serves
    on, and a run's engine connects and acknowledges as usual."""
    timeout = 1.5
    channel = ControlChannel(gate=Gate("control", CONTROL_CAP, timeout))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(channel.serve)
        strangers = await flood(port, channel.gate, CONTROL_CAP)
        assert channel.gate.peak == CONTROL_CAP and channel.gate.held == 0
        assert channel.gate.timed_out == CONTROL_CAP and channel.gate.refused == STRANGERS - CONTROL_CAP
        assert timeout - 0.1 < max(strangers.closed_after) < timeout + strangers.connected_in + 1
        assert len(said.of("control.connections_capped")) == 1, "said once for the flood"
        for stream in strangers.streams:
            await stream.aclose()

        stream = await engine(port, channel.register("run-1"))
        await wait_until(lambda: channel.connected("run-1"))
        async with trio.open_nursery() as both:
            both.start_soon(acknowledge, stream)
            assert await channel.send_intent("run-1", "reschedule")
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_runs_connections_do_not_count_against_the_cap() -> None:
    """Ten runs' engines connect to a gate of 4: each is released from the gate as its
    token is read, so all ten hold their connection, and strangers are still capped."""
    channel = ControlChannel(gate=Gate("control", 4, 1.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(channel.serve)
        engines = [await engine(port, channel.register(f"run-{i}")) for i in range(10)]
        await wait_until(lambda: all(channel.connected(f"run-{i}") for i in range(10)))
        assert channel.gate.held == 0
        strangers = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
        await wait_until(lambda: channel.gate.refused == 16)
        assert channel.gate.held == 4
        await wait_until(lambda: channel.gate.timed_out == 4)
        assert all(channel.connected(f"run-{i}") for i in range(10)), "the runs' connections stay"
        async with trio.open_nursery() as all_:
            for stream in engines:
                all_.start_soon(acknowledge, stream)
            for i in range(10):
                assert await channel.send_intent(f"run-{i}", "cancel")
        for stream in engines + strangers:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_what_a_peer_does_never_ends_the_listener() -> None:
    """A reset before the token, garbage, a wrong token, a token used twice, a peer that
    closes at once: each costs its own connection only (a reset used to raise out of the
    listener and end the worker)."""
    channel = ControlChannel(gate=Gate("control", CONTROL_CAP, 1.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(channel.serve)
        for _ in range(5):
            raw = socket.create_connection(("127.0.0.1", port))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.send(b"partial tok")
            await trio.sleep(0.05)  # the server is reading it
            raw.close()  # RST
        for data in (b"\xff" * 300, b"no-such-token\n", b""):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            if data:
                await stream.send_all(data)
            else:
                await stream.send_eof()
            with trio.fail_after(5):
                assert await closed(stream), data
            await stream.aclose()
        env = channel.register("run-1")
        first = await engine(port, env)
        await wait_until(lambda: channel.connected("run-1"))
        second = await engine(port, env)
        with trio.fail_after(5):
            assert await closed(second), "a token is good for one connection"
        await wait_until(lambda: channel.gate.held == 0)
        async with trio.open_nursery() as both:
            both.start_soon(acknowledge, first)
            assert await channel.send_intent("run-1", "relinquish")
        for stream in (first, second):
            await stream.aclose()
        nursery.cancel_scope.cancel()
