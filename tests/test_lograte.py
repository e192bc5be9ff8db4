"""Rate-limited log lines (msilo.lograte) with a manual clock."""

from __future__ import annotations

import logging

import pytest

from msilo.lograte import LogRate


def test_a_flood_logs_a_burst_then_says_how_many_were_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    rated = LogRate(logging.getLogger("msilo.test"), burst=2, interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="msilo.test"):
        sent = [rated.log(logging.INFO, "auth_failed", "n=%d", n) for n in range(100)]
        assert sent.count(True) == 2
        assert rated.log(logging.INFO, "other", "n=0")  # each event has its own budget
        now[0] = 1.5
        assert rated.log(logging.INFO, "auth_failed", "n=%d", 100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "event=auth_failed n=0",
        "event=auth_failed n=1",
        "event=other n=0",
        "event=auth_failed n=100 suppressed=98",
    ]


def test_a_disabled_level_costs_nothing() -> None:
    logger = logging.getLogger("msilo.test.quiet")
    logger.setLevel(logging.ERROR)
    assert not LogRate(logger).log(logging.INFO, "x")
