"""The worker's events go over ``/api/events/in`` as Prefect's clients send them (issue 22),
against the real server; ``POST /api/events`` where the websocket is refused."""

from __future__ import annotations

import functools
import uuid
from typing import Any

import httpx
import trio

from tests.conftest import Api, PrefectServer, wait_for
from worker.host.settings import Settings
from worker.prefect import ui
from worker.prefect.api import PrefectClient


class Recorded(httpx.AsyncBaseTransport):
    """A transport that records the paths of what goes through it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner, self.paths = inner, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(f"{request.method} {request.url.path}")
        return await self.inner.handle_async_request(request)


def run_resource(run_id: str) -> list[dict[str, str]]:
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": "r",
        }
    ]


async def ship_one(uplink: ui.Uplink, run_id: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(uplink.loop)
        await trio.sleep(0.1)
        uplink.add_event("prefect.worker.submitted-flow-run", run_resource(run_id))
        await uplink.ship()
        assert not uplink.events, "shipped"
        nursery.cancel_scope.cancel()


async def test_events_go_over_the_websocket(prefect_server: PrefectServer, api: Api) -> None:
    recorded = Recorded(httpx.AsyncHTTPTransport())
    client = PrefectClient.from_settings(Settings(pool="p", api_url=prefect_server.api_url), recorded)
    uplink = ui.Uplink(client, "uplink-test")
    run_id = str(uuid.uuid4())
    await ship_one(uplink, run_id)
    assert uplink.events_in is not None and not uplink.events_in.over_post
    assert recorded.paths == [], "nothing went by REST"
    await client.aclose()

    def arrived() -> list[dict[str, Any]]:
        found = api.call(
            "POST",
            "events/filter",
            {
                "filter": {
                    "any_resource": {"id": [f"prefect.flow-run.{run_id}"]},
                    "event": {"name": ["prefect.worker.submitted-flow-run"]},
                }
            },
        )
        return list(found["events"])

    (event,) = wait_for(arrived, 30, what="the event sent over /api/events/in")
    assert event["resource"]["prefect.resource.id"] == "prefect.worker.process.uplink-test"


async def test_a_refused_websocket_falls_back_to_post_once() -> None:
    upgrades = 0

    async def refuse(stream: trio.SocketStream) -> None:
        nonlocal upgrades
        upgrades += 1
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await stream.aclose()

    posted: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/events"
        posted.append(len(httpx.Response(200, content=request.content).json()))
        return httpx.Response(204)

    async with trio.open_nursery() as nursery:
        (listener, *_) = await nursery.start(functools.partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        api_url = f"http://127.0.0.1:{port}/api"
        client = PrefectClient.from_settings(
            Settings(pool="p", api_url=api_url), httpx.MockTransport(handler)
        )
        uplink = ui.Uplink(client, "uplink-test")
        await ship_one(uplink, str(uuid.uuid4()))
        assert uplink.events_in is not None and uplink.events_in.over_post
        assert "HTTP 404" in str(uplink.events_in.unopened)
        await ship_one(uplink, str(uuid.uuid4()))
        nursery.cancel_scope.cancel()
    assert posted == [1, 1] and upgrades == 1, "the websocket is tried once"
