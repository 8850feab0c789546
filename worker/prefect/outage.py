"""API outages: two log lines per outage, the loops' backoff, and noticing the API's return.

Every loop that calls the API reports each failure and success here. The first failure
of an outage is logged at WARNING (ERROR for a refused key), its end at INFO with how
long it lasted; in between only DEBUG. Loops wait out a failure with :meth:`Outage.pause`,
which ends early when the API is found to answer again.

A strange answer (:class:`~worker.models.ProtocolError`: not JSON, the wrong shape, a web
page) is not an outage of the whole API: often one endpoint answers strangely while the
others work (a proxy rule, a broken route). Its episode is counted per endpoint: WARNING
once (``api.unexpected_answer``, with a hint for a web page), INFO when that endpoint
answers as expected again (``api.answers_expected``), DEBUG in between. An endpoint that
flaps (a share of its answers spoiled) is said at most once per :data:`REPEAT_SECONDS`;
its episodes in between are DEBUG. Loops back off from it like from any failure.
"""

from __future__ import annotations

import attrs
import structlog
import trio

from worker.host.metrics import Metrics
from worker.prefect.answers import ApiError, ApiRefused, ApiUnavailable, is_certificate_error
from worker.prefect.api import PrefectClient
from worker.rules.models import ProtocolError
from worker.rules.retry import backoff

log = structlog.get_logger("flow_worker")

API_ERRORS = (ApiError, ProtocolError)
"""What a loop catches from an API call: never a reason to stop."""

REPEAT_SECONDS = 300.0
"""An endpoint's episodes of strange answers are said (WARNING, then INFO at the end) at
most once in this many seconds: one whose answers are spoiled at random is one story."""

PROBE_SECONDS = 0.25
"""While the API is unreachable, how often ``GET /health`` asks whether it is back: a
tiny request, and only while nothing answers. A quarter second keeps the worker's return
(probe, events reconnect, poll, claim, on a server still warming up) within 2 s of the
server's; at 1 s it was measured at up to 2.3 s."""


@attrs.define
class Episode:
    """An endpoint's strange answers since it last answered as expected."""

    since: float
    said: bool
    count: int = 0


@attrs.define
class Outage:
    """Turns a stream of API failures and successes into two log lines per outage, and
    ends the loops' backoff pauses the moment an unreachable API answers again.

    Backoff (1 s doubling to 60 s, jittered) protects a server that is up but says "not
    now" (429, 503, 5xx). A server that cannot be reached at all (connection refused,
    timeouts) costs nothing to ask, so :meth:`probe_loop` asks ``GET /health`` every
    ``PROBE_SECONDS`` and, on the first answer, wakes every pause at once.
    """

    failing_since: float | None = None
    failures: int = 0
    unreachable: bool = False
    """The last failure never reached the server: the probe runs."""
    metrics: Metrics = attrs.Factory(Metrics)
    strange: dict[str, Episode] = attrs.Factory(dict)
    """Endpoints answering strangely now."""
    said_at: dict[str, float] = attrs.Factory(dict)
    """When each endpoint's last episode was said (trio time)."""
    _back: trio.Event = attrs.Factory(trio.Event)
    _lost: trio.Event = attrs.Factory(trio.Event)

    def failed(self, exc: Exception, during: str) -> None:
        self.failures += 1
        self.unreachable = isinstance(exc, ApiUnavailable) and exc.status is None
        if self.unreachable:
            self._lost.set()
        kind = (
            "protocol"
            if isinstance(exc, ProtocolError)
            else "refused"
            if isinstance(exc, ApiRefused)
            else "unavailable"
        )
        self.metrics.api_errors[kind] += 1
        if isinstance(exc, ProtocolError):
            self._strange(exc, during)
        elif self.failing_since is None:
            self.failing_since = trio.current_time()
            auth = isinstance(exc, ApiRefused) and exc.status in (401, 403)
            if is_certificate_error(exc):
                log.error(
                    "api.certificate_refused",
                    during=during,
                    error=str(exc),
                    hint="the API's certificate is not trusted: set PREFECT_API_SSL_CERT_FILE "
                    "(api_ssl_cert_file) to its CA bundle, install the CA in the system's trust store, "
                    "or set PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true",
                )
            elif auth:
                log.error(
                    "api.unauthorized",
                    during=during,
                    error=str(exc),
                    hint="check PREFECT_API_KEY / PREFECT_API_AUTH_STRING and PREFECT_API_URL",
                )
            else:
                hint = getattr(exc, "hint", None)  # (an address that is not the API's, say)
                log.warning(
                    "api.unavailable", during=during, error=str(exc), **({"hint": hint} if hint else {})
                )
        else:
            log.debug("api.still_unavailable", during=during, error=str(exc))

    def _strange(self, exc: ProtocolError, during: str) -> None:
        """A strange answer: said once per endpoint while it lasts (see the module doc)."""
        key = exc.endpoint or f"during {during}"
        now = trio.current_time()
        episode = self.strange.get(key)
        if episode is None:
            said = now - self.said_at.get(key, -REPEAT_SECONDS) >= REPEAT_SECONDS
            episode = self.strange[key] = Episode(now, said)
            if said:
                self.said_at[key] = now
                fields = {"hint": exc.hint} if exc.hint else {}
                log.warning("api.unexpected_answer", during=during, error=str(exc), **fields)
        if not (episode.said and episode.count == 0):
            log.debug("api.still_unexpected", during=during, error=str(exc))
        episode.count += 1

    def answered(self, endpoint: str) -> None:
        """``endpoint`` answered as expected: an episode of strange answers from it ends."""
        episode = self.strange.pop(endpoint, None)
        if episode is not None:
            level = "info" if episode.said else "debug"
            getattr(log, level)(
                "api.answers_expected",
                endpoint=endpoint,
                after_seconds=round(trio.current_time() - episode.since, 1),
                unexpected_answers=episode.count,
            )

    def succeeded(self) -> None:
        for key in [k for k in self.strange if k.startswith("during ")]:
            del self.strange[key]  # (no endpoint to hear back from: any success ends it)
        if self.failing_since is not None:
            log.info(
                "api.recovered",
                outage_seconds=round(trio.current_time() - self.failing_since, 1),
                failed_calls=self.failures,
            )
            self._wake()
        self.failing_since = None
        self.failures = 0

    def delay(self) -> float:
        """The backoff after a failure: by the failures since the last success, or since an
        endpoint began to answer strangely (a success elsewhere does not end that)."""
        strange = max((episode.count for episode in self.strange.values()), default=0)
        return backoff(max(self.failures, strange), 1.0, 60.0, 0.2)

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the API is found to answer again meanwhile."""
        with trio.move_on_after(seconds):
            await self._back.wait()

    @property
    def back(self) -> trio.Event:
        """Set when an unreachable API answers again (a fresh event after each outage)."""
        return self._back

    def _wake(self) -> None:
        self.unreachable = False
        self._back.set()
        self._back = trio.Event()
        self._lost = trio.Event()

    async def probe_loop(self, client: PrefectClient) -> None:
        """Idle (no wake-ups) until the API is unreachable; then probe until it answers.
        Meanwhile the client's calls fail fast (no retries that would outlast the outage's
        end): the loops wait in :meth:`pause` instead, which the probe ends."""
        client.fail_fast = lambda: self.unreachable
        client.answered = self.answered
        while True:
            await self._lost.wait()
            await trio.sleep(PROBE_SECONDS)
            if self.unreachable and await client.probe():
                log.debug("api.answering", after_failures=self.failures)
                self._wake()
