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

"Busy" answers (429, 503) are shared: :class:`Busy` is one session's window during which
none of its requests goes out, opened by any request told busy (``Retry-After`` honoured,
else the same doubling backoff, one step per window, not per answer), and reset by the
first answer that is not busy. ``prefect/throttle.py`` applies it to every request.
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Final

import attrs
import httpx

RETRYABLE_STATUS: Final = frozenset({408, 429, 502, 503, 504})
BUSY_STATUS: Final = frozenset({429, 503})
"""Answers that say the server is busy: they slow down the whole session (:class:`Busy`)."""


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


@attrs.frozen
class Busy:
    """The server's "busy" as all of one session's requests share it (pure: times are the
    caller's clock, in seconds). No request goes out before ``until``; ``strikes`` counts
    the windows opened since the last answer that was not busy (0: not busy).

    A busy answer heard while a window is open (a request sent before it opened) adds no
    strike: N requests told busy at once open one window, not N doubling ones; it only
    extends the window to its ``Retry-After``. A ``Retry-After`` is never cut short by the
    jitter (its factor is in ``[1, 1 + jitter]``)."""

    until: float = 0.0
    strikes: int = 0
    policy: RetryPolicy = RetryPolicy()
    """Its backoff (``base``, ``cap``, ``jitter``, ``retry_after_cap``; not ``total``)."""

    @property
    def busy(self) -> bool:
        return self.strikes > 0

    def wait(self, now: float) -> float:
        """Seconds from ``now`` before a request may go out (0: now)."""
        return max(0.0, self.until - now)

    def told_busy(self, now: float, retry_after: str | None = None, rng: random.Random | None = None) -> Busy:
        """The state after a busy answer heard at ``now``."""
        hinted = parse_retry_after(retry_after) is not None
        delay = attrs.evolve(self.policy, attempt=self.strikes).delay(retry_after, rng)
        if hinted:
            delay *= (rng or random).uniform(1, 1 + self.policy.jitter)
        if now < self.until:
            return attrs.evolve(self, until=max(self.until, now + delay)) if hinted else self
        return attrs.evolve(self, until=now + delay, strikes=self.strikes + 1)

    def answered(self) -> Busy:
        """The state after an answer that was not busy: reset."""
        return attrs.evolve(self, until=0.0, strikes=0)


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
