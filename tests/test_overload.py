"""The overload guard's rule with a manual clock (the service test is in tests/service)."""

from __future__ import annotations

from msilo.routing.overload import OverloadGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sheds_while_the_oldest_waits_too_long_and_resumes_when_it_is_done() -> None:
    clock = Clock()
    guard = OverloadGuard(0.3, clock)
    assert guard.admit("a")
    clock.now += 0.2
    assert guard.admit("b")  # a has waited 0.2 s: fine
    clock.now += 0.2
    assert not guard.admit("c")  # a has waited 0.4 s: shed
    assert guard.waiting == 2
    guard.done("a")
    assert guard.admit("c")  # b has waited 0.2 s
    assert 0.19 < guard.oldest_delay() < 0.21
    guard.done("b")
    guard.done("c")
    guard.done("c")  # twice is harmless
    assert guard.waiting == 0 and guard.oldest_delay() == 0.0


def test_a_backlog_that_would_wait_too_long_sheds_until_it_drains() -> None:
    clock = Clock()
    queued = [0]
    guard = OverloadGuard(0.2, clock, backlog=lambda: queued[0])
    assert guard.admit("a")
    guard.done("a")
    # 1,000 unread at the assumed 1,000/s drain rate: 1 s of waiting > 0.2 s.
    queued[0] = 1000
    clock.now += 0.01
    assert not guard.admit("b")
    # Measured: 550 requests taken off the queues (a, b, these, c) in 0.11 s: 5,000/s.
    for _ in range(547):
        guard.refused()
    clock.now += 0.1
    queued[0] = 900  # 900 / 5,000 per s = 0.18 s: admitted again
    assert guard.admit("c")
    queued[0] = 1100  # 0.22 s
    assert guard.admit("d")  # not looked at again within 2 ms
    clock.now += 0.003
    assert not guard.admit("e")


def test_without_a_backlog_probe_only_the_oldest_admitted_counts() -> None:
    clock = Clock()
    guard = OverloadGuard(0.2, clock)
    guard.refused()  # harmless without a probe
    assert not guard.overloaded() and guard.admit("a")
