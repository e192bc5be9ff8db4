"""Digest credentials as the storage layer sees them, and the nonce-count table.

``subscriber`` is OpenSIPS auth_db's table (version 8): a user is ``(username, domain)`` with
a plain ``password`` and/or precomputed HA1 values, one per digest algorithm.  An empty string
means "not set", as in OpenSIPS (the columns are ``NOT NULL DEFAULT ''``).

``msilo_nonce_use`` is ours: the highest nonce-count accepted per nonce, so a replayed
request is refused by whichever worker or host sees it (RFC 7616 §3.4.5 / RFC 2617 §3.2.2).
``msilo_auth_fail`` is ours too: failed authentications counted per key (a source address or
an identity, opaque here) in fixed windows, so every worker on every host throttles the same
password guesser.

Storage knows nothing of SIP: the SQL below is written with ``{0}`` placeholders and
rendered per dialect by the backends (see ``_sql.to_pg`` / ``_sql.to_sqlite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msilo.errors import InvalidRecord
from msilo.storage.values import check_text, text_problem

#: Name of the nonce-count table (ours; OpenSIPS has no equivalent, it keeps nc in shm).
NONCE_TABLE = "msilo_nonce_use"
#: Name of the failed-authentication table (ours).
AUTH_FAIL_TABLE = "msilo_auth_fail"
#: The longest key counted there (callers hash what they do not control).
AUTH_KEY_MAX = 80

# Character limits of OpenSIPS's subscriber columns (VARCHAR(n)).
_LIMITS = {
    "username": 64,
    "domain": 64,
    "password": 25,
    "ha1": 64,
    "ha1_sha256": 64,
    "ha1_sha512t256": 64,
}
# The longest nonce we store: ours are 44 characters; a client cannot make us store more,
# because only nonces whose HMAC verifies ever reach the table.
NONCE_MAX = 128


@dataclass(frozen=True, slots=True)
class Subscriber:
    """One row of ``subscriber``; a credential field is ``""`` when not set."""

    username: str
    domain: str
    password: str = ""
    ha1: str = ""  # MD5(username:realm:password), hex
    ha1_sha256: str = ""  # SHA-256(...), hex
    ha1_sha512t256: str = ""  # SHA-512/256(...), hex

    def __repr__(self) -> str:
        # Never print secrets (a subscriber may end up in a log line or a test failure).
        have = [
            name
            for name in ("password", "ha1", "ha1_sha256", "ha1_sha512t256")
            if getattr(self, name)
        ]
        return f"Subscriber({self.username!r}, {self.domain!r}, has={have})"

    @property
    def aor(self) -> str:
        """``username@domain``."""
        return f"{self.username}@{self.domain}"


def validate_subscriber(sub: Subscriber) -> None:
    """Raise ``InvalidRecord`` when ``sub`` does not fit the OpenSIPS columns."""
    for field, limit in _LIMITS.items():
        check_text(field, getattr(sub, field), limit)
    if not sub.username or not sub.domain:
        raise InvalidRecord("username and domain must not be empty")


def validate_nonce(nonce: str, nc: int) -> None:
    """Raise ``InvalidRecord`` when a nonce-count cannot be recorded."""
    if not isinstance(nonce, str) or not nonce or text_problem(nonce, NONCE_MAX) is not None:
        raise InvalidRecord(
            f"nonce must be a non-empty str of at most {NONCE_MAX} characters", field="nonce"
        )
    if not isinstance(nc, int) or not 0 <= nc <= 0xFFFFFFFF:
        raise InvalidRecord(
            f"nonce-count must be an integer in 0..0xffffffff, got {nc!r}", field="nc"
        )


# --- SQL (both dialects; the table names are fixed, as OpenSIPS's are) -----------------------

SUBSCRIBER_COLUMNS = "username, domain, password, ha1, ha1_sha256, ha1_sha512t256"

# coalesce: a subscriber table created by other tools may allow NULL.
SELECT_SUBSCRIBER = (
    "SELECT username, domain, coalesce(password, ''), coalesce(ha1, ''), "
    "coalesce(ha1_sha256, ''), coalesce(ha1_sha512t256, '') "
    "FROM subscriber WHERE username = {0} AND domain = {1}"
)
UPDATE_SUBSCRIBER = (
    "UPDATE subscriber SET password = {2}, ha1 = {3}, ha1_sha256 = {4}, ha1_sha512t256 = {5} "
    "WHERE username = {0} AND domain = {1}"
)
INSERT_SUBSCRIBER = (
    f"INSERT INTO subscriber ({SUBSCRIBER_COLUMNS}) "
    f"VALUES ({{0}}, {{1}}, {{2}}, {{3}}, {{4}}, {{5}})"
)
DELETE_SUBSCRIBER = "DELETE FROM subscriber WHERE username = {0} AND domain = {1}"


def subscriber_from_row(row: Sequence[Any]) -> Subscriber:
    """A ``Subscriber`` from a row of ``SELECT_SUBSCRIBER``."""
    return Subscriber(*(str(v) for v in row))


def nonce_table_ddl() -> list[str]:
    """CREATE statements of ``msilo_nonce_use`` (idempotent; same text on both dialects).

    ``expires`` (epoch seconds) is when the row may go: after it the nonce itself is
    refused as stale, so forgetting its count cannot reopen a replay.
    """
    return [
        f"""CREATE TABLE IF NOT EXISTS {NONCE_TABLE} (
    nonce VARCHAR({NONCE_MAX}) NOT NULL PRIMARY KEY,
    nc BIGINT NOT NULL,
    expires BIGINT NOT NULL
)""",
        f"CREATE INDEX IF NOT EXISTS {NONCE_TABLE}_expires_idx ON {NONCE_TABLE} (expires)",
    ]


# "nc must increase", atomically: a new nonce is inserted; a known one is updated only when
# the new count is greater.  One row changed = accepted; none = a replay.  Under concurrency
# PostgreSQL's ON CONFLICT DO UPDATE locks the row and re-checks the WHERE on its newest
# version, and SQLite runs it under the database write lock, so two equal counts racing on
# two hosts can never both be accepted.
USE_NONCE = (
    f"INSERT INTO {NONCE_TABLE} (nonce, nc, expires) VALUES ({{0}}, {{1}}, {{2}}) "
    f"ON CONFLICT (nonce) DO UPDATE SET nc = excluded.nc "
    f"WHERE {NONCE_TABLE}.nc < excluded.nc"
)
DELETE_EXPIRED_NONCES = f"DELETE FROM {NONCE_TABLE} WHERE expires <= {{0}}"


def validate_auth_keys(*keys: str) -> None:
    """Raise ``InvalidRecord`` unless the keys are distinct and each can key a failure count."""
    for who in keys:
        if not isinstance(who, str) or not who or len(who) > AUTH_KEY_MAX or not who.isascii():
            raise InvalidRecord(f"auth key must be 1..{AUTH_KEY_MAX} ASCII characters")
    if len(set(keys)) != len(keys):
        raise InvalidRecord("auth keys must be distinct")


def auth_fail_table_ddl() -> list[str]:
    """CREATE statements of ``msilo_auth_fail`` (idempotent; same text on both dialects).

    ``failures`` counts attempts in the window that ends at ``window_end`` (epoch seconds);
    after it the row is dead and the next failure starts a new window.
    """
    return [
        f"""CREATE TABLE IF NOT EXISTS {AUTH_FAIL_TABLE} (
    who VARCHAR({AUTH_KEY_MAX}) NOT NULL PRIMARY KEY,
    failures BIGINT NOT NULL,
    window_end BIGINT NOT NULL
)""",
        f"CREATE INDEX IF NOT EXISTS {AUTH_FAIL_TABLE}_end_idx ON {AUTH_FAIL_TABLE} (window_end)",
    ]


# One more failure for each of {0} and {1} at time {2}; {3} = the end of a window that starts
# now.  Atomic (the rows are locked by ON CONFLICT DO UPDATE, or the SQLite write lock), so
# concurrent attempts on several hosts are each counted: a count returned is this attempt's
# rank in its window.  One statement for both keys: one round trip per attempt.
COUNT_AUTH_FAILURES = (
    f"INSERT INTO {AUTH_FAIL_TABLE} (who, failures, window_end) "
    f"VALUES ({{0}}, 1, {{3}}), ({{1}}, 1, {{3}}) "
    f"ON CONFLICT (who) DO UPDATE SET "
    f"failures = CASE WHEN {AUTH_FAIL_TABLE}.window_end <= {{2}} THEN 1 "
    f"ELSE {AUTH_FAIL_TABLE}.failures + 1 END, "
    f"window_end = CASE WHEN {AUTH_FAIL_TABLE}.window_end <= {{2}} THEN excluded.window_end "
    f"ELSE {AUTH_FAIL_TABLE}.window_end END "
    f"RETURNING who, failures, window_end"
)
FORGIVE_AUTH_FAILURES = (
    f"UPDATE {AUTH_FAIL_TABLE} SET failures = failures - 1 "
    f"WHERE who IN ({{0}}, {{1}}) AND failures > 0 AND window_end > {{2}}"
)
DELETE_EXPIRED_AUTH_FAILURES = f"DELETE FROM {AUTH_FAIL_TABLE} WHERE window_end <= {{0}}"
