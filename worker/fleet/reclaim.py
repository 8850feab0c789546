"""A fleet's two loops: reclaim a lost peer's runs, and fence this worker after a gap.

The decisions are the tables in ``fleet.py``; this module does the I/O around them.

* :class:`Reclaimer` — when a peer seen at the last look could cross its line, at the
  latest every ``look_ceiling`` (``cadence.next_look``; jittered, so peers do not act in
  step; alone in its pool, see ``Reclaimer.quiet``): read the pool's workers (with the
  server's clock) and, when one has just gone
  silent or a sweep is due, its PENDING, RUNNING and CANCELLING runs, and resolve each
  run ``fleet.reclaim_verdict`` says is lost. The
  proposal's transition id is derived from the state it replaces (``uuid5``), so a
  second peer proposing the same transition is rejected by the server; a reclaim that
  displaced a state newer than the one read is undone (``fleet.reclaim_raced``).
* :class:`Fencer` — remembers when the last heartbeat got through. After a gap of
  ``FENCE_SHARE * reclaim_after`` it checks, once the API answers, every run it holds
  (``fleet.fence_verdict``): runs a peer resolved are stopped with the ``relinquish``
  intent and reported to no one; claimed runs wait for that check before they start.
"""

from __future__ import annotations

import datetime
import math
import random
import time
import uuid
from collections.abc import Callable, Container, Mapping
from typing import Any, Final

import attrs
import structlog
import trio

from worker.books.ledger import Entry
from worker.books.reporter import run_logger
from worker.host.logs import Once
from worker.host.metrics import Metrics
from worker.host.settings import Settings
from worker.prefect.api import PrefectClient
from worker.prefect.outage import API_ERRORS, Outage
from worker.process.handle import Supervised
from worker.rules import cadence, fleet
from worker.rules.fleet import Reclaim
from worker.rules.models import FlowRun, StateType, WorkerRecord

log = structlog.get_logger("flow_worker")

RECLAIM_NAMESPACE: Final = uuid.UUID("5b0f3c1e-0d7a-4f55-9d38-f10e3a1c1a1d")
"""Transition ids of reclaims are ``uuid5(RECLAIM_NAMESPACE, "<run id>/<state id>")``:
every peer derives the same id for the same transition, and the server refuses a
transition that the run has just made ("This run has already made this state transition")."""

_PROPOSALS: Final = {
    Reclaim.RESCHEDULE: (StateType.SCHEDULED, "Scheduled", False),
    Reclaim.CRASH: (StateType.CRASHED, "Crashed", False),
    Reclaim.CANCEL: (StateType.CANCELLED, "Cancelled", True),
}


MIN_CHECK_SECONDS: Final = 2.0
"""A worker with a very short poll interval still does not ask about its peers more than
every 2 s: that traffic would compete with claims on a busy (SQLite) server."""


def check_seconds(settings: Settings) -> float:
    """The short interval between looks: half a poll interval (at least
    ``MIN_CHECK_SECONDS``, at most ``reclaim_after``). The loop looks this often only
    while a peer has just gone silent (its runs are being resolved) or after a failed
    look; a peer's deadline is looked at no sooner than this after the previous look."""
    return min(max(settings.query_seconds / 2, MIN_CHECK_SECONDS), settings.reclaim_after)


def look_ceiling(settings: Settings) -> float:
    """The longest time between two looks at the pool, and between two sweeps of its
    runs: half of ``reclaim_after``.

    Why it is enough (issue 22: the look every half poll interval was 12 of an idle
    worker's 22 requests a minute): between looks, the loop sleeps until the first peer
    it saw could cross its line (``cadence.next_look``), so a peer that dies is looked at
    within ``DEADLINE_MARGIN`` plus the jitter of its line, and its runs are resolved
    within ``reclaim_after`` plus one poll interval as before. A worker first heard from
    after a look cannot cross its line before ``reclaim_after`` after that look, so any
    ceiling up to ``reclaim_after`` catches it in time. The ceiling bounds what only a
    sweep finds (a run whose owner the pool has no record of, or whose state changed
    after its owner went silent): resolved within ``1.5 * reclaim_after``. Idle, with
    the default 300 s, that is two requests every 150 s; alone in its pool, a worker
    asks once every 300 s (``Reclaimer.alone``)."""
    return max(settings.reclaim_after / 2, MIN_CHECK_SECONDS)


FIRST_LOOK_WAIT: Final = 10.0
"""The first look waits this long at most for the events stream to come up, so that a
worker alone in its pool may rely on the stream from that look on (``Reclaimer.quiet``)."""

ALONE_SAFETY_SECONDS: Final = 3600.0
"""A worker alone in its pool whose events stream has been steady, and which has heard of no
claim but its own, still looks this often: the stream is the server's word only as far as
it delivers. What a missed event could cost is a dead newcomer's runs resolved within the
hour instead of ``reclaim_after``."""

SWEEP_EVERY: Final = 10
"""The pool's runs are read when a worker of the pool has just gone silent for longer
than ``reclaim_after`` (within the last ``SWEEP_EVERY`` short intervals), and otherwise
every ``look_ceiling``: for runs whose state changed after their owner went silent, and
owners the pool has no record of."""


@attrs.define
class Reclaimer:
    settings: Settings
    client: PrefectClient
    outage: Outage
    metrics: Metrics
    ours: Callable[[], Container[str]]
    """The runs this worker holds, owes or has in its ledger: never reclaimed by it."""
    unlabelled: Callable[[], bool] = lambda: False
    """True once the server is known to have no run labels (before Prefect 3.1)."""
    rng: random.Random = attrs.Factory(random.Random)
    once: Once = attrs.Factory(Once)
    seen: tuple[list[WorkerRecord], datetime.datetime] | None = None
    """The pool's workers and the server's clock, as the last look read them."""
    up_since: float = math.inf
    """trio time since which the events stream has been up (inf: it is down)."""
    heard_at: float = -math.inf
    """trio time of the last claim heard of (a PENDING or RUNNING event) of a run not ours."""
    news: trio.Event = attrs.Factory(trio.Event)
    """Set (and replaced) when the stream comes up or a claim not ours is heard of."""

    @property
    def pool(self) -> str:
        assert self.settings.pool is not None
        return self.settings.pool

    async def loop(self, synced: trio.Event) -> None:
        if self.settings.reclaim_after <= 0 or self.settings.once:
            return  # off; and --once drains and exits, it does not keep watch
        await synced.wait()
        short, ceiling = check_seconds(self.settings), look_ceiling(self.settings)
        swept = -math.inf
        if self.settings.events:  # the first look soon: it learns when the peers could be lost
            with trio.move_on_after(FIRST_LOOK_WAIT):
                while self.up_since == math.inf:
                    await self.news.wait()
        while True:
            if self.unlabelled():  # no owner can be known: every run would be "unowned"
                log.info("reclaim.off", reason="the server has no run labels (Prefect before 3.1)")
                return
            self.seen = None
            looked = trio.current_time()
            sweep = looked - swept >= ceiling
            try:
                await self.check(sweep=sweep)
                swept = trio.current_time() if sweep else swept
            except API_ERRORS as exc:
                self.outage.failed(exc, "reclaim")
            except Exception as exc:  # a bug here must never stop the supervision of runs
                self.once.say(("bug", type(exc)), log, "exception", "reclaim.failed", error=repr(exc))
            jitter = self.rng.uniform(0, 0.2 * short)
            if self.seen is None:
                await trio.sleep(short + jitter)
            elif self.alone():
                await self.quiet(looked, max(self.settings.reclaim_after, short) + jitter)
            else:
                await trio.sleep(self.next_look(short, ceiling) + jitter)

    def alone(self) -> bool:
        """The last look found no other worker in the pool: nothing to sweep (a run is
        reclaimed only from a worker the pool lists as silent), and the next look may wait
        ``reclaim_after``: a worker first heard from after a look cannot cross its line
        sooner (``look_ceiling``). A lone idle worker then asks once per ``reclaim_after``,
        or not at all while its events stream says no one else claims (``quiet``)."""
        return self.seen is not None and all(w.name == self.settings.worker_name for w in self.seen[0])

    async def quiet(self, looked: float, every: float) -> None:
        """Alone at the look made at ``looked``: wait for the next look.

        It is due ``every`` (``reclaim_after``) after that look, and every ``every`` after
        that one is skipped while the events stream has been up since before the look and
        has told of no claim (PENDING or RUNNING) of a run not ours: a peer whose runs could
        ever be reclaimed has claimed one, and the stream carries every state change of the
        pool's runs (issue 22: a lone idle worker's look was its one request a minute beyond
        Prefect's worker's polls). A claim heard of brings the look forward to now, but no
        sooner than ``every`` after ``looked`` (see ``alone``); a stream that drops, or was
        not up at the look, keeps the look once per ``every``; at most
        ``ALONE_SAFETY_SECONDS`` pass between looks whatever the stream says."""
        due = looked + every
        while True:
            with trio.move_on_at(due):
                while self.heard_at < looked:
                    await self.news.wait()
            now = trio.current_time()
            if self.heard_at >= looked:  # a claim not ours: a peer is at work in the pool
                await trio.sleep_until(looked + every)
                return
            if self.up_since > looked or now - looked >= ALONE_SAFETY_SECONDS:
                return
            due += every  # steady, and no one else claims: this look is skipped

    def connected(self, up: bool) -> None:
        """The events stream is up, or dropped (``events.stream``'s ``on_connected``)."""
        if up and self.up_since == math.inf:
            self.up_since = trio.current_time()
            self._tell()
        elif not up:
            self.up_since = math.inf

    def claimed(self, run_id: str) -> None:
        """The stream told of a PENDING or RUNNING run of the pool: a peer's, unless ours.
        (An event can be forged: the worst it costs is one look, which is the server's word.)"""
        if run_id not in self.ours():
            self.heard_at = trio.current_time()
            self._tell()

    def _tell(self) -> None:
        self.news.set()
        self.news = trio.Event()

    def next_look(self, short: float, ceiling: float) -> float:
        """Seconds until the next look, from the workers the last one read."""
        assert self.seen is not None
        workers, now = self.seen
        peers = [
            (
                fleet.silence(w, now),
                cadence.lost_after(self.settings.reclaim_after, w.heartbeat_interval_seconds),
            )
            for w in workers
            if w.name != self.settings.worker_name
        ]
        return cadence.next_look(peers, short, ceiling, SWEEP_EVERY * short * 1.2)

    async def check(self, sweep: bool = True) -> int:
        """One look at the pool; returns how many runs this worker resolved. Its runs
        are read only if a worker has just gone silent (``fleet.newly_silent``) or ``sweep``.

        The pool's runs are read in one page-by-page sweep, which may be seconds old by
        the time a lost run's turn comes (a server under load): so a run found lost is
        judged again on a fresh read of the pool's workers and of the run itself, right
        before anything is written.
        """
        self.metrics.fleet_looks += 1
        workers, now = await self.client.read_workers(self.pool)
        self.seen = workers, now  # for the loop's next look (issue 22)
        window = SWEEP_EVERY * check_seconds(self.settings) * 1.2  # (the loop's jitter)
        if (not sweep or self.alone()) and not fleet.newly_silent(
            workers, now, self.settings.reclaim_after, window
        ):
            return 0
        runs = await self.client.pool_flow_runs(self.pool, fleet.WATCHED)
        ours = self.ours()
        lost = []
        for flow_run in runs:
            verdict = self._judge(flow_run, workers, now, ours)
            if verdict.action is Reclaim.UNOWNED:
                self.once.say(
                    ("unowned", flow_run.id),
                    log,
                    "info",
                    "reclaim.unowned",
                    flow_run_id=flow_run.id,
                    flow_run_name=flow_run.name,
                    reason=verdict.reason,
                )
            elif verdict.action is not Reclaim.LEAVE:
                lost.append(flow_run)
        if not lost:
            return 0
        resolved = 0
        workers, now = await self.client.read_workers(self.pool)
        for stale in lost:
            fresh = await self.client.read_flow_run(stale.id)
            if fresh is None or fresh.state is None or stale.state is None:
                continue
            if fresh.state.id != stale.state.id:
                continue  # it moved on since the sweep
            verdict = self._judge(fresh, workers, now, self.ours())
            if verdict.action in _PROPOSALS:
                resolved += await self.resolve(fresh, verdict, fleet.owner(fresh))
        return resolved

    def _judge(
        self, flow_run: FlowRun, workers: list[WorkerRecord], now: datetime.datetime, ours: Container[str]
    ) -> fleet.ReclaimVerdict:
        name = fleet.owner(flow_run)
        record = next((w for w in workers if w.name == name), None) if name else None
        return fleet.reclaim_verdict(
            flow_run,
            record,
            now,
            self.settings.worker_name,
            flow_run.id in ours,
            self.settings.reclaim_after,
            self.settings.on_lost,
        )

    async def resolve(self, flow_run: FlowRun, verdict: fleet.ReclaimVerdict, lost: str | None) -> int:
        """Write the verdict's state, once across all peers; 1 if this worker did it."""
        assert flow_run.state is not None
        read = flow_run.state
        state_type, name, force = _PROPOSALS[verdict.action]
        transition_id = str(uuid.uuid5(RECLAIM_NAMESPACE, f"{flow_run.id}/{read.id}"))
        details: dict[str, Any] = {}
        if state_type is StateType.SCHEDULED:
            details = {"scheduled_time": datetime.datetime.now(datetime.UTC).isoformat()}
        elif state_type is StateType.CANCELLED:
            details = dict(read.state_details)
        result = await self.client.set_flow_run_state(
            flow_run.id,
            state_type,
            name,
            verdict.reason,
            force=force,
            state_details=details,
            transition_id=transition_id,
        )
        run_log = run_logger(flow_run.id, flow_run.name, self.pool)
        if result.status.value != "ACCEPT":
            run_log.debug("reclaim.not_needed", status=result.status.value, reason=result.reason)
            return 0
        history = await self.client.read_flow_run_states(flow_run.id)
        displaced = fleet.reclaim_raced(history, transition_id, read.id)
        if displaced is not None:
            await self.client.restore_state(flow_run.id, displaced)
            run_log.warning("reclaim.raced", restored_state=displaced.type.value)
            return 0
        self.metrics.runs_reclaimed[verdict.action.value] += 1
        run_log.warning(
            "run.reclaimed",
            action=verdict.action.value,
            lost_worker=lost,
            was=read.type.value,
            silent_seconds=None if verdict.silent is None else round(verdict.silent, 1),
            message=verdict.reason,
        )
        return 1


@attrs.define
class Fencer:
    """Whether this worker's peers may have taken its runs, and the check that says."""

    settings: Settings
    client: PrefectClient
    metrics: Metrics
    last_beat: float = attrs.Factory(trio.current_time)
    """trio time at which the last heartbeat that got through was *sent* (start-up counts
    as one): the server recorded it no earlier, so no peer has seen us silent for longer
    than the time since then."""
    gap_ended: float = -math.inf
    """trio time at which the last gap ended (its heartbeat got through)."""
    gap_ended_wall: float = -math.inf
    """The same, on the wall clock (``time.time()``, as the ledger's ``claimed_at``)."""
    since_wall: float = attrs.Factory(time.time)
    """When this worker started (wall clock): what it knows of gaps begins there."""
    heard: trio.Event = attrs.Factory(trio.Event)
    """Set (and replaced) whenever a heartbeat gets through."""
    unlabelled: Callable[[str], bool] = lambda run_id: False
    """Whether our label is not known to be on a run yet (``Labeller.unconfirmed``, set
    by the runner): its label may still name a previous owner."""

    @property
    def threshold(self) -> float:
        after = self.settings.reclaim_after
        return fleet.FENCE_SHARE * after if after > 0 else math.inf

    def fenced(self) -> bool:
        """No heartbeat has got through for longer than the threshold, now."""
        return trio.current_time() - self.last_beat > self.threshold

    def beat(self, sent_at: float) -> bool:
        """A heartbeat sent at trio time ``sent_at`` got through. True if it ends a gap
        (from the previous one's sending to this one's answer): the runs must be checked."""
        now = trio.current_time()
        gap = now - self.last_beat > self.threshold
        self.last_beat = max(self.last_beat, sent_at)
        if gap:
            self.gap_ended = now
            self.gap_ended_wall = time.time()
            log.warning("fence.gap_ended", threshold_seconds=self.threshold)
        self.heard.set()
        self.heard = trio.Event()
        return gap

    def undisputed(self, entry: Entry) -> bool:
        """No peer can have taken the entry's run since this worker claimed it: claimed by
        this very process, no gap has ended since, none is under way (as ``still_ours``
        judges before a start). The reporter then proposes a crash without reading the run."""
        claimed = entry.claimed_at
        return (
            claimed is not None
            and claimed >= self.since_wall
            and self.gap_ended_wall < claimed
            and not self.fenced()
        )

    async def still_ours(self, run_id: str, transition_id: str | None, claimed_at: float) -> str:
        """Before starting a run claimed at trio time ``claimed_at``: "" if it is still
        ours, else why not. Waits for the API while this worker is fenced."""
        if not self.fenced() and self.gap_ended < claimed_at:
            return ""  # no gap since the claim: nobody could have taken it
        if self.fenced():
            log.warning("fence.waiting", flow_run_id=run_id, threshold_seconds=self.threshold)
        while self.fenced():
            await self.heard.wait()
        current = await self.client.read_flow_run(run_id)
        verdict = fleet.fence_verdict(False, current, self.settings.worker_name, transition_id)
        return verdict.reason if verdict.verdict is fleet.Fence.LOST else ""

    async def check_live(self, live: Mapping[str, Supervised | None]) -> None:
        """After a gap: stop each started run a peer has resolved (report nothing)."""
        started = {run_id: h for run_id, h in live.items() if h is not None}
        if not started:
            return
        current = {r.id: r for r in await self.client.filter_flow_runs(started)}
        me = self.settings.worker_name
        for run_id, handle in started.items():
            now, unlabelled = current.get(run_id), self.unlabelled(run_id)
            verdict = fleet.fence_verdict(True, now, me, handle.claim, handle.owner, not unlabelled)
            named = fleet.owner(now) if now is not None else None
            if verdict.verdict is fleet.Fence.KEEP and unlabelled and named not in (None, me, handle.owner):
                # our label is not on yet and another's is: a previous owner's, or a later
                # claim's? The history says (a rare read: a gap, and a label write that failed)
                later = fleet.claimed_since(await self.client.read_flow_run_states(run_id), handle.claim)
                if later is not None:
                    verdict = fleet.FenceVerdict(fleet.Fence.LOST, f"worker {named!r} has claimed it since")
            if verdict.verdict is fleet.Fence.LOST and not handle.lost:
                self.metrics.runs_lost += 1
                handle.log.warning("run.lost_to_peer", pid=handle.pid, reason=verdict.reason)
                handle.lose(verdict.reason)
