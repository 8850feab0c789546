"""A busy server slows down the whole session (issue 22): the pure window (``retry.Busy``,
property tests) and the session's requests against a fake server (``throttle.py``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.host.settings import Settings
from worker.prefect.answers import ApiUnavailable
from worker.prefect.api import PrefectClient
from worker.rules.retry import Busy, RetryPolicy

B = Busy()
times = st.floats(min_value=0, max_value=1e6, allow_nan=False)
hints = st.one_of(st.none(), st.integers(min_value=0, max_value=1000).map(str), st.just("soon"))
answers = st.lists(st.tuples(st.floats(min_value=0, max_value=30), hints), max_size=30)


def replay(steps: list[tuple[float, str | None]], seed: int = 0) -> list[tuple[float, Busy]]:
    """(time, state) after each busy answer, the answers ``gap`` seconds apart."""
    rng, now, state, out = random.Random(seed), 0.0, Busy(), []
    for gap, hint in steps:
        now += gap
        state = state.told_busy(now, hint, rng)
        out.append((now, state))
    return out


@settings(max_examples=300, deadline=None)
@given(answers, st.integers())
def test_the_window_never_shrinks_and_is_bounded(steps: list[tuple[float, str | None]], seed: int) -> None:
    before = Busy()
    for now, state in replay(steps, seed):
        assert state.until >= before.until and state.strikes >= before.strikes >= 0
        assert 0 <= state.wait(now) <= max(B.policy.cap, B.policy.retry_after_cap) * (1 + B.policy.jitter)
        assert state.busy
        before = state


@settings(max_examples=300, deadline=None)
@given(times, st.integers(min_value=0, max_value=1000), answers)
def test_retry_after_is_never_cut_short(
    now: float, seconds: int, steps: list[tuple[float, str | None]]
) -> None:
    state = Busy()
    for _, s in replay(steps):
        state = s
    state = state.answered() if now < state.until else state
    told = state.told_busy(max(now, state.until), str(seconds))
    assert told.until >= max(now, state.until) + min(seconds, B.policy.retry_after_cap)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=200), times)
def test_answers_to_one_burst_open_one_window(n: int, now: float) -> None:
    state = Busy()
    for _ in range(n):
        state = state.told_busy(now)
    assert state.strikes == 1 and state.until <= now + B.policy.base * (1 + B.policy.jitter)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=40), st.integers())
def test_windows_grow_while_busy_and_reset_on_an_answer(n: int, seed: int) -> None:
    rng, now, state = random.Random(seed), 0.0, Busy()
    for k in range(n):
        now = state.until  # the probe, answered busy again at once
        state = state.told_busy(now, None, rng)
        raw = min(B.policy.cap, B.policy.base * 2**k)
        assert raw * (1 - B.policy.jitter) <= state.wait(now) <= raw * (1 + B.policy.jitter)
    assert state.strikes == n
    assert state.answered() == Busy() and not state.answered().busy


# ---------------------------------------------------------------- the session (fake server)


def client(handler: Callable[[httpx.Request], Any]) -> PrefectClient:
    s = Settings(pool="pool", api_url="http://prefect.test/api")
    return PrefectClient(
        s, httpx.AsyncClient(base_url=s.api_url + "/", transport=httpx.MockTransport(handler))
    )


def busy(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"detail": "database is locked"})


async def test_a_burst_against_a_busy_server_is_no_storm(autojump_clock: trio.abc.Clock) -> None:
    n, seen = 20, []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(trio.current_time())
        await trio.sleep(0.2)  # all of the burst is sent before the first answer
        return busy(request)

    c = client(handler)
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            await c.read_flow_run("r")
        except ApiUnavailable as exc:
            assert exc.status == 503
            failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    per_call = RetryPolicy().total + 1
    assert failed == n
    # the first burst (all sent before any answer), then one probe per window
    print(f"{n} calls, {len(seen)} requests, per-call retries alone: {n * per_call}")
    assert len(seen) <= n + 12, len(seen)
    assert len(seen) < n * per_call / 4


async def test_calm_again_after_an_answer(autojump_clock: trio.abc.Clock) -> None:
    answers = iter([503, 503, 200, 200, 200, 200])
    c = client(lambda r: httpx.Response(next(answers), json={}))
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(c.request, "GET", "flows/f")
    assert c.throttle.busy_answers == 2 and not c.throttle.state.busy


async def test_a_non_essential_write_waits_and_an_essential_one_goes_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    order: list[str] = []
    answers = iter([503, 503])

    def handler(request: httpx.Request) -> httpx.Response:
        order.append(f"{request.method} {request.url.path}")
        status = next(answers, 200)
        return httpx.Response(status, json={} if request.method == "GET" else None)

    c = client(handler)
    with pytest.raises(ApiUnavailable):  # a non-essential write told busy is not retried
        await c.update_labels("r", {"a": "b"})
    assert order == ["PATCH /api/flow_runs/r/labels"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.update_labels, "r", {"a": "b"})  # queued first, goes last
        await trio.sleep(0.01)
        assert len(order) == 1, "nothing goes out before the window ends"
        nursery.start_soon(c.request, "GET", "flows/f")
    assert order == [
        "PATCH /api/flow_runs/r/labels",
        "GET /api/flows/f",  # the probe: told busy, waits again
        "GET /api/flows/f",
        "PATCH /api/flow_runs/r/labels",
    ]


async def test_a_non_essential_write_gives_up_at_its_deadline(autojump_clock: trio.abc.Clock) -> None:
    c = client(busy)
    c.deadline = 5.0
    with pytest.raises(ApiUnavailable):
        await c.request("GET", "flows/f")
    sent = c.requests_sent
    with pytest.raises(ApiUnavailable) as caught:
        await c.request("POST", "logs/", json=[], essential=False)
    assert c.requests_sent == sent and caught.value.status == 503
    assert "busy" in str(caught.value)


async def test_retry_after_is_respected_by_every_request(autojump_clock: trio.abc.Clock) -> None:
    seen: list[float] = []
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"}, json={})])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(trio.current_time())
        return next(answers, None) or httpx.Response(200, json={})

    c = client(handler)
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.request, "GET", "flows/f")
        await trio.sleep(1)  # another request, started while the server says come back in 7 s
        nursery.start_soon(c.request, "GET", "flows/g")
    assert len(seen) == 3
    assert all(t - began >= 7 for t in seen[1:])


async def test_a_wait_past_the_deadline_fails_at_once(autojump_clock: trio.abc.Clock) -> None:
    c = client(lambda r: httpx.Response(503, headers={"Retry-After": "100"}, json={}))
    began = trio.current_time()
    with pytest.raises(ApiUnavailable) as caught:
        await c.request("GET", "flows/f")
    assert caught.value.status == 503 and trio.current_time() - began < 1
    with pytest.raises(ApiUnavailable) as caught:
        await c.request("GET", "flows/g")
    assert c.requests_sent == 1 and trio.current_time() - began < 1
