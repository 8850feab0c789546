"""Liveness (``worker/service/liveness.py``): the verdict as a pure function on a fake clock, the
watchdog task, the status line, and the supervisor's poll and heartbeat loops against an
API that hangs, on trio's autojump clock (minutes of API hang in milliseconds)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from worker.books.ledger import Ledger
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.host.systemd import Notifier
from worker.prefect.answers import ApiNotFound, ApiUnavailable
from worker.prefect.outage import Outage
from worker.rules.models import WorkPool
from worker.runs.inhand import InHand
from worker.service import liveness
from worker.service.liveness import CALL_SECONDS, SLACK, Liveness, Step, overdue
from worker.service.status import SLOW_CALL_SECONDS, Status
from worker.service.supervisor import Supervisor

# ---------------------------------------------------------------- the verdict: a pure function


def test_nothing_to_judge_feeds() -> None:
    assert overdue(1e6, {}) == []


def test_a_step_within_its_bound_feeds_and_past_it_is_named() -> None:
    steps = {"poll": Step("call", "an API call", since=100.0, by=100.0 + CALL_SECONDS)}
    assert overdue(100.0 + CALL_SECONDS, steps) == []
    assert overdue(100.0 + CALL_SECONDS + 1, steps) == [
        f"the poll loop: an API call for {CALL_SECONDS + 1:.0f} s (bound {CALL_SECONDS:.0f} s)"
    ]


def test_waiting_is_never_overdue_and_every_late_loop_is_named() -> None:
    steps = {
        "poll": Step("wait", "waiting for the first sync", since=0.0),
        "heartbeat": Step("pause", "a pause of 30 s", since=0.0, by=40.0),
        "other": Step("call", "an API call", since=0.0, by=75.0),
    }
    assert overdue(1e9, {"poll": steps["poll"]}) == []
    assert [s.split(":")[0] for s in overdue(100.0, steps)] == ["the heartbeat loop", "the other loop"]


# ---------------------------------------------------------------- what the loops say, on a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_calls_pauses_waits_and_retirement_on_a_fake_clock() -> None:
    clock = Clock()
    live = Liveness(clock=clock)
    live.calls("heartbeat", 4)
    live.pause("poll", 10.0)
    clock.now = 10.0 + SLACK
    assert live.steps["poll"].what == "a pause of 10 s"
    assert overdue(clock.now, live.steps) == []
    clock.now += 1
    assert overdue(clock.now, live.steps) == [
        f"the poll loop: a pause of 10 s for {10 + SLACK + 1:.0f} s (bound 20 s)"
    ]
    live.calls("poll")  # the next poll began: a new word
    assert live.calling_since() == 0.0  # the heartbeat's sync began first
    clock.now = 4 * CALL_SECONDS + 1
    assert [s.split(":")[0] for s in overdue(clock.now, live.steps)] == [
        "the heartbeat loop",
        "the poll loop",
    ]
    live.waiting("poll", "a run to end")
    live.retire("heartbeat")
    assert overdue(clock.now, live.steps) == []
    assert live.calling_since() is None


async def test_judged_loop_that_fails_waits_for_its_restart_and_one_that_ends_is_retired() -> None:
    live = Liveness()

    async def buggy() -> None:
        live.calls("poll")
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await live.judged("poll", buggy)()
    assert live.steps["poll"].doing == "wait"  # guard.py restarts it after a backoff: not judged

    async def forever() -> None:
        live.pause("poll", 5)
        await trio.sleep_forever()

    with trio.move_on_after(0.01):  # the drain cancels the poll loop
        await live.judged("poll", forever)()
    assert "poll" not in live.steps

    async def ends() -> None:
        live.calls("poll")

    await live.judged("poll", ends)()
    assert "poll" not in live.steps


# ---------------------------------------------------------------- the task that feeds the watchdog


class Recorder(Notifier):
    """A notifier under a watchdog that records what it would send, with trio's time."""

    def __init__(self, watchdog_seconds: float | None = 60.0) -> None:
        super().__init__({"NOTIFY_SOCKET": "/nonexistent"})
        self.watchdog_seconds = watchdog_seconds
        self.sent: list[tuple[float, dict[str, Any]]] = []

    def send(self, **fields: Any) -> bool:
        self.sent.append((trio.current_time(), fields))
        return True

    def pings(self) -> list[float]:
        return [t for t, f in self.sent if "WATCHDOG" in f]

    def statuses(self) -> list[str]:
        return [str(f["STATUS"]) for _, f in self.sent if "STATUS" in f]


def max_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *[t for t in times if start <= t <= end], end]
    return max(b - a for a, b in itertools.pairwise(points))


async def test_watch_feeds_while_alive_stops_while_hung_and_resumes(autojump_clock: trio.abc.Clock) -> None:
    live, notifier = Liveness(), Recorder(watchdog_seconds=30.0)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.watch, notifier, lambda: "; ".join(live.hung) or "fine")
            live.calls("poll")
            await trio.sleep(CALL_SECONDS - 1)
            assert max_gap(notifier.pings(), 0, trio.current_time()) <= 10.0 + 1e-6  # WatchdogSec / 3
            hung_at = trio.current_time() + 1
            await trio.sleep(60)  # the call never returns
            assert not [t for t in notifier.pings() if t > hung_at + 10]
            assert notifier.statuses()[-1].startswith("the poll loop: an API call for")
            assert live.hung
            live.pause("poll", 10)  # it came back before systemd acted
            await trio.sleep(11)
            assert notifier.pings()[-1] > trio.current_time() - 10
            assert notifier.statuses()[-1] == "fine" and not live.hung
            nursery.cancel_scope.cancel()
    said = [(e["log_level"], e["event"]) for e in logs]
    assert said == [("error", "worker.hung"), ("warning", "worker.hang_ended")]  # once each


async def test_watch_without_a_watchdog_only_says_the_status_and_outside_systemd_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    notifier = Recorder(watchdog_seconds=None)
    with trio.move_on_after(35):
        await Liveness().watch(notifier, lambda: "fine")
    assert notifier.pings() == [] and notifier.statuses() == ["fine"] * 4  # every STATUS_SECONDS
    with trio.fail_after(1):
        await Liveness().watch(Notifier({}), lambda: "never")  # not under systemd: returns


# ---------------------------------------------------------------- the status line says the API hangs


async def test_status_says_how_long_the_api_has_not_answered(autojump_clock: trio.abc.Clock) -> None:
    outage, live = Outage(), Liveness()
    status = Status("p", 10.0, InHand(), outage, Metrics(), liveness=live)
    assert "API reachable" in status.line()
    began = trio.current_time()
    live.calls("poll")
    await trio.sleep(SLOW_CALL_SECONDS - 1)
    assert status.api() == "API reachable"  # a slow answer is not yet news
    await trio.sleep(liveness.API_DEADLINE - SLOW_CALL_SECONDS + 1)  # the call fails at its deadline
    assert status.api() == f"API NOT ANSWERING for {liveness.API_DEADLINE:.0f}s"
    outage.failed(ApiUnavailable("GET", "/x", None, "ReadTimeout"), "poll")
    live.pause("poll", 5)
    await trio.sleep(30)
    # said from the first call seen waiting, not from the failure at its deadline
    assert status.api() == f"API NOT ANSWERING for {trio.current_time() - began:.0f}s (1 failed calls)"
    assert "API NOT ANSWERING" in status.line()
    outage.succeeded()
    assert status.api() == "API reachable"
    outage.failed(ApiUnavailable("GET", "/x", 503, "busy"), "poll")
    await trio.sleep(7)
    assert status.api() == "API FAILING for 7s (1 failed calls)"


# ---------------------------------------------------------------- the supervisor's loops, API hung


class HungApi:
    """Every call waits: until ``deadline`` and then fails as api.py's total deadline
    makes it (``ApiUnavailable``), or forever (``deadline=inf``: a deadline that broke)."""

    fail_fast: Any = None

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.calls = 0

    async def _hang(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await trio.sleep(self.deadline)
        raise ApiUnavailable("GET", "/x", None, "ReadTimeout")

    read_work_pool = get_scheduled_flow_runs = send_heartbeat = filter_flow_runs = _hang

    async def probe(self) -> bool:
        await trio.sleep(2)
        return False


async def serve_loops(sup: Supervisor, seconds: float) -> dict[str, Step]:
    """The heartbeat and poll loops (as ``Supervisor.run`` starts them) and the watchdog
    task, for ``seconds`` of trio time; what the loops said last."""

    async def poll() -> None:
        async with trio.open_nursery() as runs:
            await sup.liveness.judged("poll", sup.poller.poll_loop)(runs)

    async with trio.open_nursery() as loops:
        loops.start_soon(sup.liveness.watch, sup.notifier, sup.status.line)
        loops.start_soon(sup.outage.probe_loop, sup.client)
        loops.start_soon(sup.liveness.judged("heartbeat", sup.heartbeat_loop))
        loops.start_soon(poll)
        await trio.sleep(seconds)
        steps = dict(sup.liveness.steps)
        loops.cancel_scope.cancel()
    return steps


def supervisor(tmp_path: Path, client: Any, notifier: Notifier) -> Supervisor:
    settings = Settings(pool="p", api_url="http://127.0.0.1:9/api", query_seconds=1, heartbeat_seconds=5)
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    return Supervisor(settings, client, ledger, notifier=notifier)


async def test_a_hung_api_is_an_outage_not_a_hung_worker(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Every call hangs to its 45 s deadline, for 5 minutes: the watchdog (60 s) is fed
    all along, and the status line says how long the API has not answered."""
    notifier = Recorder(watchdog_seconds=60.0)
    sup = supervisor(tmp_path, HungApi(liveness.API_DEADLINE), notifier)
    sup.status.synced.set()  # synced before the hang: the poll loop polls
    await serve_loops(sup, 300)
    assert max_gap(notifier.pings(), 0, 300) <= 20.0 + 1e-6
    assert not sup.liveness.hung
    said = [int(m[1]) for s in notifier.statuses() if (m := re.search(r"API NOT ANSWERING for (\d+)s", s))]
    assert said and said[-1] >= 280 - SLOW_CALL_SECONDS  # from the first call seen waiting
    assert said == sorted(said)


async def test_a_call_that_never_returns_stops_the_pings(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    notifier = Recorder(watchdog_seconds=60.0)
    sup = supervisor(tmp_path, HungApi(math.inf), notifier)
    sup.status.synced.set()
    steps = await serve_loops(sup, 290)
    assert CALL_SECONDS - 20.0 <= notifier.pings()[-1] <= CALL_SECONDS  # then no more
    assert notifier.statuses()[-1].startswith(
        "HUNG: the poll loop: an API call for 280 s (bound 75 s); 0 active runs"
    )
    # the heartbeat's word is 4 calls (the sync, the fence check): judged hung only at 300 s
    assert steps["heartbeat"].by == 4 * CALL_SECONDS


async def test_the_poll_loop_waiting_for_the_first_sync_is_not_judged(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Before the first sync the poll loop waits for the heartbeat loop, which is judged."""
    notifier = Recorder(watchdog_seconds=60.0)
    sup = supervisor(tmp_path, HungApi(liveness.API_DEADLINE), notifier)
    steps = await serve_loops(sup, 600)
    assert steps["poll"].doing == "wait"
    assert max_gap(notifier.pings(), 0, 600) <= 20.0 + 1e-6


class SlowSync:
    """The pool's read takes 1 s; the poll answers at once (404 while ``missing``)."""

    def __init__(self, missing: str = "") -> None:
        self.missing = missing
        self.polls: list[float] = []
        self.pool_read_at: float | None = None

    async def read_work_pool(self, name: str) -> WorkPool:
        self.pool_read_at = trio.current_time()
        await trio.sleep(1)
        self.missing = ""
        return WorkPool("pool-id", name, base_job_template={"job_configuration": {}, "variables": {}})

    async def send_heartbeat(self, *args: Any) -> None:
        await trio.sleep(0.01)

    async def get_scheduled_flow_runs(self, *args: Any) -> tuple[list[Any], list[Any]]:
        self.polls.append(trio.current_time())
        if self.missing == "404":
            raise ApiNotFound("POST", "/work_pools/p/get_scheduled_flow_runs", 404, "not found")
        if self.missing == "405":  # (the UI's address: the sync says what is wrong, in one line)
            raise ApiUnavailable("POST", "/work_pools/p/get_scheduled_flow_runs", 405, "Method Not Allowed")
        return [], []


@pytest.mark.parametrize("missing", ["", "404", "405"])
async def test_the_first_poll_goes_beside_the_first_sync_and_its_answer_waits_for_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock, missing: str
) -> None:
    """Start → first poll without the pool read's round trip first (issue 22); what the
    poll found waits for the sync (the pool's template); a first poll that failed (a pool
    not there yet, an API that answers strangely) is sent again once the sync is done,
    its failure unsaid (the sync says what is wrong)."""
    api = SlowSync(missing)
    sup = supervisor(tmp_path, api, Recorder(watchdog_seconds=60.0))
    async with trio.open_nursery() as loops:
        loops.start_soon(sup.heartbeat_loop)
        loops.start_soon(sup.poller.poll_loop, loops)
        await trio.sleep(0.5)
        assert api.pool_read_at == 0 and api.polls == [0], "the poll went out beside the pool read"
        assert not sup.poller.polled.is_set(), "its answer waits for the sync"
        await sup.poller.polled.wait()
        assert trio.current_time() >= 1 and sup.runner.pool is not None
        assert api.polls == ([0, 1] if missing else [0]), "polled again once the pool is there"
        assert "poll.not_found" not in sup.poller.once and sup.outage.failures == 0
        loops.cancel_scope.cancel()


async def test_the_drain_retires_the_poll_loop_and_the_pings_go_on(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The first SIGTERM cancels the poll loop (the drain): it is no longer judged, and the
    heartbeat loop alone keeps the watchdog fed, through an API outage too."""
    notifier = Recorder(watchdog_seconds=60.0)
    sup = supervisor(tmp_path, HungApi(liveness.API_DEADLINE), notifier)
    sup.status.synced.set()
    sup.in_hand.live["a-run"] = None  # a run being drained

    async def poll() -> None:
        async with trio.open_nursery() as runs:
            with sup.poll_scope:
                await sup.liveness.judged("poll", sup.poller.poll_loop)(runs)

    async with trio.open_nursery() as loops:
        loops.start_soon(sup.liveness.watch, sup.notifier, sup.status.line)
        loops.start_soon(sup.outage.probe_loop, sup.client)
        loops.start_soon(sup.liveness.judged("heartbeat", sup.heartbeat_loop))
        loops.start_soon(poll)
        await trio.sleep(30)
        sup.stopper.request("SIGTERM", loops)
        await trio.sleep(1)
        assert set(sup.liveness.steps) == {"heartbeat"}
        await trio.sleep(300)
        loops.cancel_scope.cancel()
    assert max_gap(notifier.pings(), 0, 331) <= 20.0 + 1e-6
    assert [f for _, f in notifier.sent if "EXTEND_TIMEOUT_USEC" in f]  # the stop timeout, extended
    assert notifier.statuses()[-1].startswith("draining, 1 active runs")
