"""The runs this worker has in hand: the ``--limit`` slots, and the cancellations asked for."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from worker.process.handle import Supervised


@attrs.define
class InHand:
    """The runs this worker holds now, and whether it is stopping."""

    live: dict[str, Supervised | None] = attrs.Factory(dict)
    """Runs between poll and end: None while claiming/configuring, then the handle
    (spawned or adopted). Its size is what ``--limit`` counts."""
    stopping: bool = False
    """Claim nothing more (the drain)."""
    stopped_runs: bool = False
    """Every run is being stopped: a child started now is stopped at once."""
    changed: trio.Event = attrs.Factory(trio.Event)
    """Set (and replaced) whenever a run leaves: ``--once`` re-polls then."""
    released: Callable[[bool], None] = lambda started: None
    """Called whenever a run leaves, with whether its process had started (the supervisor
    re-polls if runs were held)."""

    def watched(self) -> list[str]:
        """Runs whose process this worker watches and has not been asked to stop."""
        return [run_id for run_id, h in self.live.items() if h is not None and not h.stop_requested]

    def cancel(self, run_id: str, via: str = "event") -> None:
        """The run is CANCELLING: stop it now if it is ours (idempotent)."""
        handle = self.live.get(run_id)
        if handle is not None and not handle.stop_requested:
            handle.log.info("run.cancelling", flow_run_id=run_id, pid=handle.pid, via=via)
            handle.cancel("flow run is CANCELLING")

    def release(self, run_id: str) -> None:
        handle = self.live.pop(run_id, None)
        self.changed.set()
        self.changed = trio.Event()
        self.released(handle is not None)
