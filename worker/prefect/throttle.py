"""One session's shared "busy" (``retry.Busy``) applied to its requests, and their priority.

Why: each call retrying a 503 on its own made a burst of calls a storm against a busy
server (167-186 requests answered 503 where Prefect's worker sent 87-100). Here, the
first request told busy (429/503) slows down every request of the session:

* **Essential** requests (claims, states, the poll's reads) wait for the window to end;
  then, until an answer that is not busy, they go out one at a time (the first to go is
  the probe; the others follow it only once it was answered, each one waiting out a new
  window if it said busy again). A request whose wait would pass its call's deadline
  fails at once as unavailable, as a retry that could not happen before it always did.
* **Non-essential** writes (run labels, the UI's log lines and events) do not go out at
  all while the server is busy: they wait for the first answer that is not busy (then a
  little more, so the essential requests waiting go first), at most :data:`HOLD_SECONDS`
  (a run's start waits for its labels), and ``Session`` never retries them on a busy
  answer: their callers keep the batch, or try again later (labels: every 5 s).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from typing import Final

import attrs
import httpx
import structlog
import trio

from worker.prefect.answers import ApiUnavailable
from worker.rules.retry import BUSY_STATUS, Busy

log = structlog.get_logger("flow_worker.api")
HOLD_SECONDS: Final = 5.0
"""At most this long a non-essential request waits for a busy server (then it fails as
unavailable without going out)."""
YIELD_SECONDS: Final = 0.25
"""At most this long (random) a non-essential request waits after the server is calm
again, so the essential requests that were waiting go first."""


@attrs.define
class Throttle:
    """The busy window shared by one session's requests, and the turns it gives them."""

    rng: random.Random = attrs.Factory(random.Random)
    state: Busy = attrs.Factory(Busy)
    busy_answers: int = 0
    """Busy answers heard in all (for tests and measures)."""
    last_status: int | None = None
    _calm: trio.Event = attrs.Factory(trio.Event)
    _probe: trio.Lock = attrs.Factory(trio.Lock)

    def __attrs_post_init__(self) -> None:
        self._calm.set()

    def heard(self, response: httpx.Response) -> bool:
        """Take in an answer; True if it said busy (429/503)."""
        status = response.status_code
        if status in BUSY_STATUS:
            self.busy_answers += 1
            self.last_status = status
            if not self.state.busy:
                self._calm = trio.Event()
            now = trio.current_time()
            self.state = self.state.told_busy(now, response.headers.get("Retry-After"), self.rng)
            log.debug(
                "api.busy", status=status, strikes=self.state.strikes, wait=round(self.state.wait(now), 2)
            )
        elif status < 500 and self.state.busy:
            self.state = self.state.answered()
            self._calm.set()
            log.debug("api.calm")
        return status in BUSY_STATUS

    def _unavailable(self, method: str, path: str, why: str) -> ApiUnavailable:
        return ApiUnavailable(method, "/" + path, self.last_status, f"the server is busy: {why}")

    @contextlib.asynccontextmanager
    async def turn(self, essential: bool, deadline: float, method: str, path: str) -> AsyncIterator[None]:
        """Wait for a request's turn (module doc), then let it go out within the block.
        Raises :class:`ApiUnavailable` if its turn would come after ``deadline`` (trio time)."""
        holding = await (self._essential_turn if essential else self._other_turn)(deadline, method, path)
        try:
            yield
        finally:
            if holding:
                self._probe.release()

    async def _other_turn(self, deadline: float, method: str, path: str) -> bool:
        if not self.state.busy:
            return False
        with trio.move_on_at(min(deadline, trio.current_time() + HOLD_SECONDS)) as scope:
            while self.state.busy:
                await self._calm.wait()
            await trio.sleep(self.rng.uniform(0, YIELD_SECONDS))
        if scope.cancelled_caught:
            raise self._unavailable(
                method, path, f"a non-essential request waited {HOLD_SECONDS:g} s at most"
            )
        return False

    async def _essential_turn(self, deadline: float, method: str, path: str) -> bool:
        while True:
            now = trio.current_time()
            wait = self.state.wait(now)
            if now + wait >= deadline:
                raise self._unavailable(method, path, f"asked to wait {wait:.1f} s, past the call's deadline")
            if wait > 0:
                await trio.sleep(wait)
                continue
            if not self.state.busy:
                return False
            with trio.move_on_at(deadline) as scope:
                await self._probe.acquire()
            if scope.cancelled_caught:
                raise self._unavailable(method, path, "no turn before the call's deadline")
            if self.state.busy and self.state.wait(trio.current_time()) == 0:
                return True  # this request is the probe
            self._probe.release()  # told busy again meanwhile (wait out the new window) or calm
