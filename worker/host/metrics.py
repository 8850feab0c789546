"""The worker's counters and gauges, rendered in the Prometheus text format for ``/metrics``.

Counters only go up for the life of the process; ``runs_finished`` is labelled by the
final state the worker saw or wrote (COMPLETED, FAILED, CRASHED, CANCELLED, SCHEDULED
for a run handed back on stop).
"""

from __future__ import annotations

from collections import Counter
from typing import Final

import attrs


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs.items()
    )
    return "{" + inner + "}"


MEMORY_BUCKETS: Final = tuple(m * 1024 * 1024 for m in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
CPU_BUCKETS: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)


@attrs.define
class Histogram:
    """Prometheus histogram: cumulative bucket counts, sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field()
    total: float = 0.0
    count: int = 0

    @counts.default
    def _counts(self) -> list[int]:
        return [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, doc: str) -> list[str]:
        out = [f"# HELP flow_worker_{name} {doc}", f"# TYPE flow_worker_{name} histogram"]
        for bound, n in zip(self.bounds, self.counts, strict=True):
            le = str(int(bound)) if float(bound).is_integer() else repr(bound)
            out.append(f'flow_worker_{name}_bucket{{le="{le}"}} {n}')
        out.append(f'flow_worker_{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"flow_worker_{name}_sum {self.total:g}")
        out.append(f"flow_worker_{name}_count {self.count}")
        return out


@attrs.define
class Metrics:
    runs_claimed: int = 0
    runs_finished: Counter[str] = attrs.Factory(Counter)
    api_errors: Counter[str] = attrs.Factory(Counter)
    runs_reclaimed: Counter[str] = attrs.Factory(Counter)
    """Lost peers' runs this worker resolved, by action (reschedule, crash, cancel)."""
    runs_lost: int = 0
    """Runs of this worker that a peer resolved during a heartbeat gap (the fence)."""
    fleet_looks: int = 0
    """Reads of the pool's workers by the reclaim loop (what the fleet costs the API)."""
    runs_deferred: int = 0
    """Due runs not started for want of descriptors, memory or disk (back to the queue)."""
    runs_internal_errors: int = 0
    """Runs that met a bug in the worker (CRASHED with it, never taken again)."""
    run_peak_memory: Histogram = attrs.Factory(lambda: Histogram(MEMORY_BUCKETS))
    run_cpu: Histogram = attrs.Factory(lambda: Histogram(CPU_BUCKETS))
    memory_available: float = float("nan")
    memory_reserve: float = float("nan")
    runs_held: int = 0
    """Due runs the last poll left SCHEDULED for want of memory."""
    runs_started: Counter[str] = attrs.Factory(Counter)
    """Runs whose process started, by how: ``cold`` (spawned) or ``warm`` (forked)."""
    polls: int = 0
    poll_seconds_sum: float = 0.0
    last_poll_seconds: float = 0.0

    def observe_poll(self, seconds: float) -> None:
        self.polls += 1
        self.poll_seconds_sum += seconds
        self.last_poll_seconds = seconds

    def observe_run(self, peak_bytes: int, cpu_seconds: float) -> None:
        self.run_peak_memory.observe(peak_bytes)
        self.run_cpu.observe(cpu_seconds)

    def render(
        self, active_runs: int, seconds_since_poll: float | None, tree_pss: float = float("nan")
    ) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP flow_worker_{name} {doc}")
            lines.append(f"# TYPE flow_worker_{name} {kind}")
            for labels, value in samples:
                lines.append(f"flow_worker_{name}{_labels(labels)} {value:g}")

        metric(
            "runs_claimed_total",
            "counter",
            "Flow runs claimed (PENDING accepted).",
            [({}, self.runs_claimed)],
        )
        states = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED", "SCHEDULED")
        metric(
            "runs_finished_total",
            "counter",
            "Flow runs ended, by the final state seen or written.",
            [({"state": s}, self.runs_finished[s]) for s in sorted(set(states) | set(self.runs_finished))],
        )
        metric(
            "runs_reclaimed_total",
            "counter",
            "Runs of lost workers this worker resolved, by action.",
            [({"action": a}, self.runs_reclaimed[a]) for a in ("cancel", "crash", "reschedule")],
        )
        metric(
            "runs_lost_total",
            "counter",
            "Runs of this worker resolved by a peer while it could not heartbeat (then stopped).",
            [({}, self.runs_lost)],
        )
        metric(
            "fleet_looks_total",
            "counter",
            "Reads of the pool's workers by the reclaim loop (looks for lost peers).",
            [({}, self.fleet_looks)],
        )
        metric(
            "runs_deferred_total",
            "counter",
            "Due runs not started because the host was short of descriptors, memory or disk.",
            [({}, self.runs_deferred)],
        )
        metric(
            "runs_internal_errors_total",
            "counter",
            "Runs that met a bug in the worker: CRASHED with it and not taken again.",
            [({}, self.runs_internal_errors)],
        )
        metric(
            "runs_started_total",
            "counter",
            "Runs whose process started: spawned (cold) or forked from an engine server (warm).",
            [({"start": k}, self.runs_started[k]) for k in ("cold", "warm")],
        )
        metric("active_runs", "gauge", "Flow runs being submitted, running or adopted.", [({}, active_runs)])
        kinds = ("unavailable", "refused", "protocol")
        metric(
            "api_errors_total",
            "counter",
            "Failed API calls (after retries), by kind.",
            [({"kind": k}, self.api_errors[k]) for k in sorted(set(kinds) | set(self.api_errors))],
        )
        since = seconds_since_poll if seconds_since_poll is not None else float("nan")
        metric("seconds_since_last_poll", "gauge", "Seconds since the last successful poll.", [({}, since)])
        metric(
            "memory_available_bytes",
            "gauge",
            "Memory available to runs at the last poll (host, or the worker's cgroup).",
            [({}, self.memory_available)],
        )
        metric("memory_reserve_bytes", "gauge", "Memory admission keeps free.", [({}, self.memory_reserve)])
        metric(
            "runs_held",
            "gauge",
            "Due runs left SCHEDULED at the last poll: no memory.",
            [({}, self.runs_held)],
        )
        metric(
            "tree_pss_bytes",
            "gauge",
            "Proportional set size of the worker's process tree (itself, engine servers, runs).",
            [({}, tree_pss)],
        )
        lines.extend(
            self.run_peak_memory.lines(
                "run_peak_memory_bytes", "Peak resident memory of a run's process tree."
            )
        )
        lines.extend(self.run_cpu.lines("run_cpu_seconds", "CPU seconds of a run's process tree."))
        lines.append("# HELP flow_worker_poll_duration_seconds Duration of get_scheduled_flow_runs polls.")
        lines.append("# TYPE flow_worker_poll_duration_seconds summary")
        lines.append(f"flow_worker_poll_duration_seconds_sum {self.poll_seconds_sum:g}")
        lines.append(f"flow_worker_poll_duration_seconds_count {self.polls}")
        return "\n".join(lines) + "\n"
