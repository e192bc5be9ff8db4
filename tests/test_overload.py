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
