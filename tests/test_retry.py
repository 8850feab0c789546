"""The retry policy: classification, backoff bounds, Retry-After."""

from __future__ import annotations

import email.utils
import random

import httpx

from worker.rules.retry import RetryPolicy, backoff, jittered, parse_retry_after


def test_policy_is_immutable_and_counts() -> None:
    p = RetryPolicy(total=2)
    assert not p.exhausted
    q = p.increment().increment()
    assert q.exhausted and not p.exhausted


def test_classification() -> None:
    p = RetryPolicy()
    assert all(p.is_retryable_status(c) for c in (408, 429, 502, 503, 504))
    assert not any(p.is_retryable_status(c) for c in (400, 401, 403, 404, 409, 422, 500))
    assert p.is_retryable_error(httpx.ConnectError("refused"))
    assert p.is_retryable_error(httpx.ReadTimeout("slow"))
    assert not p.is_retryable_error(ValueError())


def test_backoff_bounds() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        d = backoff(attempt, 0.5, 10.0, 0.2, rng)
        assert 0.5 * 0.8 * min(2**attempt, 20) <= d <= min(10.0, 0.5 * 2**attempt) * 1.2
    assert all(7 <= jittered(10, rng) <= 13 for _ in range(100))


def test_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(when, now=1_000_000) == 30.0
    assert RetryPolicy(retry_after_cap=5).delay("100") == 5
