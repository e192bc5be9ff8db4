"""Helpers shared by the storage tests."""

from __future__ import annotations

import time

import asyncpg

from msilo.storage import NewMessage

OWNER = ("alice", "example.com")
NOW = int(time.time())


def message(
    username: str = OWNER[0],
    domain: str = OWNER[1],
    *,
    body: bytes = b"hello",
    inc_time: int = NOW,
    exp_time: int | None = None,
    snd_time: int = 0,
    key: str | None = None,
    ctype: str | None = "text/plain",
    src: str = "sip:bob@example.org",
) -> NewMessage:
    """A message for the owner, stored at ``inc_time``, living an hour by default."""
    return NewMessage(
        username=username,
        domain=domain,
        src_addr=src,
        dst_addr=f"sip:{username}@{domain}",
        body=body,
        ctype=ctype,
        inc_time=inc_time,
        exp_time=inc_time + 3600 if exp_time is None else exp_time,
        snd_time=snd_time,
        dedupe_key=key,
    )


async def drop_pg_tables(dsn: str, *tables: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in tables:
            await conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
            await conn.execute(f'DROP TABLE IF EXISTS "msilo_{table}_delivery"')
            for function in ("store_batch", "settle"):
                await conn.execute(f'DROP FUNCTION IF EXISTS "msilo_{table}_{function}"')
            await conn.execute("DELETE FROM version WHERE table_name = $1", table)
    except asyncpg.UndefinedTableError:
        pass
    finally:
        await conn.close()


async def drop_my_tables(url: str, *tables: str) -> None:
    """Drop silo tables (and their ledgers, procedures, version rows) on MariaDB."""
    import asyncio

    from tests.conftest import mysql_execute

    def drop() -> None:
        for table in tables:
            mysql_execute(url, f"DROP TABLE IF EXISTS `{table}`, `msilo_{table}_delivery`")
            mysql_execute(url, f"DROP PROCEDURE IF EXISTS `msilo_{table}_store`")
            if mysql_execute(url, "SHOW TABLES LIKE 'version'"):
                mysql_execute(url, "DELETE FROM version WHERE table_name = %s", (table,))

    await asyncio.to_thread(drop)


async def execute_sql(store: object, sql: str) -> None:
    """Run ``sql`` on the store's database behind its back (any backend)."""
    import asyncio
    import sqlite3

    from msilo.storage.mysql import MySQLStore
    from msilo.storage.postgres import PostgresStore
    from tests.conftest import mysql_execute

    if isinstance(store, MySQLStore):
        await asyncio.to_thread(mysql_execute, store.url, sql)
    elif isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    else:
        db = sqlite3.connect(store.path)  # type: ignore[attr-defined]
        try:
            db.execute(sql)
            db.commit()
        finally:
            db.close()
