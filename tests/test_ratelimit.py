"""The per-source token bucket of ``[limits]`` rate/burst."""

from __future__ import annotations

import pytest

from msilo.routing.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_the_rate_applies() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    assert [limiter.allow("1.2.3.4") for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.1  # one token back
    assert limiter.allow("1.2.3.4") is True
    assert limiter.allow("1.2.3.4") is False


def test_sources_are_limited_separately() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, clock=clock)
    assert limiter.allow("10.0.0.1") is True
    assert limiter.allow("10.0.0.1") is False
    assert limiter.allow("10.0.0.2") is True


def test_default_burst_is_twice_the_rate() -> None:
    limiter = RateLimiter(rate=3, clock=Clock())
    assert sum(limiter.allow("a") for _ in range(10)) == 6


def test_the_table_stays_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=100, burst=1, clock=clock, max_sources=100)
    for i in range(1000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
        clock.now += 0.001
    assert len(limiter) <= 100


def test_retry_after_is_at_least_a_second() -> None:
    assert RateLimiter(rate=50).retry_after() == 1
    assert RateLimiter(rate=0.2).retry_after() == 5
    with pytest.raises(ValueError):
        RateLimiter(rate=0)
