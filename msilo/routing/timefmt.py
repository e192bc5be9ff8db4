"""Times as msilo shows and reads them: the body date prefix and send times.

(The Date header is :func:`msilo.sip.build.format_date`.)

Send times and the prefix use the configured ``msilo.timezone`` (an IANA name;
None = the host's zone), with daylight saving handled by zoneinfo (D7, D10, §10 Q14).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import zoneinfo

_SND_TIME = re.compile(r"^[0-9]{14}$")

OFFLINE_PREFIX = b"[Offline message - "
REMINDER_PREFIX = b"[Reminder message - "


def zone(name: str | None) -> dt.tzinfo:
    """The tzinfo for an IANA name, or the host's local zone for None."""
    if name is None:
        local = dt.datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    return zoneinfo.ZoneInfo(name)


@functools.lru_cache(maxsize=1024)  # a dump renders the same few arrival seconds often
def ctime(epoch: int, tz: dt.tzinfo) -> str:
    """C ``ctime()`` layout in ``tz``: ``Mon Feb  5 09:03:01 2024`` (day padded with a space)."""
    return dt.datetime.fromtimestamp(epoch, tz).strftime("%a %b %e %H:%M:%S %Y")


def date_prefix(epoch: int, tz: dt.tzinfo, *, reminder: bool = False) -> bytes:
    """``[Offline message - <ctime>] `` (or ``[Reminder message - …] ``) as bytes (D7)."""
    head = REMINDER_PREFIX if reminder else OFFLINE_PREFIX
    return head + ctime(epoch, tz).encode() + b"] "


def has_date_prefix(body: bytes) -> bool:
    """True if ``body`` already starts with one of our prefixes (never prefix twice, D7)."""
    return body.startswith(OFFLINE_PREFIX) or body.startswith(REMINDER_PREFIX)


def parse_snd_time(text: str, tz: dt.tzinfo) -> int | None:
    """A ``YYYYMMDDHHMMSS`` send time in ``tz`` as epoch seconds, or None if malformed.

    Strictly 14 digits and a real calendar time (no 31 February, no partial
    strings, unlike the reference, §3.5).  In the autumn overlap the first
    occurrence is taken; a time inside the spring gap is taken as if standard
    time still applied, which is what zoneinfo's fold=0 does.
    """
    value = text.strip()
    if not _SND_TIME.match(value):
        return None
    try:
        local = dt.datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[8:10]),
            int(value[10:12]),
            int(value[12:14]),
            tzinfo=tz,
        )
    except ValueError:
        return None
    return int(local.timestamp())
