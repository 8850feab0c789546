"""The worker channel's frames, checked against Prefect 3.9.1's own protocol models."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from worker.host.settings import Settings
from worker.prefect import channel, events
from worker.prefect.channel import ChannelUnavailable

wc = pytest.importorskip("prefect.client.schemas.worker_channel")


def test_the_url() -> None:
    assert (
        channel.channel_url("http://127.0.0.1:4200/api", "etl pool/1")
        == "ws://127.0.0.1:4200/api/work_pools/etl%20pool%2F1/workers/connect"
    )
    assert channel.channel_url("https://h/api/", "p") == "wss://h/api/work_pools/p/workers/connect"


@given(heartbeat=st.floats(0.01, 3600), queues=st.lists(st.text("abc-_", min_size=1), max_size=3))
def test_hello_and_heartbeat_are_what_prefect_accepts(heartbeat: float, queues: list[str]) -> None:
    s = Settings(pool="p", name="w 1", heartbeat_seconds=heartbeat, work_queues=tuple(queues))
    consumer = str(uuid.uuid4())
    hello = wc.validate_worker_channel_frame(json.loads(json.dumps(channel.hello(consumer, s))))
    assert isinstance(hello, wc.WorkerHelloFrame)
    assert hello.payload.worker_name == "w 1" and hello.payload.work_queue_names == queues
    assert hello.payload.heartbeat_interval_seconds >= 1
    assert set(hello.payload.requested_capabilities) == wc.REQUIRED_WORKER_CHANNEL_CAPABILITIES
    beat = channel.heartbeat(consumer, "w 1", channel.interval_of(s))
    assert isinstance(wc.validate_worker_channel_frame(beat), wc.WorkerHeartbeatFrame)


def ready(consumer: str, interval: int = 30) -> dict[str, object]:
    pool = {
        "id": str(uuid.uuid4()),
        "name": "p",
        "type": "process",
        "base_job_template": {"job_configuration": {}, "variables": {}},
        "is_paused": False,
        "storage_configuration": {},
        "default_queue_id": str(uuid.uuid4()),
        "status": "READY",
    }
    frame = {
        "type": "worker.ready.v1",
        "id": str(uuid.uuid4()),
        "sent_at": "2026-12-03T04:00:00+00:00",
        "payload": {
            "consumer_id": consumer,
            "worker_id": None,
            "selected_channel_version": channel.VERSION,
            "effective_heartbeat_interval_seconds": interval,
            "accepted_capabilities": list(channel.CAPABILITIES),
            "initial_snapshot": {"snapshot_sequence": 1, "reason": "initial", "work_pool": pool},
        },
    }
    wc.validate_worker_channel_frame(frame)  # a frame Prefect's server could send
    return frame


def test_the_ready_frame_gives_the_interval_and_the_pool() -> None:
    consumer = str(uuid.uuid4())
    interval, pool = channel.read_ready(json.dumps(ready(consumer, 15)), consumer)
    assert interval == 15 and pool.name == "p" and pool.status == "READY"
    with pytest.raises(ChannelUnavailable, match="not a ready frame"):
        channel.read_ready(json.dumps(ready(str(uuid.uuid4()))), consumer)  # another consumer's


def test_snapshots_and_strange_frames() -> None:
    frame = ready(str(uuid.uuid4()))
    snapshot = {"type": "work_pool.snapshot.v1", "payload": frame["payload"]["initial_snapshot"]}  # type: ignore[index]
    assert channel.read_snapshot(json.dumps(snapshot)).name == "p"
    for strange in ("not json", "[1]", json.dumps({"type": "cleanup.message.v1"})):
        with pytest.raises(ChannelUnavailable):
            channel.read_snapshot(strange)
    with pytest.raises(ChannelUnavailable, match="unknown shape"):
        channel.read_snapshot(json.dumps({"type": "work_pool.snapshot.v1", "payload": {"work_pool": 3}}))


def test_a_refused_upgrade_is_told_by_its_status() -> None:
    from trio_websocket import ConnectionRejected, HandshakeError

    assert events.rejected_status(ConnectionRejected(403, (), b"")) == 403  # a server before 3.8
    assert events.rejected_status(HandshakeError("reset")) is None


async def test_the_channel_against_a_server_that_speaks_it() -> None:
    """Heartbeats and snapshots over one connection; a transient close (1011) is
    reconnected, a final one (1008) turns the channel off (REST heartbeats)."""
    from trio_websocket import serve_websocket

    frames: list[object] = []
    connections = 0

    async def handler(request: Any) -> None:
        nonlocal connections
        connections += 1
        ws = await request.accept()
        assert json.loads(await ws.get_message()) == {"type": "auth", "token": None}
        await ws.send_message(json.dumps({"type": "auth_success"}))
        hello = wc.validate_worker_channel_frame(json.loads(await ws.get_message()))
        frames.append(hello)
        await ws.send_message(json.dumps(ready(str(hello.payload.consumer_id), 1)))
        beat = wc.validate_worker_channel_frame(json.loads(await ws.get_message()))
        frames.append(beat)
        snapshot = ready(str(hello.payload.consumer_id))["payload"]["initial_snapshot"]  # type: ignore[index]
        await ws.send_message(json.dumps({"type": "work_pool.snapshot.v1", "payload": snapshot}))
        frames.append(wc.validate_worker_channel_frame(json.loads(await ws.get_message())))
        await trio.sleep(
            0.3
        )  # the ping after it answered (trio-websocket's server pongs while closing: an error)
        await ws.aclose(1011 if connections == 1 else 1008, "bye")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        port = server.port
        pools: list[object] = []
        beats: list[float] = []
        s = Settings(pool="p", name="w", api_url=f"http://127.0.0.1:{port}/api", heartbeat_seconds=1)
        synced = trio.Event()
        synced.set()
        ch = channel.Channel(s, pools.append, beats.append, pause=lambda _: trio.sleep(0.05))
        with trio.fail_after(30):
            await ch.run(synced)
        nursery.cancel_scope.cancel()
    assert connections == 2 and ch.off is not None and "1008" in ch.off and not ch.up
    kinds = [type(f).__name__ for f in frames]
    assert kinds == ["WorkerHelloFrame", "WorkerHeartbeatFrame", "WorkerHeartbeatFrame"] * 2
    assert len(pools) == 4  # each ready frame, each snapshot
    assert len(beats) >= 4  # each hello (the server records one), each heartbeat answered
