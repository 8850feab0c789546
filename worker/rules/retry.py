"""An immutable retry and backoff policy: which failures are safe to retry, and how long to wait.

Classification (what is safe to retry):

=============================  =======  =====================================================
failure                        retry?   why
=============================  =======  =====================================================
connect error / connect t/o    yes      the request never reached the server
read/write error, read t/o     yes      every call flow-worker makes is idempotent by
                                        construction: reads, PATCHes of fixed values,
                                        heartbeats, ``set_state`` with a fixed
                                        ``transition_id`` (a replay is recognised, see
                                        ``decisions.claim_outcome``), create-pool (409 = done)
408, 429, 502, 503, 504        yes      the server says "not now"; ``Retry-After`` honoured
other 4xx                      no       the request or the configuration is wrong
500                            no       a server bug; the calling loop backs off instead
=============================  =======  =====================================================

A failure that never reached the server (connection refused, timeouts) is retried at
most ``transport_cap`` (2 s) apart: asking a server that is down costs it nothing, and
a restarted server is noticed within seconds. Answers that say "not now" grow the delay
as below.

Delays grow ``base * 2**n`` up to ``cap``, each multiplied by a random factor in
``[1 - jitter, 1 + jitter]`` so that many workers do not retry in step. A
``Retry-After`` header replaces the computed delay (bounded by ``retry_after_cap``).
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Final

import attrs
import httpx

RETRYABLE_STATUS: Final = frozenset({408, 429, 502, 503, 504})


@attrs.frozen
class RetryPolicy:
    """How one HTTP call is retried. ``increment()`` returns the policy for the next try.

    Defaults: 5 retries (Prefect's ``PREFECT_CLIENT_MAX_RETRIES``), 0.5 s doubling to
    at most 10 s, so a call gives up after about 20 s and the calling loop, which never
    gives up, takes over with its own slower backoff.
    """

    total: int = 5
    base: float = 0.5
    cap: float = 10.0
    jitter: float = 0.2
    retry_after_cap: float = 120.0
    transport_cap: float = 2.0
    attempt: int = 0

    @property
    def exhausted(self) -> bool:
        return self.attempt >= self.total

    def increment(self) -> RetryPolicy:
        return attrs.evolve(self, attempt=self.attempt + 1)

    def is_retryable_status(self, status: int) -> bool:
        return status in RETRYABLE_STATUS

    @staticmethod
    def is_retryable_error(exc: BaseException) -> bool:
        return isinstance(exc, httpx.TransportError)

    def delay(self, retry_after: str | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next try after an answer that said "not now"."""
        hinted = parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, self.retry_after_cap)
        return backoff(self.attempt, self.base, self.cap, self.jitter, rng)

    def transport_delay(self, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next try after a failure that never reached the server.
        The first retry is immediate: the usual cause is a pooled connection the server
        closed (it restarted), and a fresh connection then succeeds at once."""
        if self.attempt == 0:
            return 0.0
        return backoff(self.attempt, self.base, self.transport_cap, self.jitter, rng)


def backoff(attempt: int, base: float, cap: float, jitter: float, rng: random.Random | None = None) -> float:
    """``base * 2**attempt`` capped at ``cap``, with ±``jitter`` relative noise."""
    raw = min(cap, base * (2 ** min(attempt, 32)))
    return float(raw * (rng or random).uniform(1 - jitter, 1 + jitter))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (a number or an HTTP date), or None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def jittered(seconds: float, rng: random.Random | None = None, spread: float = 0.3) -> float:
    """A loop interval with Prefect's ±30 % jitter, so workers do not poll in step."""
    return seconds * (rng or random).uniform(1 - spread, 1 + spread)
