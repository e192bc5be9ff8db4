"""Failed-authentication throttling, per source address and per identity, deployment-wide.

Online password guessing is bounded by counting, in the database (``msilo_auth_fail``), the
attempts that reach the password check, so every worker on every host sees the same counts:

* **per source**: after ``source_failures`` in a window of ``window`` seconds the source is
  banned for the rest of the window: its requests that need authentication are dropped
  without an answer (silence tells a scanner nothing and costs us nothing).
* **per identity** (the ``username`` at our realm, whether or not it exists): after
  ``user_failures`` in a window, an attempt for that identity is judged only when it is the
  first of its source in the window; the others get a fresh challenge, unjudged.  The user's
  own phone, from an address that has not been guessing, still gets in: an attacker cannot
  lock a user out, only spend one guess per address per window.

An attempt is counted *before* it is judged (and taken back when it succeeds), so a burst of
concurrent guesses cannot slip between a check and its count.  A source that is banned is
remembered in the worker too, so a flood from it does not reach the database.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Callable
from typing import Final, Protocol

from msilo.storage.subscriber import AUTH_KEY_MAX

#: Local memory of banned sources, bounded (older entries go first when full).
MAX_REMEMBERED: Final = 100_000


class FailureStore(Protocol):
    """What the throttle needs from storage (``msilo.storage.base.Store`` has it)."""

    async def count_auth_failures(
        self, source: str, identity: str, *, now: int, window: int
    ) -> tuple[tuple[int, int], tuple[int, int]]: ...

    async def forgive_auth_failures(self, source: str, identity: str, *, now: int) -> None: ...


class Admission(enum.Enum):
    """What to do with an attempt that is about to be judged."""

    JUDGE = "judge"  # check the password
    CHALLENGE = "challenge"  # the identity is under attack: a fresh challenge, unjudged
    DROP = "drop"  # the source is banned: no answer at all


def source_key(ip: str) -> str:
    """The key of a source address (hashed if too long to store, e.g. with a scope id)."""
    key = f"s:{ip}"
    if len(key) > AUTH_KEY_MAX or not key.isascii():
        key = "s#" + hashlib.sha256(ip.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return key


def identity_key(username: str, realm: str) -> str:
    """The key of an identity: a hash, so any bytes a client sends fit the column."""
    text = f"{username}@{realm}".encode("utf-8", "surrogateescape")
    return "u:" + hashlib.sha256(text).hexdigest()[:40]


class AuthThrottle:
    """Counts failed authentications and decides which attempts are judged."""

    def __init__(
        self,
        store: FailureStore,
        *,
        source_failures: int = 10,
        user_failures: int = 10,
        window: int = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.source_failures = source_failures  # 0 = no limit
        self.user_failures = user_failures  # 0 = no limit
        self.window = window
        self._clock = clock
        self._banned: dict[str, int] = {}  # source ip -> end of its ban (epoch seconds)

    def banned(self, ip: str) -> bool:
        """True when this worker knows ``ip`` to be banned (no database round trip)."""
        until = self._banned.get(ip)
        if until is None:
            return False
        if until <= self._clock():
            del self._banned[ip]
            return False
        return True

    async def admit(self, ip: str, username: str, realm: str) -> Admission:
        """Count this attempt for its source and identity; say whether to judge it."""
        now = int(self._clock())
        (by_source, source_end), (by_user, _) = await self.store.count_auth_failures(
            source_key(ip), identity_key(username, realm), now=now, window=self.window
        )
        if self.source_failures and by_source > self.source_failures:
            self._remember(ip, source_end)
            return Admission.DROP
        if self.user_failures and by_user > self.user_failures and by_source > 1:
            return Admission.CHALLENGE
        return Admission.JUDGE

    async def succeeded(self, ip: str, username: str, realm: str) -> None:
        """The attempt was right: it is not a failure of its source or identity."""
        await self.store.forgive_auth_failures(
            source_key(ip), identity_key(username, realm), now=int(self._clock())
        )

    def _remember(self, ip: str, until: int) -> None:
        if ip not in self._banned and len(self._banned) >= MAX_REMEMBERED:
            now = self._clock()
            for old in [k for k, end in self._banned.items() if end <= now] or list(self._banned)[
                : MAX_REMEMBERED // 2
            ]:
                del self._banned[old]
        self._banned[ip] = until
