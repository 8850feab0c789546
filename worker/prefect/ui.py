"""What the Prefect UI shows of the worker: its lines in a run's logs, and its events.

Theory of operation
-------------------
* **Log lines.** :class:`RunLogTap` is one structlog processor: each worker event about a
  run that a user wants in the run's logs (``LINES``: claimed, started, adopted,
  cancelling, terminating, exited, crash reason …) becomes one line under the logger name
  Prefect's worker uses (``prefect.flow_runs.worker``), with the run's id, queued in the
  :class:`Uplink`. Prefect's own wording is kept where it has one ("Worker 'N' submitting
  flow run 'ID'", "Flow run 'NAME' submitted to infrastructure"), with the facts added.
* **Events.** ``prefect.worker.started``, ``…stopped``, ``…submitted-flow-run`` and
  ``…executed-flow-run``, with the resource and related resources Prefect's worker gives
  them (worker, flow run, deployment, flow, work pool, tags; the exit status and pid on
  the executed event), so an automation written for Prefect's worker fires for this one.
* **Shipping.** :meth:`Uplink.loop` sends both in batches (``POST /logs/``; events over
  the ``/events/in`` websocket as Prefect's clients do, ``POST /events`` where it cannot
  be opened: ``eventsin.py``) ``SHIP_SECONDS`` after the first entry is queued, off the
  hot path, and does not wake at all while nothing is queued. Nothing is shipped while
  the server says it is busy, and these writes are never retried then (``throttle.py``).
  Memory is bounded: while the API is down the oldest entries are dropped and counted
  (one WARNING when shipping resumes). A server that refuses a batch (4xx) loses that
  batch, said once; a server without an events endpoint is detected once and events are
  skipped. Nothing here ever raises into the worker. ``log_to_api = false`` turns the log lines off.
"""

from __future__ import annotations

import collections
import datetime
import re
import uuid
from collections.abc import MutableMapping
from typing import Any, Final

import attrs
import structlog
import trio

from worker.host.settings import Settings
from worker.prefect.answers import ApiNotFound, ApiRefused
from worker.prefect.api import PrefectClient
from worker.prefect.events import Socket
from worker.prefect.eventsin import EventsIn
from worker.prefect.outage import API_ERRORS
from worker.prefect.session import PREFECT_VERSION
from worker.rules.models import Deployment, Flow, FlowRun, WorkPool

log = structlog.get_logger("flow_worker")

LOGGER_NAME: Final = "prefect.flow_runs.worker"
SHIP_SECONDS: Final = 2.0
"""Lines and events are gathered this long before a batch goes (Prefect's log handler
also flushes every 2 s): a burst of runs costs a few requests, not a few per run."""
BATCH: Final = 200
MAX_LOGS: Final = 10_000
MAX_EVENTS: Final = 2_000
"""Bounds of what waits to be shipped (about 5 MiB at most); the oldest go first."""
FLUSH_SECONDS: Final = 5.0
"""At exit, how long the worker waits to ship what is queued."""
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

LINES: Final[dict[str, tuple[int, str]]] = {
    "run.claimed": (INFO, "Worker '{worker_name}' submitting flow run '{flow_run_id}'"),
    "run.started": (
        INFO,
        "Flow run '{flow_run_name}' submitted to infrastructure: pid {pid}, command {command}, "
        "working directory {cwd}",
    ),
    "run.adopted": (INFO, "Process {pid} adopted by worker '{worker}' after a restart"),
    "run.cancelling": (INFO, "Flow run is CANCELLING (seen by {via}): stopping its process group"),
    "run.terminating": (INFO, "Stopping process {pid}: {reason}; SIGKILL after {grace_seconds}s"),
    "run.killing": (WARNING, "Process {pid} still running after its grace period: SIGKILL"),
    "run.exited": (INFO, "Process {pid} exited with status code: {returncode}"),
    "run.start_failed": (ERROR, "Flow run could not start: {error}"),
    "run.bad_configuration": (ERROR, "Failed to submit flow run to infrastructure: {error}"),
    "run.reported": (INFO, "Reported {outcome}: {message}"),
    "run.reclaimed": (WARNING, "Reclaimed by worker '{worker}' ({action}): {message}"),
    "run.lost_to_peer": (WARNING, "Worker '{worker}' lost this run to a peer: {reason}"),
    "run.claim_raced": (
        WARNING,
        "Another worker finished this run first; its {restored_state} state restored",
    ),
    "run.output_dropped": (WARNING, "Output not forwarded to the logs: {detail}"),
    "run.internal_error": (ERROR, "Internal error in flow-worker while handling this run: {error}"),
    "run.not_started": (WARNING, "Not started now, returned to the queue: {reason}"),
    "run.limits_not_applied": (
        WARNING,
        "Resource limits not applied ({limits}): {reason}; the run goes on without them",
    ),
    "run.not_in_cgroup": (WARNING, "Not started in a cgroup of its own: {reason}"),
    "run.cgroup_left": (WARNING, "Its cgroup {cgroup} is still not empty after cgroup.kill (pids {pids})"),
    "run.hooks_failed": (ERROR, "The flow's on_{kind} hooks did not run to their end: {error}"),
}


class _Facts(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def line_for(event_dict: MutableMapping[str, Any], worker: str) -> tuple[int, str] | None:
    """The run-log line (level, message) for one worker event, or None (pure)."""
    found = LINES.get(str(event_dict.get("event")))
    if found is None:
        return None
    level, template = found
    facts = _Facts(event_dict)
    facts.setdefault("worker", worker)
    message = template.format_map(facts)
    if event_dict.get("event") == "run.exited":
        if event_dict.get("returncode") is None:
            message = f"Process {facts['pid']} exited; its exit status is unknown (adopted after a restart)"
        elif event_dict.get("returncode") != 0:
            level = ERROR
        if event_dict.get("peak_memory_mib") is not None:
            message += f" (peak memory {facts['peak_memory_mib']} MiB, CPU {facts['cpu_seconds']} s)"
        if event_dict.get("out_of_memory"):
            message += f"; {event_dict['out_of_memory']}"
        if event_dict.get("stderr_tail"):
            message += f"; last lines of stderr:\n{event_dict['stderr_tail']}"
    if event_dict.get("event") == "run.started" and event_dict.get("cgroup"):
        limits = event_dict.get("limits")
        message += f", cgroup {facts['cgroup']}" + (f" with {limits}" if limits else "")
    if event_dict.get("event") == "run.reported" and "CRASHED" in str(event_dict.get("outcome")):
        level = ERROR
    return level, message


@attrs.define
class Uplink:
    """Worker log lines and events waiting for the API, and the loop that ships them."""

    client: PrefectClient
    worker_name: str
    log_to_api: bool = True
    logs: collections.deque[dict[str, Any]] = attrs.Factory(lambda: collections.deque(maxlen=MAX_LOGS))
    events: collections.deque[dict[str, Any]] = attrs.Factory(lambda: collections.deque(maxlen=MAX_EVENTS))
    dropped: int = 0
    events_supported: bool = True
    _failing: bool = False
    _refused: set[str] = attrs.Factory(set)
    _started: str | None = None
    _queued: trio.Event = attrs.Factory(trio.Event)
    _pool: WorkPool | None = None
    events_in: EventsIn | None = attrs.Factory(lambda self: _events_in(self.client), takes_self=True)
    """How events go: the websocket, else ``POST`` (None: ``POST`` only)."""

    # ---------------------------------------------------------------- what goes in

    def add_log(self, run_id: str, level: int, message: str) -> None:
        if not self.log_to_api:
            return
        if len(self.logs) == self.logs.maxlen:
            self.dropped += 1
        self._queued.set()
        self.logs.append(
            {
                "name": LOGGER_NAME,
                "level": level,
                "message": message,
                "timestamp": _now(),
                "flow_run_id": run_id,
            }
        )

    def add_event(
        self,
        name: str,
        related: list[dict[str, str]],
        follows: str | None = None,
        resource: dict[str, str] | None = None,
    ) -> str:
        """Queue one event (``prefect.worker.*``, about this worker unless ``resource``
        says otherwise); returns its id (for ``follows``)."""
        event_id = str(uuid.uuid4())
        if not self.events_supported:
            return event_id
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self._queued.set()
        event: dict[str, Any] = {
            "id": event_id,
            "occurred": _now(),
            "event": name,
            "resource": resource or worker_resource(self.worker_name),
            "related": related,
            "payload": {},
        }
        if follows:
            event["follows"] = follows
        self.events.append(event)
        return event_id

    def started(self, pool: WorkPool) -> None:
        """``prefect.worker.started`` (once, after the first sync)."""
        if self._started is None:
            self._started = self.add_event(
                "prefect.worker.started", [_related("work-pool", pool.id, pool.name)]
            )
            self._pool = pool

    async def stopped(self, within: float = FLUSH_SECONDS) -> None:
        """``prefect.worker.stopped``, then ship what is queued, for at most ``within`` s."""
        if self._started is not None and self._pool is not None:
            pool = _related("work-pool", self._pool.id, self._pool.name)
            self.add_event("prefect.worker.stopped", [pool], follows=self._started)
        with trio.move_on_after(within):
            await self.ship()

    # ---------------------------------------------------------------- shipping

    async def loop(self) -> None:
        """Idle until something is queued, then gather for ``SHIP_SECONDS`` and ship it
        (and retry every ``SHIP_SECONDS`` while the API is down). The logging tap feeds
        this uplink from now on."""
        TAP.uplink = self
        async with trio.open_nursery() as nursery:  # (where the events websocket lives)
            if self.events_in is not None:
                self.events_in.nursery = nursery
            try:
                while True:
                    await self._queued.wait()
                    await trio.sleep(SHIP_SECONDS)
                    await self.ship()
                    if not self.logs and not self.events:
                        self._queued = trio.Event()
            finally:
                if self.events_in is not None:
                    self.events_in.nursery = None
                    await self.events_in.close()

    async def ship(self) -> None:
        """Send what is queued, a batch at a time; keep it if the API is down or busy."""
        throttle = getattr(self.client, "throttle", None)  # (a test's stand-in may have none)
        if throttle is not None and throttle.state.busy:
            return
        try:
            while self.logs:
                await self._send("logs/", self.logs)
            while self.events and self.events_supported:
                await self._send_events()
        except API_ERRORS as exc:
            if not self._failing:
                self._failing = True
                log.debug("uplink.waiting", error=str(exc), queued_logs=len(self.logs))
            return
        if self._failing or self.dropped:
            if self.dropped:
                log.warning("uplink.dropped", entries=self.dropped, why="the API was unreachable too long")
            self._failing, self.dropped = False, 0

    async def _send_events(self) -> None:
        """One batch of events: over the websocket, else by ``POST``."""
        batch = _batch(self.events)
        if self.events_in is not None and await self.events_in.send(batch):
            _shipped(self.events, batch)
        elif await self._send("events", self.events) and self.events_in is not None:
            self.events_in.posted()

    async def _send(self, path: str, queue: collections.deque[dict[str, Any]]) -> bool:
        """One batch by ``POST``: True if the server took it (else it is dropped, said once)."""
        batch = _batch(queue)
        taken = True
        try:
            await self.client.request("POST", path, json=batch, essential=False)
        except ApiRefused as exc:
            taken = False
            if path == "events" and (isinstance(exc, ApiNotFound) or exc.status == 405):
                self.events_supported = False
                queue.clear()
                log.info("uplink.events_unsupported", error=str(exc), effect="no prefect.worker.* events")
                return False
            if path not in self._refused:
                self._refused.add(path)
                log.warning("uplink.refused", path=path, error=str(exc), effect="that batch is dropped")
        _shipped(queue, batch)
        return taken


def _events_in(client: PrefectClient) -> EventsIn | None:
    """The events websocket of ``client``'s server (None for a stand-in without settings)."""
    settings = getattr(client, "settings", None)
    if not isinstance(settings, Settings) or not settings.api_url:
        return None
    return EventsIn(Socket.of(settings, "in"))


def _batch(queue: collections.deque[dict[str, Any]]) -> list[dict[str, Any]]:
    return [queue[i] for i in range(min(BATCH, len(queue)))]


def _shipped(queue: collections.deque[dict[str, Any]], batch: list[dict[str, Any]]) -> None:
    sent = {id(entry) for entry in batch}
    while queue and id(queue[0]) in sent:  # exactly that batch (a full queue may have
        queue.popleft()  # dropped some of it meanwhile), never what came after it


class RunLogTap:
    """The structlog processor that turns worker events about a run into run-log lines."""

    uplink: Uplink | None = None
    """Set by the supervisor once it has a client; None: nothing is tapped."""

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        uplink = self.uplink
        run_id = event_dict.get("flow_run_id")
        if uplink is not None and isinstance(run_id, str):
            found = line_for(event_dict, uplink.worker_name)
            if found is not None:
                uplink.add_log(run_id, *found)
        return event_dict


TAP: Final = RunLogTap()
"""The one tap in the logging chain (``logs.configure`` installs it)."""


# ---------------------------------------------------------------- event shapes (pure)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def worker_resource(worker_name: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"prefect.worker.process.{slug(worker_name)}",
        "prefect.resource.name": worker_name,
        "prefect.version": PREFECT_VERSION,
        "prefect.worker-type": "process",
    }


RUNNER: Final = "standalone"
"""The runner Prefect 3.8+'s process worker names in its ``prefect.runner.*`` events."""


def runner_resource() -> dict[str, str]:
    """The resource of ``prefect.runner.cancelled-flow-run``, as Prefect 3.9.1's worker says it."""
    return {
        "prefect.resource.id": f"prefect.runner.{RUNNER}",
        "prefect.resource.name": RUNNER,
        "prefect.version": PREFECT_VERSION,
    }


def runner_related(related: list[dict[str, str]]) -> list[dict[str, str]]:
    """A run's related resources as the runner's events carry them: deployment, flow,
    flow run and tags, without the work pool."""
    return [r for r in related if r.get("prefect.resource.role") != "work-pool"]


def _related(kind: str, object_id: str, name: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"prefect.{kind}.{object_id}",
        "prefect.resource.role": kind,
        "prefect.resource.name": name,
    }


def run_related(
    flow_run: FlowRun, deployment: Deployment | None, flow: Flow | None, pool: WorkPool | None
) -> list[dict[str, str]]:
    """The related resources Prefect's worker gives a run's events, in its order."""
    related = []
    if deployment is not None:
        related.append(_related("deployment", deployment.id, deployment.name))
    if flow is not None:
        related.append(_related("flow", flow.id, flow.name))
    related.append(_related("flow-run", flow_run.id, flow_run.name))
    related += [
        {"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"}
        for t in sorted(set(flow_run.tags))
    ]
    if pool is not None:
        related.append(_related("work-pool", pool.id, pool.name))
    return related


def with_exit(related: list[dict[str, str]], pid: int | None, status: int | None) -> list[dict[str, str]]:
    """The executed event's related resources: the flow run carries pid and exit status."""
    out = []
    for resource in related:
        if resource.get("prefect.resource.role") == "flow-run":
            resource = {
                **resource,
                "prefect.infrastructure.identifier": str(pid),
                "prefect.infrastructure.status-code": str(status),
            }
        out.append(resource)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()
