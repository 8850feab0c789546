"""The health rule and the h11 server (real sockets on loopback)."""

from __future__ import annotations

import httpx
import trio

from worker import health


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
