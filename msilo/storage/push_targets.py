"""Push targets: the RFC 8599 parameters of a user's devices, and when each was last pushed.

One table beside the device table, ``msilo_push``, one row per device that registered with
``pn-provider``/``pn-prid`` (and maybe ``pn-param``).  It outlives the binding -- a sleeping
phone's registration lapses, and that is when it needs the push -- for as long as the
device is remembered (``msilo.device_memory``, counted from ``last_register``).

``pushed_ms`` is the coalescing window: claiming a push is one conditional UPDATE that
only succeeds when the device was not pushed in the last ``push.coalesce`` seconds, so
workers and hosts sharing the database send one push per device per window without
talking to each other.  It is cleared when a delivery reaches the device (the push did
its job), which also gives the push -> delivered latency.

Storage knows nothing of SIP or of the providers: provider names, tokens and device keys
are plain strings.
"""

from __future__ import annotations

from dataclasses import dataclass

PUSH_TABLE = "msilo_push"


@dataclass(frozen=True, slots=True)
class PushRecord:
    """One device's push parameters, as stored."""

    device: str
    provider: str
    prid: str
    param: str | None
    waiting: int = 0  # the owner's stored messages when it was claimed (the push's count)


def push_ddl() -> list[str]:
    """CREATE statements of the push table (the same text on SQLite and PostgreSQL)."""
    return [
        f"""CREATE TABLE IF NOT EXISTS {PUSH_TABLE} (
    username VARCHAR(64) NOT NULL,
    domain VARCHAR(64) NOT NULL,
    device TEXT NOT NULL,
    provider VARCHAR(64) NOT NULL,
    prid TEXT NOT NULL,
    param TEXT DEFAULT NULL,
    last_register BIGINT NOT NULL,
    pushed_ms BIGINT DEFAULT NULL,
    PRIMARY KEY (username, domain, device)
)""",
        # The leader forgets push targets by age, with the devices.
        f"CREATE INDEX IF NOT EXISTS {PUSH_TABLE}_last_idx ON {PUSH_TABLE} (last_register)",
    ]


class PushSql:
    """Statements both dialects share (``{n}`` placeholders, see ``_sql.to_pg``)."""

    # A new token starts a new window: the old one's push went to another app instance.
    save = (
        f"INSERT INTO {PUSH_TABLE} AS p (username, domain, device, provider, prid, param, "
        f"last_register) VALUES ({{0}}, {{1}}, {{2}}, {{3}}, {{4}}, {{5}}, {{6}}) "
        f"ON CONFLICT (username, domain, device) DO UPDATE SET provider = excluded.provider, "
        f"prid = excluded.prid, param = excluded.param, "
        f"last_register = excluded.last_register, "
        f"pushed_ms = CASE WHEN p.prid = excluded.prid THEN p.pushed_ms ELSE NULL END"
    )
    drop = (
        f"DELETE FROM {PUSH_TABLE} WHERE username = {{0}} AND domain = {{1}} "
        f"AND device = {{2}} AND prid = {{3}}"
    )
    forget_all = f"DELETE FROM {PUSH_TABLE} WHERE username = {{0}} AND domain = {{1}}"
    forget_one = (
        f"DELETE FROM {PUSH_TABLE} WHERE username = {{0}} AND domain = {{1}} AND device = {{2}}"
    )
    forget_old = f"DELETE FROM {PUSH_TABLE} WHERE last_register < {{0}}"
    # The devices the claim may take; ``{excluded}`` is a dialect's "device not in the
    # list" test (PostgreSQL: an array; SQLite: a JSON list).
    _claim = (
        f"UPDATE {PUSH_TABLE} SET pushed_ms = {{2}} WHERE username = {{0}} AND domain = {{1}} "
        f"AND last_register >= {{3}} AND (pushed_ms IS NULL OR pushed_ms <= {{4}}) "
        f"AND {{excluded}} RETURNING device, provider, prid, param"
    )
    pg_claim = _claim.replace("{excluded}", "device <> ALL({5}::text[])")
    sqlite_claim = _claim.replace("{excluded}", "device NOT IN (SELECT value FROM json_each({5}))")

    @staticmethod
    def pg_claim_many(waiting: str) -> str:
        """PostgreSQL: claims of many owners in one statement (one row of the arrays per
        claim; ``k.i`` says whose), each taken device with ``waiting``, SQL that counts
        the owner ``p``'s stored messages."""
        return (
            f"UPDATE {PUSH_TABLE} p SET pushed_ms = k.now_ms "
            f"FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) "
            f"WITH ORDINALITY AS k(u, d, now_ms, cutoff, since, i) "
            f"WHERE p.username = k.u AND p.domain = k.d AND p.last_register >= k.since "
            f"AND (p.pushed_ms IS NULL OR p.pushed_ms <= k.cutoff) "
            f"RETURNING k.i, p.device, p.provider, p.prid, p.param, ({waiting})"
        )

    # The time of the push that woke the device, cleared: a later delivery is not its doing.
    pushed_at = (
        f"SELECT pushed_ms FROM {PUSH_TABLE} WHERE username = {{0}} AND domain = {{1}} "
        f"AND device = {{2}} AND pushed_ms IS NOT NULL"
    )
    clear_pushed = (
        f"UPDATE {PUSH_TABLE} SET pushed_ms = NULL WHERE username = {{0}} AND domain = {{1}} "
        f"AND device = {{2}} AND pushed_ms = {{3}}"
    )


__all__ = ["PUSH_TABLE", "PushRecord", "PushSql", "push_ddl"]
