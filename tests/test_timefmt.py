"""Date header, date prefix (D7) and send-time parsing (D10)."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from msilo.routing.timefmt import date_prefix, has_date_prefix, parse_snd_time, zone

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
UTC = zoneinfo.ZoneInfo("UTC")
# 2024-02-05 09:03:01 UTC
T = int(dt.datetime(2024, 2, 5, 9, 3, 1, tzinfo=dt.UTC).timestamp())


def test_prefix_is_ctime_in_the_configured_zone() -> None:
    assert date_prefix(T, UTC) == b"[Offline message - Mon Feb  5 09:03:01 2024] "
    assert date_prefix(T, BERLIN) == b"[Offline message - Mon Feb  5 10:03:01 2024] "
    assert date_prefix(T, UTC, reminder=True) == b"[Reminder message - Mon Feb  5 09:03:01 2024] "


def test_prefixed_bodies_are_recognised() -> None:
    assert has_date_prefix(date_prefix(T, UTC) + b"hi")
    assert has_date_prefix(date_prefix(T, UTC, reminder=True) + b"hi")
    assert not has_date_prefix(b"hi [Offline message - x] ")


def test_snd_time_is_read_in_the_zone_with_daylight_saving() -> None:
    # 1 July 2030 12:00 in Berlin is 10:00 UTC (CEST, +2): the reference fires an hour late.
    summer = parse_snd_time("20300701120000", BERLIN)
    assert summer == int(dt.datetime(2030, 7, 1, 10, 0, tzinfo=dt.UTC).timestamp())
    winter = parse_snd_time("20300101120000", BERLIN)
    assert winter == int(dt.datetime(2030, 1, 1, 11, 0, tzinfo=dt.UTC).timestamp())


@pytest.mark.parametrize(
    "text",
    [
        "2030",
        "20300101",
        "2030010112000",
        "203001011200000",
        "20300231120000",
        "20301301120000",
        "20300101250000",
        "2030010112000x",
        "",
        "２０３００１０１１２００００",
    ],
)
def test_malformed_snd_times_are_rejected(text: str) -> None:
    assert parse_snd_time(text, UTC) is None


def test_local_zone_is_used_when_none_is_configured() -> None:
    assert zone(None).utcoffset(dt.datetime.now()) is not None
