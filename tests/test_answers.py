"""Answers are data, not code paths (issue 19), without a server: every strange answer from
any endpoint is a ProtocolError that says what came back and from where; event frames of any
shape are skipped; a CANCELLING event is acted on only once the run's state confirms it; no
call outlasts its total deadline."""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import structlog
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import serve_websocket

from worker.host.settings import Settings
from worker.prefect import events
from worker.prefect.answers import HTML_HINT, ApiNoAnswer, ApiNotFound, ApiUnavailable
from worker.prefect.api import PrefectClient
from worker.prefect.outage import REPEAT_SECONDS, Outage
from worker.prefect.session import CALL_DEADLINE
from worker.rules.models import (
    Deployment,
    Flow,
    FlowRun,
    OrchestrationResult,
    ProtocolError,
    State,
    StateType,
    WorkerRecord,
    WorkPool,
    structure,
)
from worker.rules.retry import RetryPolicy

RUN = "0b3c1f36-5b0c-4e5e-9a44-6a0f3a6d1e11"
Handler = Callable[[httpx.Request], Any]


def client(handler: Handler, url: str = "http://prefect.test/api") -> PrefectClient:
    s = Settings(pool="pool", api_url=url)
    return PrefectClient(
        s, httpx.AsyncClient(base_url=s.api_url + "/", transport=httpx.MockTransport(handler))
    )


def answering(status: int, content_type: str | None, body: bytes) -> Handler:
    headers = {"content-type": content_type} if content_type else {}
    return lambda request: httpx.Response(status, headers=headers, content=body)


CALLS: dict[str, Callable[[PrefectClient], Awaitable[Any]]] = {
    "read_work_pool": lambda c: c.read_work_pool("pool"),
    "create_work_pool": lambda c: c.create_work_pool("pool"),
    "send_heartbeat": lambda c: c.send_heartbeat("pool", "w", 30),
    "get_scheduled_flow_runs": lambda c: c.get_scheduled_flow_runs("pool", [], datetime.datetime.now()),
    "read_deployment": lambda c: c.read_deployment(RUN),
    "read_flow": lambda c: c.read_flow(RUN),
    "read_flow_run": lambda c: c.read_flow_run(RUN),
    "read_flow_run_states": lambda c: c.read_flow_run_states(RUN),
    "filter_flow_runs": lambda c: c.filter_flow_runs([RUN]),
    "read_workers": lambda c: c.read_workers("pool"),
    "pool_flow_runs": lambda c: c.pool_flow_runs("pool", [StateType.RUNNING]),
    "set_flow_run_state": lambda c: c.set_flow_run_state(RUN, StateType.PENDING, "Pending"),
    "set_infrastructure_pid": lambda c: c.set_infrastructure_pid(RUN, 1),
    "update_labels": lambda c: c.update_labels(RUN, {"a": "b"}),
    "read_block_document_by_id": lambda c: c.read_block_document_by_id(RUN),
    "read_block_document_by_name": lambda c: c.read_block_document_by_name("s", "n"),
    "read_variable_value": lambda c: c.read_variable_value("v"),
}
READS = [name for name in CALLS if name not in ("send_heartbeat", "set_infrastructure_pid", "update_labels")]

HTML = (
    b"<!DOCTYPE html>\n<html><head><title>Prefect Server</title></head><body>"
    + b"x" * 500
    + b"</body></html>"
)
BAD_BODIES = [  # (status, content type, body): not one of them is an answer the API gives
    (200, "text/html; charset=utf-8", HTML),
    (200, "application/json", HTML),  # a page that lies about its type
    (200, "application/json", b'{"id": "truncated'),
    (200, "application/json", b""),
    (200, "application/json", b"\xff\xfe\x00garbage"),
    (200, "application/json", b"[" * 100_000),  # deeper than the parser's recursion
    (200, "application/json", b"1" * 5000),  # an integer Python refuses to parse
    (200, "application/json", b'"a string"'),
    (200, "application/json", b"null"),
    (200, "application/json", b"42"),
    (200, "application/json", b'[1, "x", null]'),
    (201, None, b"<html>"),
    (404, "text/html", b"<html>not here</html>"),  # a UI's 404 page, not the API's JSON 404
    (302, "text/html", b"<a href='/login'>login</a>"),
]


@pytest.mark.parametrize("status,content_type,body", BAD_BODIES)
async def test_every_read_raises_a_protocol_error_for_a_bad_body(
    status: int, content_type: str | None, body: bytes
) -> None:
    c = client(answering(status, content_type, body))
    for name in READS:
        if name == "get_scheduled_flow_runs" and body.startswith(b"[1,"):
            assert len((await CALLS[name](c))[1]) == 3  # rows not read cost those rows only
            continue
        with pytest.raises(ProtocolError) as caught:
            await CALLS[name](c)
        message = str(caught.value)
        assert f"answered {status}" in message and "/api/" in message, (name, message)
        quoted = message.rsplit(": ", 1)[-1]
        assert len(quoted) <= 122, (name, quoted)  # the excerpt, in quotes
        if b"<" in body[:1]:
            assert caught.value.hint == HTML_HINT, name


async def test_a_web_page_answer_says_what_where_and_the_hint() -> None:
    c = client(answering(200, "text/html; charset=utf-8", HTML))
    with pytest.raises(ProtocolError) as caught:
        await c.read_work_pool("pool")
    assert str(caught.value).startswith(
        "GET /api/work_pools/pool answered 200 (text/html; charset=utf-8) with a web page, not JSON: "
        "'<!DOCTYPE html> <html><head><title>Prefect Server</title>"
    )
    assert "is PREFECT_API_URL the UI's address? the API is under /api" in (caught.value.hint or "")
    assert caught.value.endpoint == "GET /api/work_pools/pool"
    for name in ("send_heartbeat", "update_labels"):  # bodies not read are still not web pages
        with pytest.raises(ProtocolError):
            await CALLS[name](c)


async def test_a_404_naming_no_object_at_an_address_without_api_says_so() -> None:
    route = answering(404, "application/json", b'{"detail": "Not Found"}')
    with pytest.raises(ApiNotFound) as caught:
        await client(route, "http://prefect.test").create_work_pool("pool")
    assert "is PREFECT_API_URL the UI's address? the API is under /api" in (caught.value.hint or "")
    with pytest.raises(ApiNotFound) as caught:
        await client(route).create_work_pool("pool")  # under /api: an older server's missing route
    assert caught.value.hint is None
    missing = answering(404, "application/json", b'{"detail": "Flow run not found"}')
    assert await client(missing, "http://prefect.test").read_flow_run(RUN) is None


async def test_the_endpoint_leaves_ids_out_and_good_answers_are_heard() -> None:
    heard: list[str] = []
    c = client(answering(200, "application/json", b"[]"))
    c.answered = heard.append
    assert await c.read_flow_run_states(RUN) == []
    await c.update_labels(RUN, {})
    assert heard == ["GET /api/flow_run_states/", "PATCH /api/flow_runs/{id}/labels"]
    with pytest.raises(ProtocolError) as caught:
        await c.read_flow_run(RUN)  # [] is not a flow run
    assert caught.value.endpoint == "GET /api/flow_runs/{id}"
    assert len(heard) == 2


async def test_a_row_that_is_not_an_object_costs_that_row_of_a_poll_only() -> None:
    good = {"flow_run": {"id": RUN, "state": {"type": "SCHEDULED", "name": "Scheduled"}}}
    body = json.dumps([good, "junk", {"flow_run": [1]}, {"flow_run": {"id": 5}}]).encode()
    c = client(answering(200, "application/json", body))
    runs, problems = await CALLS["get_scheduled_flow_runs"](c)
    assert [r.id for r in runs] == [RUN, "5"]
    assert [run_id for run_id, _ in problems] == [None, None]


@pytest.mark.parametrize("payload", ["a string", ["a", "list"], 3, None, True, {"x": 1}])
@pytest.mark.parametrize(
    "cls", [FlowRun, State, WorkPool, Deployment, Flow, WorkerRecord, OrchestrationResult]
)
def test_structure_maps_any_payload_that_does_not_fit_to_a_protocol_error(payload: Any, cls: type) -> None:
    with pytest.raises(ProtocolError):
        structure(payload, cls)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=30,
)
EVENT_KEYS = st.sampled_from(
    [
        "type",
        "event",
        "resource",
        "prefect.resource.id",
        "prefect.state-type",
        "id",
        "flow_run",
        "state",
        "status",
    ]
)
SHAPED = st.recursive(  # JSON that often has the keys the code looks for
    st.none() | st.integers() | st.sampled_from(["event", "prefect.flow-run.x", "CANCELLING", "ACCEPT", RUN]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(EVENT_KEYS, children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON, SHAPED, st.builds(lambda e: {"type": "event", "event": e}, JSON | SHAPED)))
def test_classify_is_total_over_any_json(frame: Any) -> None:
    seen = events.classify(frame)
    assert seen is None or (isinstance(seen[0], str) and isinstance(seen[1], str) and seen[1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(
        JSON.map(lambda v: json.dumps(v).encode()),
        SHAPED.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40),
    ),
    content_type=st.sampled_from(["application/json", "text/html", "text/plain", None]),
    name=st.sampled_from(sorted(CALLS)),
)
def test_an_answer_of_any_shape_is_read_or_is_a_protocol_error(
    body: bytes, content_type: str | None, name: str
) -> None:
    async def call() -> None:
        try:
            await CALLS[name](client(answering(200, content_type, body)))
        except ProtocolError:
            pass

    trio.run(call)


# ---------------------------------------------------------------- the outage says it once per endpoint


async def test_a_strange_endpoint_is_said_once_per_episode_with_the_hint(
    autojump_clock: trio.abc.Clock,
) -> None:
    outage = Outage()
    key = "GET /api/work_pools/p"
    html = ProtocolError("GET /api/work_pools/p answered 200 ...", hint=HTML_HINT, endpoint=key)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            outage.failed(html, "sync")
            outage.succeeded()  # other endpoints answer meanwhile: still one episode
        outage.answered(key)
        outage.answered(key)
        await trio.sleep(10)
        outage.failed(html, "sync")  # it flaps: another episode, soon after the last one said
        outage.answered(key)
        await trio.sleep(REPEAT_SECONDS)
        outage.failed(html, "sync")  # a new story
    assert outage.failing_since is None and not outage.unreachable
    said = [(e["log_level"], e["event"]) for e in logs if e["log_level"] != "debug"]
    assert said == [
        ("warning", "api.unexpected_answer"),
        ("info", "api.answers_expected"),
        ("warning", "api.unexpected_answer"),
    ]
    assert logs[0]["hint"] == HTML_HINT and "exc_info" not in logs[0]
    assert [e["unexpected_answers"] for e in logs if e["event"] == "api.answers_expected"] == [5, 1]


def test_backoff_grows_while_an_endpoint_answers_strangely() -> None:
    async def main() -> None:
        outage = Outage()
        for _ in range(8):
            outage.failed(ProtocolError("x", endpoint="POST /api/x"), "sync")
            outage.succeeded()
        assert outage.delay() >= 48.0  # 60 s, jittered: a success elsewhere does not reset it

    trio.run(main)


# ---------------------------------------------------------------- the total deadline


async def test_a_hung_server_is_given_up_on_at_the_deadline(autojump_clock: trio.abc.Clock) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    c = client(hang)
    began = trio.current_time()
    with pytest.raises(ApiNoAnswer) as caught:
        await c.read_work_pool("pool")
    assert trio.current_time() - began == pytest.approx(CALL_DEADLINE)
    assert caught.value.status is None  # as unreachable: the probe, not a minute's backoff
    assert str(caught.value) == f"GET /work_pools/pool: no answer within {CALL_DEADLINE:g} s"


async def test_retries_stop_before_the_deadline(autojump_clock: trio.abc.Clock) -> None:
    c = client(answering(503, "application/json", b'{"detail": "busy"}'))
    c.retry = RetryPolicy(total=50, base=10.0, cap=10.0)
    began = trio.current_time()
    with pytest.raises(ApiUnavailable) as caught:
        await c.send_heartbeat("pool", "w", 30)
    assert caught.value.status == 503  # said as busy, not as hung
    assert trio.current_time() - began < CALL_DEADLINE


def test_the_per_request_timeout_is_within_the_deadline() -> None:
    def timeout(seconds: float) -> float | None:
        s = Settings(pool="pool", api_url="http://prefect.test/api", api_request_timeout=seconds)
        return PrefectClient.from_settings(s).http.timeout.read

    assert (timeout(60), timeout(5)) == (CALL_DEADLINE, 5)


# ---------------------------------------------------------------- cancel events are hints


async def test_a_cancelling_event_cancels_only_what_the_server_confirms() -> None:
    states = {"running": StateType.RUNNING, "cancelling": StateType.CANCELLING, "failing": None}
    reads: list[str] = []
    cancelled: list[str] = []

    async def read(run_id: str) -> FlowRun | None:
        reads.append(run_id)
        await trio.sleep(0.01)
        if states[run_id] is None:
            raise ApiUnavailable("GET", f"/flow_runs/{run_id}", 503, "busy")
        return FlowRun(run_id, state=State(states[run_id]))

    async with trio.open_nursery() as nursery:
        check = events.CancelCheck(read, lambda r: r in states, cancelled.append, nursery)
        for run_id in ("not-ours", "running", "cancelling", "cancelling", "failing"):
            check.heard(run_id)
    # none for others' runs; a confirmed or failed read once; a run still RUNNING read again
    # for a while (a server may publish the event before a read sees it), then left running
    assert reads.count("cancelling") == 1 and reads.count("failing") == 1 and "not-ours" not in reads
    assert reads.count("running") == len(events.CONFIRM_DELAYS)
    assert cancelled == ["cancelling"]


async def test_a_cancelling_event_seen_before_the_state_is_confirmed_by_a_later_read() -> None:
    answers = [StateType.RUNNING, StateType.RUNNING, StateType.CANCELLING]
    cancelled: list[str] = []

    async def read(run_id: str) -> FlowRun | None:
        return FlowRun(run_id, state=State(answers.pop(0)))

    async with trio.open_nursery() as nursery:
        events.CancelCheck(read, lambda r: True, cancelled.append, nursery).heard("late")
    assert cancelled == ["late"] and not answers


async def test_the_stream_skips_frames_of_any_shape() -> None:
    junk = [
        "not json",
        "[" * 100_000,
        "[1, 2]",
        '"event"',
        '{"type": "event", "event": "a string"}',
        '{"type": "event", "event": {"resource": []}}',
        '{"type": "event", "event": {"resource": {"prefect.resource.id": 5}}}',
        json.dumps(
            {"type": "event", "event": {"resource": {"prefect.resource.id": RUN, "prefect.state-type": {}}}}
        ),
    ]
    scheduled = trio.Event()

    async def server(request: Any) -> None:
        ws = await request.accept(subprotocol="prefect")
        await ws.get_message()  # auth
        await ws.send_message('{"type": "auth_success"}')
        await ws.get_message()  # filter
        for frame in junk:
            await ws.send_message(frame)
        event = {
            "resource": {"prefect.resource.id": f"prefect.flow-run.{RUN}", "prefect.state-type": "SCHEDULED"}
        }
        await ws.send_message(json.dumps({"type": "event", "event": event}))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = (await nursery.start(serve_websocket, server, "127.0.0.1", 0, None)).port
        s = Settings(pool="pool", api_url=f"http://127.0.0.1:{port}/api")
        connected: list[bool] = []
        with structlog.testing.capture_logs() as logs:
            nursery.start_soon(
                events.stream,
                s,
                lambda: "pool-id",
                lambda r: scheduled.set(),
                lambda r: None,
                connected.append,
            )
            with trio.fail_after(10):
                await scheduled.wait()
        nursery.cancel_scope.cancel()
    assert connected == [True], "one connection: no frame tore it down"
    skipped = [e["log_level"] for e in logs if e["event"] == "events.frame_skipped"]
    assert skipped == ["info", "debug"]
