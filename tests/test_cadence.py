"""When the idle loops look again (issue 22): the pure rules, then the loops on a mock clock."""

from __future__ import annotations

import datetime
import math
import random
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from worker.fleet.reclaim import Reclaimer, check_seconds, look_ceiling
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.prefect.outage import Outage
from worker.rules import cadence
from worker.rules.models import FlowRun, StateType, WorkerRecord
from worker.runs.inhand import InHand
from worker.service.cancelpoll import CancelPoll

# ---------------------------------------------------------------- the pure rules


def test_the_cancel_poll_backs_off_only_while_the_stream_is_steady() -> None:
    assert cadence.cancel_poll_pause(10, stream_steady=False) == 10
    assert cadence.cancel_poll_pause(10, stream_steady=True) == cadence.CANCEL_SAFETY_SECONDS
    assert cadence.cancel_poll_pause(600, stream_steady=True) == 600  # never more often than asked


def test_the_reclaim_intervals() -> None:
    s = Settings(pool="p")
    assert (check_seconds(s), look_ceiling(s)) == (5.0, 150.0)
    s = Settings(pool="p", query_seconds=2, reclaim_after=6)
    assert (check_seconds(s), look_ceiling(s)) == (2.0, 3.0)
    assert cadence.lost_after(300, 30) == 300
    assert cadence.lost_after(300, 200) == 600  # Prefect calls it ONLINE for 3 intervals
    assert cadence.lost_after(300, None) == 300


silences = st.lists(
    st.tuples(st.none() | st.floats(0, 10_000), st.floats(1, 1_000)),
    max_size=8,
)


@given(
    peers=silences,
    short=st.floats(0.5, 60),
    ceiling=st.floats(1, 600),
    linger=st.floats(0, 600),
)
def test_the_next_look_is_never_after_a_peer_could_be_lost(
    peers: list[tuple[float | None, float]], short: float, ceiling: float, linger: float
) -> None:
    wait = cadence.next_look(peers, short, ceiling, linger)
    assert min(short, ceiling) <= wait <= max(ceiling, short)
    for silent, limit in peers:
        if silent is None:
            continue
        if limit < silent <= limit + linger:
            assert wait == short  # one just lost: watched closely
        elif silent <= limit:
            # looked at within the margin of its line (or at the short interval)
            assert wait <= max(limit - silent + cadence.DEADLINE_MARGIN, short)


def test_an_idle_pool_of_live_peers_is_looked_at_rarely() -> None:
    peers = [(5.0, 300.0), (25.0, 300.0), (86_400.0, 300.0), (None, 300.0)]  # two alive, one long gone
    assert cadence.next_look(peers, 5, 150, 60) == 150
    assert cadence.next_look([(290.0, 300.0)], 5, 150, 60) == 11.5  # its deadline, and a margin
    assert cadence.next_look([(310.0, 300.0)], 5, 150, 60) == 5  # just lost: its runs, closely


# ---------------------------------------------------------------- the reclaim loop


EPOCH = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def server_time() -> datetime.datetime:
    return EPOCH + datetime.timedelta(seconds=trio.current_time())


class FakePool:
    """The pool's worker records as a server keeps them; peers that heartbeat until they die."""

    def __init__(self, peers: dict[str, float]) -> None:
        self.interval = 30.0
        self.death: dict[str, float] = peers  # name -> trio time of death (inf: never)
        self.reads: list[float] = []
        self.sweeps: list[float] = []
        self.born: dict[str, float] = {}  # name -> trio time it joins (absent: from the start)

    def last_beat(self, name: str) -> float:
        now = min(trio.current_time(), self.death[name])
        return now - now % self.interval  # every `interval`, on the dot

    async def read_workers(self, pool: str) -> tuple[list[WorkerRecord], datetime.datetime]:
        self.reads.append(trio.current_time())
        records = [
            WorkerRecord(
                name,
                (EPOCH + datetime.timedelta(seconds=self.last_beat(name))).isoformat(),
                self.interval,
            )
            for name in self.death
            if self.born.get(name, -math.inf) <= trio.current_time()
        ]
        return records, server_time()

    async def pool_flow_runs(self, pool: str, states: Any) -> list[FlowRun]:
        self.sweeps.append(trio.current_time())
        return []


def reclaimer(pool: FakePool, **settings: Any) -> Reclaimer:
    s = Settings(pool="p", name="me", **settings)
    metrics = Metrics()
    return Reclaimer(s, pool, Outage(metrics=metrics), metrics, set, rng=random.Random(7))  # type: ignore[arg-type]


async def test_an_idle_fleet_costs_a_few_looks_an_hour(autojump_clock: trio.testing.MockClock) -> None:
    pool = FakePool({"me": float("inf"), "peer-1": float("inf"), "peer-2": float("inf")})
    synced = trio.Event()
    synced.set()
    with trio.move_on_after(3600):
        await reclaimer(pool).loop(synced)
    # every half poll interval (5 s) was 720 looks an hour; now every 150 s (with jitter)
    assert 20 <= len(pool.reads) <= 25, len(pool.reads)
    assert 20 <= len(pool.sweeps) <= 25


async def test_a_lone_worker_looks_once_per_reclaim_after_and_still_catches_a_newcomer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Alone in its pool, nothing can be reclaimed (only from a worker the pool lists as
    silent): one read of the pool's workers per ``reclaim_after``, no sweep of its runs.
    A peer that joins after a look and dies at once is still looked at as it crosses its
    line, and its runs are read."""
    pool = FakePool({"me": float("inf")})
    synced = trio.Event()
    synced.set()
    with trio.move_on_after(3600):
        await reclaimer(pool).loop(synced)
    assert 11 <= len(pool.reads) <= 13, len(pool.reads)  # every 300 s: 2 requests/10 min were 8
    assert pool.sweeps == []
    joins, dies_at = 3601.0, 3625.0
    pool.death["peer"] = dies_at
    pool.born = {"peer": joins}
    with trio.move_on_after(900):
        await reclaimer(pool).loop(synced)
    lost_at = pool.last_beat("peer") + 300
    first_look_after = min(t for t in pool.reads if t > lost_at)
    assert first_look_after - lost_at <= cadence.DEADLINE_MARGIN + 1.0 + 1.0
    assert any(lost_at < t <= lost_at + 10 for t in pool.sweeps), "its runs were read"


async def test_a_lone_worker_with_a_steady_stream_skips_its_looks_until_it_hears_of_a_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 22 (idle requests): alone in its pool, with the events stream up since before
    its look, a worker looks again only when the stream tells of a claim of a run not
    its own, when the stream drops, or after ``ALONE_SAFETY_SECONDS``. A newcomer heard of
    through its claim, which then dies, is still looked at as it crosses its line."""
    pool = FakePool({"me": float("inf")})
    r = reclaimer(pool)
    r.ours = lambda: {"mine"}
    synced = trio.Event()
    synced.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.loop, synced)
        await trio.sleep(3)
        assert pool.reads == [], "the first look waits for the stream (at most FIRST_LOOK_WAIT)"
        r.connected(True)
        await trio.sleep(1)
        assert len(pool.reads) == 1
        await trio.sleep(1000)
        r.claimed("mine")  # its own claim tells of no peer
        await trio.sleep(2590)
        assert len(pool.reads) == 1, pool.reads  # an hour: no look but the first
        await trio.sleep(30)
        assert len(pool.reads) == 2, "the safety look, an hour after the last"
        # a newcomer claims a run, and dies 25 s later: looked at right away, and at its line
        joins = trio.current_time() + 400  # (past reclaim_after after the last look)
        pool.born = {"peer": joins}
        pool.death["peer"] = joins + 25
        await trio.sleep_until(joins + 1)
        assert len(pool.reads) == 2
        r.claimed("theirs")
        await trio.sleep(1)
        assert len(pool.reads) == 3 and pool.reads[-1] >= joins + 1, "heard of: looked at now"
        await trio.sleep(400)
        lost_at = pool.last_beat("peer") + 300
        first_look_after = min(t for t in pool.reads if t > lost_at)
        assert first_look_after - lost_at <= cadence.DEADLINE_MARGIN + 1.0 + 1.0
        assert any(lost_at < t <= lost_at + 10 for t in pool.sweeps), "its runs were read"
        nursery.cancel_scope.cancel()


async def test_a_lone_worker_looks_again_after_its_stream_drops_and_not_before_reclaim_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stream that drops (events may have been missed) brings back the look every
    ``reclaim_after``; a claim heard of soon after a look waits for ``reclaim_after``
    after that look (a newcomer cannot cross its line sooner)."""
    pool = FakePool({"me": float("inf")})
    r = reclaimer(pool)
    synced = trio.Event()
    synced.set()
    async with trio.open_nursery() as nursery:
        r.connected(True)
        nursery.start_soon(r.loop, synced)
        await trio.sleep(700)
        assert len(pool.reads) == 1
        r.connected(False)
        r.connected(True)
        await trio.sleep(250)  # the look that was skipped at 600 s is due at 900 s
        assert len(pool.reads) == 2 and 900 <= pool.reads[-1] <= 902, pool.reads
        await trio.sleep(10)
        r.claimed("theirs")
        await trio.sleep(100)
        assert len(pool.reads) == 2, "no sooner than reclaim_after after the look"
        await trio.sleep(200)
        assert len(pool.reads) == 3 and pool.reads[-1] - pool.reads[-2] < 302, pool.reads
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("dies_at", [100.0, 431.0, 1000.0, 1013.0])
async def test_a_dead_peer_is_looked_at_as_it_crosses_its_line(
    autojump_clock: trio.testing.MockClock, dies_at: float
) -> None:
    """The bound of the dead-host test: resolved within reclaim_after plus one poll
    interval of the peer's last heartbeat (here: the look that reads its runs)."""
    pool = FakePool({"me": float("inf"), "peer": dies_at})
    synced = trio.Event()
    synced.set()
    with trio.move_on_after(dies_at + 700):
        await reclaimer(pool).loop(synced)
    last = pool.last_beat("peer")
    lost_at = last + 300
    first_look_after = min(t for t in pool.reads if t > lost_at)
    assert first_look_after - lost_at <= cadence.DEADLINE_MARGIN + 1.0 + 1.0  # margin, jitter, clock
    assert any(lost_at < t <= lost_at + 10 for t in pool.sweeps), "its runs were read"


# ---------------------------------------------------------------- the cancellation poll


class FakeRuns:
    def __init__(self) -> None:
        self.reads: list[float] = []
        self.cancelling: set[str] = set()

    async def filter_flow_runs(self, ids: list[str], states: list[StateType]) -> list[FlowRun]:
        self.reads.append(trio.current_time())
        return [FlowRun(id=i, name=i) for i in ids if i in self.cancelling]


class FakeHandle:
    stop_requested = False
    pid = 1

    def __init__(self) -> None:
        self.log = self

    def info(self, *args: Any, **kwargs: Any) -> None:
        pass

    def cancel(self, reason: str) -> None:
        self.stop_requested = True


async def test_the_cancel_poll_backs_off_while_the_stream_is_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs, in_hand = FakeRuns(), InHand()
    in_hand.live["run-1"] = FakeHandle()  # type: ignore[assignment]
    s = Settings(pool="p", cancel_poll_seconds=10)
    poll = CancelPoll(s, runs, in_hand, Outage(metrics=Metrics()), random.Random(3))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll.loop)
        await trio.sleep(60)
        assert 5 <= len(runs.reads) <= 8, "the stream is down: every 10 s"
        poll.connected(True)
        await trio.sleep(25)  # one more look at 10 s: the stream came up after the last one
        before = len(runs.reads)
        await trio.sleep(600)
        assert len(runs.reads) - before <= 600 / (0.7 * cadence.CANCEL_SAFETY_SECONDS) + 1
        assert len(runs.reads) - before >= 3, "a safety net all the same"
        poll.connected(False)
        dropped = trio.current_time()
        runs.cancelling.add("run-1")
        await trio.sleep(14)
        assert runs.reads[-1] >= dropped, "back to cancel_poll_seconds the moment the stream drops"
        assert in_hand.live["run-1"].stop_requested  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_a_cancel_event_that_could_not_be_checked_brings_the_poll_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Review of issue 22: when the read confirming a CANCELLING event fails (a busy
    server), the poll looks again within ``cancel_poll_seconds``, not its safety interval."""
    runs, in_hand = FakeRuns(), InHand()
    in_hand.live["run-1"] = FakeHandle()  # type: ignore[assignment]
    s = Settings(pool="p", cancel_poll_seconds=10)
    poll = CancelPoll(s, runs, in_hand, Outage(metrics=Metrics()), random.Random(3))  # type: ignore[arg-type]
    poll.connected(True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll.loop)
        await trio.sleep(300)  # steady: looks at the safety interval
        runs.cancelling.add("run-1")
        poll.unchecked()
        asked = trio.current_time()
        await trio.sleep(15)
        assert runs.reads[-1] >= asked and in_hand.live["run-1"].stop_requested  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
