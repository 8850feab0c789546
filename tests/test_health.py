"""The health rule and the h11 server (real sockets on loopback, the server in-process)."""

from __future__ import annotations

import os
import resource
import socket
from functools import partial

import httpx
import pytest
import trio

from tests.idle_flood import flood
from tests.said import Said
from worker.host import gate, health
from worker.host.gate import Gate


def test_rule_uses_total_seconds() -> None:
    assert health.is_healthy(now=1000, last_poll=800, started=0, query_seconds=10)
    assert not health.is_healthy(now=1000, last_poll=699, started=0, query_seconds=10)
    assert health.is_healthy(now=100, last_poll=None, started=0, query_seconds=10)
    # 1 day + 1 s stale: a `.seconds`-style bug would call this healthy
    assert not health.is_healthy(now=86401 + 1000, last_poll=1000, started=0, query_seconds=10)


async def test_server_answers() -> None:
    state = {"ok": True}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(health.serve, "127.0.0.1", 0, lambda: state["ok"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/health")
            assert (r.status_code, r.json()) == (200, {"message": "OK"})
            state["ok"] = False
            r = await client.get("/health")
            assert (r.status_code, r.json()) == (503, {"message": "Worker may be unresponsive at this time"})
            assert (await client.get("/other")).status_code == 404
            assert (await client.post("/health")).status_code == 405
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"NOT HTTP\r\n\r\n")
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 400")
        await stream.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- what strangers' connections may cost
# (issue 19: nothing capped or timed out idle connections)


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> Said:
    recorder = Said()
    monkeypatch.setattr(gate, "log", recorder)
    return recorder


async def get_health(port: int) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await client.get("/health")


async def test_a_flood_of_idle_connections_is_capped_then_timed_out(said: Said) -> None:
    """200 connections that never send a request: at most ``HEALTH_CAP`` held, the rest
    closed at once, the held ones after the idle timeout; then a probe is answered."""
    timeout = 1.5
    gate = Gate("health", health.HEALTH_CAP, timeout)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(health.serve, gate=gate), "127.0.0.1", 0, lambda: True)

        async def refused_at_the_cap() -> None:
            with pytest.raises(httpx.TransportError):
                await get_health(port)  # at the cap: a new connection is closed at once too

        idle = await flood(port, gate, health.HEALTH_CAP, refused_at_the_cap)
        assert gate.peak == health.HEALTH_CAP and gate.held == 0 and gate.timed_out == health.HEALTH_CAP
        assert timeout - 0.1 < max(idle.closed_after) < timeout + idle.connected_in + 1
        assert len(said.of("health.connections_capped")) == 1, "said once for the flood"
        r = await get_health(port)
        assert (r.status_code, r.json()) == (200, {"message": "OK"})
        for stream in idle.streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _limit_for(free: int) -> int:
    """An RLIMIT_NOFILE that leaves ``free`` descriptor numbers for new files."""
    in_use = set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            os.fstat(fd)  # the listing's own descriptor is closed by now
        except OSError:
            continue
        in_use.add(fd)
    limit = 0
    while free > 0:
        free -= limit not in in_use
        limit += 1
    return limit


async def test_running_out_of_descriptors_delays_connections_and_never_ends_the_server(said: Said) -> None:
    """``EMFILE`` on accept (a cap above what the process may open): said once, retried
    after a short pause; as held connections time out, the rest are accepted in turn,
    and a probe is answered again under the same limit."""
    timeout = 0.5
    gate = Gate("health", 64, timeout)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(health.serve, gate=gate), "127.0.0.1", 0, lambda: True)
        # connected without a checkpoint: all 40 wait in the listen queue
        waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_for(8), hard))
        try:
            await trio.sleep(timeout / 2)
            assert 0 < gate.held <= 8, gate.held
            with trio.fail_after(30):
                while gate.timed_out < 40:
                    await trio.sleep(0.05)
            assert gate.peak <= 8 and gate.refused == 0
            failed = said.of("health.accept_failed")
            assert len(failed) == 1 and failed[0]["error"].startswith("EMFILE"), failed
            probe = await trio.open_tcp_stream("127.0.0.1", port)
            await probe.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await probe.receive_some(100)).startswith(b"HTTP/1.1 200")
            await probe.aclose()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for sock in waiting:
                sock.close()
        nursery.cancel_scope.cancel()


async def test_a_bug_answering_costs_that_connection_only(said: Said) -> None:
    state = {"broken": True}

    def healthy() -> bool:
        if state["broken"]:
            raise RuntimeError("a bug")
        return True

    async with trio.open_nursery() as nursery:
        port = await nursery.start(health.serve, "127.0.0.1", 0, healthy)
        with pytest.raises(httpx.TransportError):
            await get_health(port)
        assert said.of("health.connection_error")[0]["error"] == "RuntimeError: a bug"
        state["broken"] = False
        assert (await get_health(port)).status_code == 200
        nursery.cancel_scope.cancel()
