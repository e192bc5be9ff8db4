"""Schema: created when missing, checked with messages that say what to do, upgraded in
place from the layout OpenSIPS's own scripts create."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from conftest import StoreFactory
from storage_helpers import OWNER, message

from msilo.errors import SchemaError
from msilo.storage import SiloNames, Store, StoreOutcome, open_store
from msilo.storage.mysql import MySQLStore
from msilo.storage.postgres import PostgresStore
from msilo.storage.sqlite import SQLiteStore
from tests.conftest import mysql_script
from tests.mariadbserver import OPENSIPS_MYSQL


async def raw(store: Store, sql: str) -> None:
    """Run DDL/DML behind the store's back (what an admin or OpenSIPS would do)."""
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            conn.executescript(sql)
        finally:
            conn.close()
    elif isinstance(store, MySQLStore):
        await mysql_script(store.url, sql)
    else:
        assert isinstance(store, PostgresStore)
        pg = await asyncpg.connect(store.dsn)
        try:
            await pg.execute(sql)
        finally:
            await pg.close()


async def test_create_schema_twice_is_harmless(store: Store) -> None:
    await store.create_schema()
    await store.check_schema()
    assert (await store.store_batch([message()], 0))[0].outcome is StoreOutcome.STORED
    await store.create_schema()
    assert await store.count(*OWNER) == 1


async def test_upgrade_of_our_own_schema_does_nothing(store: Store) -> None:
    assert await store.upgrade_schema() == []


async def test_missing_table_says_run_db_init(make_store: StoreFactory) -> None:
    s = await make_store()
    with pytest.raises(SchemaError, match=r"does not exist: run `msilo db init`"):
        await s.check_schema()


async def test_using_a_missing_table_is_a_schema_error(make_store: StoreFactory) -> None:
    s = await make_store()
    with pytest.raises(SchemaError, match="msilo db init"):
        await s.count(*OWNER)


async def test_missing_extra_columns_say_run_db_upgrade(
    make_store: StoreFactory, names: SiloNames
) -> None:
    s = await make_store()
    await s.create_schema()
    await raw(s, f'ALTER TABLE "{names.table}" DROP COLUMN lease_owner')
    with pytest.raises(SchemaError, match=r"lease_owner: run `msilo db upgrade`"):
        await s.check_schema()
    await s.upgrade_schema()
    await s.check_schema()


async def test_opensips_id_column_says_set_sc_mid(
    make_store: StoreFactory, names: SiloNames
) -> None:
    s = await make_store()
    await s.create_schema()
    await raw(s, f'ALTER TABLE "{names.table}" RENAME COLUMN mid TO id')
    with pytest.raises(SchemaError, match=r'set sc_mid = "id"'):
        await s.check_schema()
    with pytest.raises(SchemaError, match=r'set sc_mid = "id"'):
        await s.upgrade_schema()


async def test_foreign_table_version_is_refused(make_store: StoreFactory, names: SiloNames) -> None:
    s = await make_store()
    await s.create_schema()
    await raw(s, f"UPDATE version SET table_version = 8 WHERE table_name = '{names.table}'")
    with pytest.raises(SchemaError, match=r"version 8 .* msilo needs 6"):
        await s.check_schema()
    with pytest.raises(SchemaError, match=r"version 8"):
        await s.upgrade_schema()


async def test_missing_version_row_says_run_db_upgrade(
    make_store: StoreFactory, names: SiloNames
) -> None:
    s = await make_store()
    await s.create_schema()
    await raw(s, f"DELETE FROM version WHERE table_name = '{names.table}'")
    with pytest.raises(SchemaError, match=r"no row for .*: run `msilo db upgrade`"):
        await s.check_schema()
    assert f"set version of {names.table} to 6" in await s.upgrade_schema()
    await s.check_schema()


async def test_auxiliary_tables_and_versions_exist(store: Store, names: SiloNames) -> None:
    rows: dict[str, int] = {}
    if isinstance(store, MySQLStore):
        rows = {
            str(k): int(v)
            for k, v in await fetch(store, "SELECT table_name, table_version FROM version")
        }
        for table in ("location", "subscriber"):
            assert await fetch(store, f"SELECT count(*) FROM {table}") == [(0,)]
    elif isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            rows = dict(conn.execute("SELECT table_name, table_version FROM version"))
            for table in ("location", "subscriber"):
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
        finally:
            conn.close()
    else:
        assert isinstance(store, PostgresStore)
        pg = await asyncpg.connect(store.dsn)
        try:
            rows = dict(await pg.fetch("SELECT table_name, table_version FROM version"))
            for table in ("location", "subscriber"):
                assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0
        finally:
            await pg.close()
    assert rows[names.table] == 6
    assert rows["location"] == 1013
    assert rows["subscriber"] == 8


async def test_configured_column_names_are_used(make_store: StoreFactory, names: SiloNames) -> None:
    custom = SiloNames(
        table=names.table,
        mid="msg_id",
        src_addr="sender",
        dst_addr="recipient",
        username="usr",
        domain="dom",
        body="payload",
        ctype="content_type",
        exp_time="expires_at",
        inc_time="arrived_at",
        snd_time="send_at",
    )
    s = await make_store(custom)
    await s.create_schema()
    [r] = await s.store_batch([message(body=b"x")], 1)
    assert r.outcome is StoreOutcome.STORED
    assert [m.body for m in await s.list(*OWNER)] == [b"x"]
    assert (await s.store_batch([message()], 1))[0].outcome is StoreOutcome.OVER_QUOTA


# --- upgrading a table created by OpenSIPS's own scripts --------------------------------------

OPENSIPS_PG = """
CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_t_name_idx UNIQUE (table_name)
);
INSERT INTO version (table_name, table_version) values ('{t}','6');
CREATE TABLE {t} (
    id SERIAL PRIMARY KEY NOT NULL,
    src_addr VARCHAR(255) DEFAULT '' NOT NULL,
    dst_addr VARCHAR(255) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    inc_time INTEGER DEFAULT 0 NOT NULL,
    exp_time INTEGER DEFAULT 0 NOT NULL,
    snd_time INTEGER DEFAULT 0 NOT NULL,
    ctype VARCHAR(255) DEFAULT NULL,
    body BYTEA DEFAULT NULL
);
ALTER SEQUENCE {t}_id_seq MAXVALUE 2147483647 CYCLE;
CREATE INDEX {t}_account_idx ON {t} (username, domain);
INSERT INTO {t} (src_addr, dst_addr, username, domain, inc_time, exp_time, snd_time, ctype, body)
VALUES ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', 'old one'::bytea),
       ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', NULL);
"""

OPENSIPS_SQLITE = """
CREATE TABLE IF NOT EXISTS version (
    table_name CHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_t_name_idx  UNIQUE (table_name)
);
INSERT INTO version (table_name, table_version) values ('{t}','6');
CREATE TABLE {t} (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    src_addr CHAR(255) DEFAULT '' NOT NULL,
    dst_addr CHAR(255) DEFAULT '' NOT NULL,
    username CHAR(64) DEFAULT '' NOT NULL,
    domain CHAR(64) DEFAULT '' NOT NULL,
    inc_time INTEGER DEFAULT 0 NOT NULL,
    exp_time INTEGER DEFAULT 0 NOT NULL,
    snd_time INTEGER DEFAULT 0 NOT NULL,
    ctype CHAR(255) DEFAULT NULL,
    body BLOB DEFAULT NULL
);
CREATE INDEX {t}_account_idx  ON {t} (username, domain);
INSERT INTO {t} (src_addr, dst_addr, username, domain, inc_time, exp_time, snd_time, ctype, body)
VALUES ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', X'6f6c64206f6e65'),
       ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', NULL);
"""


OPENSIPS = {"sqlite": OPENSIPS_SQLITE, "postgres": OPENSIPS_PG, "mysql": OPENSIPS_MYSQL}


async def test_upgrade_keeps_opensips_rows_and_works_afterwards(
    make_store: StoreFactory, names: SiloNames, backend: str
) -> None:
    from storage_helpers import NOW

    opensips = SiloNames(table=names.table, mid="id")
    s = await make_store(opensips)
    script = OPENSIPS[backend]
    await raw(s, script.format(t=names.table, now=NOW - 10, exp=NOW + 3600))

    with pytest.raises(SchemaError, match="msilo db upgrade"):
        await s.check_schema()
    # create_schema (what `msilo serve` runs) leaves a foreign table alone and says why.
    with pytest.raises(SchemaError, match="msilo db upgrade"):
        await s.create_schema()

    actions = await s.upgrade_schema()
    assert f"added column {names.table}.dedupe_key" in actions
    assert f"created index {names.table}_dedupe_key_idx" in actions
    if backend == "postgres":
        assert f"widened {names.table}.id to BIGINT" in actions
        assert f"widened {names.table}.inc_time to BIGINT" in actions
        assert f"widened {names.table}.ctype to TEXT" in actions
        assert any("without CYCLE" in a for a in actions)
    if backend == "mysql":
        assert f"widened {names.table}.id to BIGINT" in actions
        assert f"widened {names.table}.inc_time to BIGINT" in actions
        assert f"widened {names.table}.ctype to TEXT (nullable)" in actions
        assert f"widened {names.table}.body to MEDIUMBLOB (16 MiB)" in actions
        assert any(a.startswith(f"converted {names.table} to utf8mb4") for a in actions)
        # Ours holds the arrival time too (claims read rows in arrival order).
        assert f"created index {names.table}_account_idx" in actions
    await s.check_schema()
    assert await s.upgrade_schema() == []  # idempotent

    old = await s.list(*OWNER)
    assert [m.body for m in old] == [b"old one", b""]
    assert all(m.attempts == 0 for m in old)

    [r] = await s.store_batch(
        [message(body=b"new", inc_time=NOW, ctype="text/plain; " + "x" * 400)], 3
    )
    assert r.outcome is StoreOutcome.STORED and r.mid is not None and r.mid > old[-1].mid
    assert (await s.store_batch([message()], 3))[0].outcome is StoreOutcome.OVER_QUOTA
    claimed = await s.claim_for_dump(*OWNER, lease_owner="w", lease_seconds=30, now=NOW)
    assert [m.body for m in claimed] == [b"old one", b"", b"new"]

    # 64-bit times and ids after the upgrade.
    [big] = await s.store_batch([message("carol", inc_time=2**40, exp_time=2**41)], 0)
    assert big.outcome is StoreOutcome.STORED
    assert (await s.list("carol", OWNER[1]))[0].exp_time == 2**41


async def test_expiry_runs_in_batches_on_an_upgraded_opensips_table(
    make_store: StoreFactory, names: SiloNames, backend: str
) -> None:
    from storage_helpers import NOW

    from msilo.leader.cycles import delete_expired_in_batches

    s = await make_store(SiloNames(table=names.table, mid="id"))
    # OpenSIPS's two rows, both expired.
    await raw(s, OPENSIPS[backend].format(t=names.table, now=NOW - 100, exp=NOW - 1))
    actions = await s.upgrade_schema()
    # The expiry statements find their rows through an index OpenSIPS's table lacks.
    assert f"created index {names.table}_exp_time_idx" in actions
    await s.store_batch([message(body=str(i).encode(), exp_time=NOW - 1) for i in range(9)], 0)
    await s.store_batch([message(body=b"live"), message(body=b"later", snd_time=NOW + 60)], 0)
    counted: list[int] = []
    assert await delete_expired_in_batches(s, NOW, batch=4, pause=0, count=counted.append) == 11
    assert counted == [4, 4, 3]
    assert [m.body for m in await s.list(*OWNER)] == [b"live", b"later"]


@pytest.mark.backend_only("postgres")
async def test_upgraded_opensips_sequence_goes_past_2_to_the_31(
    make_store: StoreFactory, names: SiloNames
) -> None:
    s = await make_store(SiloNames(table=names.table, mid="id"))
    await raw(s, OPENSIPS_PG.format(t=names.table, now=1, exp=2))
    await s.upgrade_schema()
    await raw(s, f"SELECT setval('{names.table}_id_seq', 2147483647)")
    [r] = await s.store_batch([message()], 0)
    assert r.mid == 2147483648


# --- converting Kamailio's version 8 table ----------------------------------------------------

# Kamailio's silo table as its scripts create it (kamctl's postgres/ and db_sqlite/
# msilo-create.sql, version 8): OpenSIPS's columns plus extra_hdrs, callid and status, with a
# 32-character ctype and NOT NULL callid/ctype.
KAMAILIO_V8 = {
    "postgres": """
CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name)
);
CREATE TABLE {t} (
    id SERIAL PRIMARY KEY NOT NULL,
    src_addr VARCHAR(255) DEFAULT '' NOT NULL,
    dst_addr VARCHAR(255) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    inc_time INTEGER DEFAULT 0 NOT NULL,
    exp_time INTEGER DEFAULT 0 NOT NULL,
    snd_time INTEGER DEFAULT 0 NOT NULL,
    ctype VARCHAR(32) DEFAULT 'text/plain' NOT NULL,
    body BYTEA,
    extra_hdrs TEXT,
    callid VARCHAR(128) DEFAULT '' NOT NULL,
    status INTEGER DEFAULT 0 NOT NULL
);
CREATE INDEX {t}_account_idx ON {t} (username, domain);
INSERT INTO version (table_name, table_version) values ('{t}','8');
""",
    "sqlite": """
CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name)
);
CREATE TABLE {t} (
    id INTEGER PRIMARY KEY NOT NULL,
    src_addr VARCHAR(255) DEFAULT '' NOT NULL,
    dst_addr VARCHAR(255) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    inc_time INTEGER DEFAULT 0 NOT NULL,
    exp_time INTEGER DEFAULT 0 NOT NULL,
    snd_time INTEGER DEFAULT 0 NOT NULL,
    ctype VARCHAR(32) DEFAULT 'text/plain' NOT NULL,
    body BLOB,
    extra_hdrs TEXT,
    callid VARCHAR(128) DEFAULT '' NOT NULL,
    status INTEGER DEFAULT 0 NOT NULL
);
CREATE INDEX {t}_account_idx ON {t} (username, domain);
INSERT INTO version (table_name, table_version) values ('{t}','8');
""",
    "mysql": """
CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INT UNSIGNED DEFAULT 0 NOT NULL,
    CONSTRAINT table_name_idx UNIQUE (table_name)
) ENGINE=InnoDB;
CREATE TABLE {t} (
    id INT(10) UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
    src_addr VARCHAR(255) DEFAULT '' NOT NULL,
    dst_addr VARCHAR(255) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    inc_time INT DEFAULT 0 NOT NULL,
    exp_time INT DEFAULT 0 NOT NULL,
    snd_time INT DEFAULT 0 NOT NULL,
    ctype VARCHAR(32) DEFAULT 'text/plain' NOT NULL,
    body BLOB,
    extra_hdrs TEXT,
    callid VARCHAR(128) DEFAULT '' NOT NULL,
    status INT DEFAULT 0 NOT NULL
) ENGINE=InnoDB;
CREATE INDEX account_idx ON {t} (username, domain);
INSERT INTO version (table_name, table_version) values ('{t}','8');
""",
}

# Rows as Kamailio's m_store writes them: a delivered-later one with stored headers and the
# MESSAGE's Call-ID (use_mode 1), one without (callid ''), one already expired.
KAMAILIO_ROWS = """
INSERT INTO {t} (id, src_addr, dst_addr, username, domain, inc_time, exp_time, snd_time,
                 ctype, body, extra_hdrs, callid, status)
VALUES (7, 'sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', {b1}, 'X-Kam: 1' || CHAR(13) || CHAR(10),
        'kam-call-1@example.org', 1),
       (9, 'sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/html', {b2}, NULL, '', 0),
       (12, 'sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {old}, {gone}, 0, 'text/plain', {b3}, NULL, '', 0);
"""


async def fetch(store: Store, sql: str) -> list[tuple[object, ...]]:
    """Rows of ``sql`` read behind the store's back."""
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()
    if isinstance(store, MySQLStore):
        return await mysql_script(store.url, sql)
    assert isinstance(store, PostgresStore)
    pg = await asyncpg.connect(store.dsn)
    try:
        return [tuple(r) for r in await pg.fetch(sql)]
    finally:
        await pg.close()


def _kamailio_script(backend: str, t: str, now: int, version_row: bool = True) -> str:
    if backend == "postgres":
        bodies = ("'old one'::bytea", "'<b>hi</b>'::bytea", "'gone'::bytea")
        rows = KAMAILIO_ROWS.replace("CHAR(13) || CHAR(10)", "chr(13) || chr(10)")
    elif backend == "mysql":
        bodies = ("X'6f6c64206f6e65'", "X'3c623e68693c2f623e'", "X'676f6e65'")
        rows = KAMAILIO_ROWS.replace("'X-Kam: 1' || CHAR(13) || CHAR(10)", "'X-Kam: 1\\r\\n'")
    else:
        bodies = ("X'6f6c64206f6e65'", "X'3c623e68693c2f623e'", "X'676f6e65'")
        rows = KAMAILIO_ROWS
    b1, b2, b3 = bodies
    ddl = KAMAILIO_V8[backend].format(t=t)
    if not version_row:  # the table alone, copied into msilo's own database
        ddl = (
            ddl.split("CREATE TABLE IF NOT EXISTS version", 1)[0]
            + "CREATE TABLE "
            + (ddl.split("\nCREATE TABLE ", 2)[2].split("INSERT INTO version")[0])
        )
    return ddl + rows.format(
        t=t, now=now - 10, exp=now + 3600, old=now - 7200, gone=now - 60, b1=b1, b2=b2, b3=b3
    )


@pytest.mark.parametrize("version_row", [True, False], ids=["version-8", "no-version-table"])
async def test_kamailio_v8_table_is_converted_and_served_with_its_rows(
    make_store: StoreFactory, names: SiloNames, backend: str, version_row: bool
) -> None:
    from storage_helpers import NOW

    t = names.table
    s = await make_store(SiloNames(table=t, mid="id"))
    await raw(s, _kamailio_script(backend, t, NOW, version_row))
    was = "version 8" if version_row else "no version row"

    # Until converted, every command says how (and a server does not start on it).
    with pytest.raises(SchemaError, match=rf"Kamailio's msilo layout \({was}\): .*msilo db upg"):
        await s.check_schema()
    with pytest.raises(SchemaError, match=r"Kamailio's msilo layout"):
        await s.create_schema()

    actions = await s.upgrade_schema()
    kept = "extra_hdrs and status kept as they are"
    assert (
        f"converted Kamailio's {t} table ({was}) to msilo's layout (version 6); {kept}" in actions
    )
    assert f"created index {t}_dedupe_key_idx" in actions
    if backend == "sqlite":
        assert f"rebuilt {t} with msilo's columns (callid and ctype nullable)" in actions
    elif backend == "mysql":
        assert f"added column {t}.dedupe_key" in actions
        assert f"made {t}.callid TEXT and nullable" in actions
        assert f"widened {t}.ctype to TEXT (nullable)" in actions
        assert f"widened {t}.id to BIGINT" in actions
    else:
        assert f"added column {t}.dedupe_key" in actions
        assert f"made {t}.callid and {t}.ctype nullable" in actions
        assert f"widened {t}.ctype to TEXT" in actions
        assert f"widened {t}.callid to TEXT" in actions
        assert f"widened {t}.id to BIGINT" in actions
        # The rows came with their ids (as from a restored dump): the sequence follows them.
        assert any(a.startswith("moved sequence") and a.endswith("(12)") for a in actions)
    await s.check_schema()
    assert await s.upgrade_schema() == []  # idempotent
    assert await fetch(s, f"SELECT table_version FROM version WHERE table_name = '{t}'") == [(6,)]

    # Every old row intact, ids included (arrival order); Kamailio's own columns untouched.
    old = await s.list(*OWNER)
    assert [(m.mid, m.body, m.ctype, m.callid) for m in old] == [
        (12, b"gone", "text/plain", ""),
        (7, b"old one", "text/plain", "kam-call-1@example.org"),
        (9, b"<b>hi</b>", "text/html", ""),
    ]
    assert await fetch(s, f"SELECT id, extra_hdrs, status FROM {t} ORDER BY id") == [
        (7, "X-Kam: 1\r\n", 1),
        (9, None, 0),
        (12, None, 0),
    ]

    # Stored by msilo: a ctype Kamailio's VARCHAR(32) would cut, a Call-ID, no ctype at all.
    rcs = "application/vnd.gsma.rcs-ft-http+xml"
    new = dataclasses.replace(message(body=b"new", inc_time=NOW, ctype=rcs), callid="c" * 300)
    results = await s.store_batch([new, message(body=b"bare", inc_time=NOW, ctype=None)], 0)
    assert [r.outcome for r in results] == [StoreOutcome.STORED, StoreOutcome.STORED]
    assert all(r.mid is not None and r.mid > 12 for r in results)
    assert await fetch(s, f"SELECT status FROM {t} WHERE id > 12") == [(0,), (0,)]

    # Dump: the live old rows and the new ones, in arrival order; expiry takes the old one.
    claimed = await s.claim_for_dump(*OWNER, lease_owner="w", lease_seconds=30, now=NOW)
    assert [(m.body, m.ctype) for m in claimed] == [
        (b"old one", "text/plain"),
        (b"<b>hi</b>", "text/html"),
        (b"new", rcs),
        (b"bare", None),
    ]
    assert claimed[2].callid == "c" * 300
    assert [m.mid for m in await s.take_expired(NOW, 100)] == [12]
    assert len(await s.list(*OWNER)) == 4


async def test_kamailio_v8_upgrade_needs_sc_mid_id(
    make_store: StoreFactory, names: SiloNames, backend: str
) -> None:
    from storage_helpers import NOW

    s = await make_store()
    await raw(s, _kamailio_script(backend, names.table, NOW))
    with pytest.raises(SchemaError, match=r'set sc_mid = "id"'):
        await s.upgrade_schema()
    assert await fetch(
        s, f"SELECT table_version FROM version WHERE table_name = '{names.table}'"
    ) == [(8,)]


# --- names and URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "1silo", "silo;drop", "si lo", "x" * 64, 'a"b'])
def test_names_must_be_sql_identifiers(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^table is expected to be an SQL identifier"):
        SiloNames(table=bad)
    with pytest.raises(ValueError, match=r"^sc_|^ctype is expected"):
        SiloNames(ctype=bad)


def test_names_cannot_reuse_our_columns_or_each_other() -> None:
    with pytest.raises(ValueError, match="attempts"):
        SiloNames(body="attempts")
    with pytest.raises(ValueError, match="same column"):
        SiloNames(body="ctype")


def test_long_table_names_get_distinct_object_names() -> None:
    a = SiloNames(table="a" * 60 + "one")
    b = SiloNames(table="a" * 60 + "two")
    fa, fb = a.object_name("store_batch", "msilo_"), b.object_name("store_batch", "msilo_")
    assert len(fa) <= 63 and len(fb) <= 63 and fa != fb


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    rel = open_store("sqlite:///var/msilo.db")
    assert isinstance(rel, SQLiteStore) and rel.path == "var/msilo.db"
    absolute = open_store("sqlite:////var/lib/msilo.db")
    assert isinstance(absolute, SQLiteStore) and absolute.path == "/var/lib/msilo.db"
    for url in ("postgres://u:p@db:5432/msilo", "postgresql://db/msilo"):
        pg = open_store(url, min_size=1, max_size=2)
        assert isinstance(pg, PostgresStore)
    my = open_store("mysql://u:p@db:3307/msilo", max_size=2)
    assert isinstance(my, MySQLStore) and my.url == "mysql://u:p@db:3307/msilo"


@pytest.mark.parametrize(
    "url", ["mariadb://u:secret@db/msilo", "sqlite://relative.db", "sqlite:///", "msilo.db"]
)
def test_open_store_refuses_other_urls_without_echoing_passwords(url: str) -> None:
    with pytest.raises(ValueError, match="db_url") as info:
        open_store(url)
    assert "secret" not in str(info.value)
