"""API outages: two log lines per outage, the loops' backoff, and noticing the API's return.

Every loop that calls the API reports each failure and success here. The first failure
of an outage is logged at WARNING (ERROR for a refused key), its end at INFO with how
long it lasted; in between only DEBUG. Loops wait out a failure with :meth:`Outage.pause`,
which ends early when the API is found to answer again.
"""

from __future__ import annotations

import attrs
import structlog
import trio

from worker.api import ApiError, ApiRefused, ApiUnavailable, PrefectClient, is_certificate_error
from worker.metrics import Metrics
from worker.models import ProtocolError
from worker.retry import backoff

log = structlog.get_logger("flow_worker")

API_ERRORS = (ApiError, ProtocolError)
"""What a loop catches from an API call: never a reason to stop."""

PROBE_SECONDS = 0.25
"""While the API is unreachable, how often ``GET /health`` asks whether it is back: a
tiny request, and only while nothing answers. A quarter second keeps the worker's return
(probe, events reconnect, poll, claim, on a server still warming up) within 2 s of the
server's; at 1 s it was measured at up to 2.3 s."""


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
        if self.failing_since is None:
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
                log.warning("api.unavailable", during=during, error=str(exc))
        else:
            log.debug("api.still_unavailable", during=during, error=str(exc))

    def succeeded(self) -> None:
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
        return backoff(self.failures, 1.0, 60.0, 0.2)

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
        while True:
            await self._lost.wait()
            await trio.sleep(PROBE_SECONDS)
            if self.unreachable and await client.probe():
                log.debug("api.answering", after_failures=self.failures)
                self._wake()
