"""SQL text shared by both backends, built once per ``SiloNames``.

Parameters are written as ``{0}``, ``{1}``... placeholders and rendered per dialect: ``$1``
for asyncpg, ``?1`` for sqlite3 (SQLite's numbered parameters, bound from a sequence).
"""

from __future__ import annotations

import re

from msilo.errors import SchemaError
from msilo.storage.base import (
    LOCATION_VERSION,
    SILO_VERSION,
    SUBSCRIBER_VERSION,
    SiloNames,
    quote_ident,
)

_PLACEHOLDER = re.compile(r"\{(\d+)\}")


def to_pg(sql: str) -> str:
    """``{0}`` → ``$1``."""
    return _PLACEHOLDER.sub(lambda m: f"${int(m.group(1)) + 1}", sql)


def to_sqlite(sql: str) -> str:
    """``{0}`` → ``?1``."""
    return _PLACEHOLDER.sub(lambda m: f"?{int(m.group(1)) + 1}", sql)


class SiloSql:
    """Quoted names and the statements both dialects share."""

    def callid_shared(self, t: str) -> str:
        """SQL: row ``t`` has a Call-ID an earlier stored message of its owner has too.

        An empty Call-ID (Kamailio's column default) is none.  A LIMIT 1 scalar subquery,
        not EXISTS (see the store function): one index lookup.
        """
        return (
            f"{t}.callid IS NOT NULL AND {t}.callid <> '' "
            f"AND coalesce((SELECT true FROM {self.table} x "
            f"WHERE x.{self.username} = {t}.{self.username} AND x.{self.domain} = "
            f"{t}.{self.domain} AND x.callid = {t}.callid AND x.{self.mid} < {t}.{self.mid} "
            f"LIMIT 1), false)"
        )

    def derived_callid_of(self, t: str) -> str:
        """SQL: the Call-ID row ``t``'s deliveries carry -- its own, or when an earlier
        stored message of the owner has it, ``<call-id>-msilo<id>`` (unique, and written
        back when first claimed, so every later attempt carries the same)."""
        return (
            f"CASE WHEN {self.callid_shared(t)} THEN {t}.callid || '-msilo' || {t}.{self.mid} "
            f"ELSE {t}.callid END"
        )

    def __init__(self, names: SiloNames) -> None:
        q = quote_ident
        self.names = names
        self.table = q(names.table)
        self.mid = q(names.mid)
        self.username = q(names.username)
        self.domain = q(names.domain)
        self.src_addr = q(names.src_addr)
        self.dst_addr = q(names.dst_addr)
        self.body = q(names.body)
        self.ctype = q(names.ctype)
        self.inc_time = q(names.inc_time)
        self.exp_time = q(names.exp_time)
        self.snd_time = q(names.snd_time)

        self.idx_account = q(names.object_name("account_idx"))
        self.idx_expiry = q(names.object_name("exp_time_idx"))
        self.idx_due = q(names.object_name("snd_time_idx"))
        self.idx_lease = q(names.object_name("lease_idx"))
        self.idx_dedupe = q(names.object_name("dedupe_key_idx"))

        # What StoredMessage is built from, in its field order.
        self.columns = (
            f"{self.mid}, {self.username}, {self.domain}, {self.src_addr}, {self.dst_addr}, "
            f"{self.body}, {self.ctype}, {self.inc_time}, {self.exp_time}, {self.snd_time}, "
            f"attempts, callid"
        )
        self.order_arrival = f"{self.inc_time}, {self.mid}"
        t = self.table
        owner = f"{self.username} = {{0}} AND {self.domain} = {{1}}"
        self.count = f"SELECT count(*) FROM {t} WHERE {owner}"
        self.list = f"SELECT {self.columns} FROM {t} WHERE {owner} ORDER BY {self.order_arrival}"
        self.purge = f"DELETE FROM {t} WHERE {owner}"
        self.recover = (
            f"UPDATE {t} SET lease_until = NULL, lease_owner = NULL "
            f"WHERE lease_until IS NOT NULL AND lease_until <= {{0}}"
        )
        # One bounded batch of a mass expiry ({1} rows at most): a statement deleting every
        # expired row at once would hold the writer (SQLite) or flood the WAL (PostgreSQL)
        # for as long as it runs, and the stores would wait behind it.  The expiry index
        # finds the rows; no order is needed, the caller repeats until a batch falls short.
        self.expire = (
            f"DELETE FROM {t} WHERE {self.mid} IN (SELECT {self.mid} FROM {t} "
            f"WHERE {self.exp_time} <= {{0}} LIMIT {{1}})"
        )
        # A bounded batch: a mass expiry must not pull every body into memory at once.
        self.take_expired = (
            f"DELETE FROM {t} WHERE {self.mid} IN (SELECT {self.mid} FROM {t} "
            f"WHERE {self.exp_time} <= {{0}} ORDER BY {self.mid} LIMIT {{1}}) "
            f"RETURNING {self.columns}"
        )
        # Ordinary rows deliverable now (spec §4.4, plus D6/Q20: never an expired one).
        self.dump_filter = (
            f"{self.username} = {{0}} AND {self.domain} = {{1}} AND {self.snd_time} = 0 "
            f"AND {self.exp_time} > {{2}} AND (lease_until IS NULL OR lease_until <= {{2}})"
        )
        # ``<> 0`` spelled out so the planner can use the partial index on due reminders.
        self.due_filter = (
            f"{self.snd_time} <> 0 AND {self.snd_time} > 0 AND {self.snd_time} <= {{0}} "
            f"AND {self.exp_time} > {{0}} AND (lease_until IS NULL OR lease_until <= {{0}})"
        )


# --- schema -------------------------------------------------------------------------------

# Our extra silo columns and their definitions (the same text on both dialects).
EXTRA_COLUMN_DEFS = {
    "dedupe_key": "TEXT DEFAULT NULL",
    "lease_until": "BIGINT DEFAULT NULL",
    "lease_owner": "TEXT DEFAULT NULL",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "callid": "TEXT DEFAULT NULL",
}
#: Extra columns added after the first release: ``create_schema`` adds them to a table of
#: our own layout by itself (nullable, no rewrite); an OpenSIPS table gets them from
#: ``msilo db upgrade`` with the rest.
LATER_COLUMNS = ("callid",)

#: The version Kamailio's scripts give their silo table (msilo-create.sql).  Its layout is
#: OpenSIPS's plus ``extra_hdrs TEXT``, ``callid VARCHAR(128) NOT NULL DEFAULT ''`` and
#: ``status INTEGER NOT NULL DEFAULT 0``, with ``ctype VARCHAR(32) NOT NULL DEFAULT
#: 'text/plain'``.  ``msilo db upgrade`` converts it (``is_kamailio_silo``); the converted
#: table keeps ``extra_hdrs`` and ``status`` as they are, and its version row says
#: ``SILO_VERSION`` from then on: Kamailio's msilo no longer takes it, msilo does.
KAMAILIO_SILO_VERSION = 8


def is_kamailio_silo(columns: set[str], version: int | None, *, fold_case: bool) -> bool:
    """True for a silo table as Kamailio creates it: its ``callid`` column, none of msilo's
    own, and version 8 -- or no version row, as when the table alone was copied into
    msilo's database (OpenSIPS's table has no ``callid``; a table of ours whose version row
    says 8 is not one)."""
    have = {c.lower() for c in columns} if fold_case else columns
    return (
        version in (None, KAMAILIO_SILO_VERSION)
        and "callid" in have
        and not have & {"dedupe_key", "lease_until", "lease_owner", "attempts"}
    )


def kamailio_conversion(table: str, version: int | None) -> str:
    """The action line of a converted Kamailio table."""
    was = "no version row" if version is None else f"version {version}"
    return (
        f"converted Kamailio's {table} table ({was}) to msilo's layout (version {SILO_VERSION});"
        " extra_hdrs and status kept as they are"
    )


def silo_table_ddl(s: SiloSql, *, id_type: str, blob_type: str, more: tuple[str, ...] = ()) -> str:
    """CREATE TABLE for the silo table: OpenSIPS's ten columns, 64-bit, plus ours.

    ``more``: further column definitions, kept from a table being converted (Kamailio's
    ``extra_hdrs`` and ``status``)."""
    defs = [f"{name} {ddl}" for name, ddl in EXTRA_COLUMN_DEFS.items()] + list(more)
    extras = ",\n    ".join(defs)
    return f"""CREATE TABLE IF NOT EXISTS {s.table} (
    {s.mid} {id_type},
    {s.src_addr} VARCHAR(255) NOT NULL DEFAULT '',
    {s.dst_addr} VARCHAR(255) NOT NULL DEFAULT '',
    {s.username} VARCHAR(64) NOT NULL DEFAULT '',
    {s.domain} VARCHAR(64) NOT NULL DEFAULT '',
    {s.inc_time} BIGINT NOT NULL DEFAULT 0,
    {s.exp_time} BIGINT NOT NULL DEFAULT 0,
    {s.snd_time} BIGINT NOT NULL DEFAULT 0,
    {s.ctype} TEXT DEFAULT NULL,
    {s.body} {blob_type} DEFAULT NULL,
    {extras}
)"""


def silo_index_ddl(s: SiloSql) -> list[str]:
    """The silo indexes: owner (OpenSIPS's), expiry, due reminders, live leases, dedupe."""
    t = s.table
    return [
        f"CREATE INDEX IF NOT EXISTS {s.idx_account} ON {t} ({s.username}, {s.domain})",
        f"CREATE INDEX IF NOT EXISTS {s.idx_expiry} ON {t} ({s.exp_time})",
        # Partial: scheduled rows are few, and the reminder cycle scans only them.
        f"CREATE INDEX IF NOT EXISTS {s.idx_due} ON {t} ({s.snd_time}) WHERE {s.snd_time} <> 0",
        # Partial: lease recovery runs every check_time and must not scan the table.
        f"CREATE INDEX IF NOT EXISTS {s.idx_lease} ON {t} (lease_until) "
        f"WHERE lease_until IS NOT NULL",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {s.idx_dedupe} ON {t} (dedupe_key)",
    ]


# PostgreSQL: the settings of msilo's plpgsql functions.  plpgsql plans each statement for
# the call's values ("custom plans") for as long as it judges that cheaper than one generic
# plan -- for the store function's one big statement, always -- and planning it cost more
# than running it: one row per call on one connection, round trip included, 1,030-1,170 us
# custom against 360-510 us generic.  Rows reach the plan as arrays and find their indexes
# per row, so the generic plan is the one a custom plan would pick anyway.  (PostgreSQL 12+.)
GENERIC_PLANS = "plan_cache_mode = force_generic_plan"
GENERIC_PLANS_SETTING = "plan_cache_mode=force_generic_plan"  # as pg_proc.proconfig shows it

VERSION_DDL = """CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT version_t_name_idx UNIQUE (table_name)
)"""


def aux_tables_ddl(*, id_type: str) -> list[tuple[str, list[str], int]]:
    """(table, [CREATE statements], version) of location and subscriber."""
    location = f"""CREATE TABLE IF NOT EXISTS location (
    id {id_type},
    username VARCHAR(64) NOT NULL DEFAULT '',
    domain VARCHAR(64) NOT NULL DEFAULT '',
    contact TEXT NOT NULL,
    received TEXT DEFAULT NULL,
    path TEXT DEFAULT NULL,
    expires BIGINT NOT NULL DEFAULT 0,
    q REAL DEFAULT NULL,
    callid TEXT NOT NULL DEFAULT '',
    cseq INTEGER NOT NULL DEFAULT 0,
    methods TEXT DEFAULT NULL,
    instance TEXT DEFAULT NULL,
    transport TEXT DEFAULT NULL,
    last_modified BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT location_contact_idx UNIQUE (username, domain, contact)
)"""
    subscriber = f"""CREATE TABLE IF NOT EXISTS subscriber (
    id {id_type},
    username VARCHAR(64) NOT NULL DEFAULT '',
    domain VARCHAR(64) NOT NULL DEFAULT '',
    password VARCHAR(25) NOT NULL DEFAULT '',
    ha1 VARCHAR(64) NOT NULL DEFAULT '',
    ha1_sha256 VARCHAR(64) NOT NULL DEFAULT '',
    ha1_sha512t256 VARCHAR(64) NOT NULL DEFAULT '',
    CONSTRAINT subscriber_account_idx UNIQUE (username, domain)
)"""
    return [
        (
            "location",
            [
                location,
                "CREATE INDEX IF NOT EXISTS location_account_idx ON location (username, domain)",
            ],
            LOCATION_VERSION,
        ),
        (
            "subscriber",
            [
                subscriber,
                "CREATE INDEX IF NOT EXISTS subscriber_username_idx ON subscriber (username)",
            ],
            SUBSCRIBER_VERSION,
        ),
    ]


def diagnose_silo(
    names: SiloNames,
    columns: set[str] | None,
    version: int | None,
    *,
    fold_case: bool,
) -> None:
    """Raise ``SchemaError`` saying what to do when the silo table cannot be used.

    ``columns`` is None when the table is missing; ``version`` None when its version row
    (or the whole ``version`` table) is.
    """
    t = names.table

    def norm(name: str) -> str:
        return name.lower() if fold_case else name

    if columns is None:
        raise SchemaError(f"table {t!r} does not exist: run `msilo db init`")
    have = {norm(c) for c in columns}
    if norm(names.mid) not in have and norm("id") in have:
        raise SchemaError(
            f"table {t!r} has no column {names.mid!r} but has 'id' (the OpenSIPS layout): "
            f'set sc_mid = "id" in the [msilo] section'
        )
    configured = [getattr(names, f) for f in CONFIGURED_COLUMNS]
    missing = [c for c in configured if norm(c) not in have]
    if missing:
        raise SchemaError(
            f"table {t!r} has no column(s) {', '.join(missing)}: "
            f"check db_table and the sc_* column names"
        )
    if is_kamailio_silo(set(columns), version, fold_case=fold_case):
        raise SchemaError(
            f"table {t!r} has Kamailio's msilo layout"
            f" ({'no version row' if version is None else f'version {version}'}):"
            " dump it, then run `msilo db upgrade` to convert it in place"
        )
    if version is not None and version != SILO_VERSION:
        raise SchemaError(
            f"table {t!r} has version {version} in table 'version', msilo needs "
            f"{SILO_VERSION} (the OpenSIPS msilo layout; Kamailio's is 8)"
        )
    extras = [c for c in EXTRA_COLUMN_DEFS if c not in have]
    if extras:
        raise SchemaError(
            f"table {t!r} lacks msilo's column(s) {', '.join(extras)}: run `msilo db upgrade`"
        )
    if version is None:
        raise SchemaError(f"table 'version' has no row for {t!r}: run `msilo db upgrade`")


CONFIGURED_COLUMNS = (
    "mid",
    "src_addr",
    "dst_addr",
    "username",
    "domain",
    "body",
    "ctype",
    "exp_time",
    "inc_time",
    "snd_time",
)
