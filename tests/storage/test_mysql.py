"""What only MySQL/MariaDB does: the store procedure's two paths, BLOB limits with strict mode
off, collations, bounded key columns, the server version check, and an OpenSIPS MySQL table
of 100,000 rows upgraded in place and served."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from conftest import StoreFactory
from storage_helpers import NOW, OWNER, message

from msilo.errors import InvalidRecord
from msilo.storage import SiloNames, Store, StoreOutcome
from msilo.storage.location import Binding, BindingPlan
from msilo.storage.mysql import MySQLStore
from msilo.storage.mysql_sql import BODY_LIMIT, KEY_TEXT_LIMIT
from tests.conftest import mysql_connect, mysql_execute, mysql_script

pytestmark = pytest.mark.backend_only("mysql")

S, D, Q, ON = (
    StoreOutcome.STORED,
    StoreOutcome.DUPLICATE,
    StoreOutcome.OVER_QUOTA,
    StoreOutcome.ONLINE,
)


def _mysql(store: Store) -> MySQLStore:
    assert isinstance(store, MySQLStore)
    return store


@pytest.mark.parametrize("fast", [1, 0], ids=["set-based", "row-by-row"])
async def test_both_store_paths_give_every_row_its_fate_and_its_own_id(
    store: Store, user: str, fast: int
) -> None:
    s = _mysql(store)
    s._fast = fast
    # store_batch judges "online" by the clock: the binding must be live now, not only
    # at import time (NOW), which a long run leaves minutes behind.
    online = Binding(user, "example.com", f"sip:{user}@192.0.2.1", int(time.time()) + 600)
    await s.update_bindings(user, "example.com", lambda _: BindingPlan(upserts=(online,)), now=NOW)
    [first] = await s.store_batch([message(key="k-old", body=b"old")], 0)
    batch = [
        message(body=b"a1", key="k1"),
        message("bob", body=b"b1", key="k2"),
        message(body=b"dup", key="k-old"),  # stored before: its id
        message(body=b"a2"),  # no dedupe key
        dataclasses.replace(message(user, body=b"c1"), unless_online=True),
        message("bob", body=b"b2", key="k3"),
        message(body=b"a3", key="k4"),  # alice's 4th with a quota of 3
        message("bob", body=b"b3", key="k3"),  # repeated in the batch
    ]
    results = await s.store_batch(batch, 3)
    assert [r.outcome for r in results] == [S, S, D, S, ON, S, Q, D]
    assert results[2].mid == first.mid and results[7].mid == results[5].mid
    bodies = {
        m.mid: (m.username, m.body) for u in ("alice", "bob") for m in await s.list(u, OWNER[1])
    }
    for msg, r in zip(batch, results, strict=True):
        if r.outcome is S:
            assert bodies[r.mid] == (msg.username, msg.body)  # the id is this row's
    assert await s.count(*OWNER) == 3 and await s.count(user, "example.com") == 0


async def test_concurrent_batches_with_the_same_keys_store_each_once(
    make_store: StoreFactory,
) -> None:
    stores = [await make_store() for _ in range(4)]
    await stores[0].create_schema()
    batch = [message(f"u{i % 7}", key=f"same-{i}", body=b"%d" % i) for i in range(200)]
    results = await asyncio.gather(*(st.store_batch(batch, 0) for st in stores))
    stored = [r for rs in results for r in rs if r.outcome is S]
    assert len(stored) == 200  # each key by exactly one of the four
    for rs in results:
        assert [r.mid for r in rs] == [r.mid for r in results[0]]  # all agree on the ids
    assert sum([await stores[0].count(f"u{i}", OWNER[1]) for i in range(7)]) == 200


async def test_no_truncation_with_strict_mode_off(
    make_store: StoreFactory, names: SiloNames, mysql_server: object
) -> None:
    """A server whose sql_mode is '' silently cuts a BLOB at 64 KiB: msilo's own sessions
    are strict, and `db upgrade` makes OpenSIPS's BLOB a MEDIUMBLOB."""
    from tests.mariadbserver import OPENSIPS_MYSQL

    s = _mysql(await make_store(SiloNames(table=names.table, mid="id")))
    await mysql_script(s.url, OPENSIPS_MYSQL.format(t=names.table, now=NOW - 10, exp=NOW + 3600))
    big = bytes(range(256)) * 400  # 100 KiB
    [(was,)] = await asyncio.to_thread(mysql_execute, s.url, "SELECT @@GLOBAL.sql_mode")
    await asyncio.to_thread(mysql_execute, s.url, "SET GLOBAL sql_mode = ''")
    try:
        # The hazard, shown by a client of the server's (non-strict) default mode.
        loose = await mysql_connect(s.url)
        try:
            async with loose.cursor() as cur:
                await cur.execute("SET SESSION sql_mode = DEFAULT")
                await cur.execute(
                    f"INSERT INTO {names.table} (username, domain, body) "
                    "VALUES ('loose', 'example.com', %s)",
                    (big,),
                )
                await cur.execute(
                    f"SELECT length(body) FROM {names.table} WHERE username = 'loose'"
                )
                assert (await cur.fetchall())[0][0] == 65535  # cut, without an error
        finally:
            await loose.ensure_closed()
        assert f"widened {names.table}.body to MEDIUMBLOB (16 MiB)" in await s.upgrade_schema()
        fresh = await make_store(SiloNames(table=names.table, mid="id"))  # new sessions
        [r] = await fresh.store_batch([message(body=big)], 0)
        assert r.outcome is S
        [m] = [m for m in await fresh.list(*OWNER) if m.mid == r.mid]
        assert m.body == big
        # Larger than a MEDIUMBLOB holds: refused before any SQL, never cut.
        with pytest.raises(InvalidRecord, match="MEDIUMBLOB"):
            await fresh.store_batch([message(body=b"x" * (BODY_LIMIT + 1))], 0)
    finally:
        await asyncio.to_thread(mysql_execute, s.url, "SET GLOBAL sql_mode = %s", (was,))


async def test_owners_and_keys_compare_exactly(store: Store) -> None:
    """utf8mb4_bin: the servers' default collations ignore case."""
    results = await store.store_batch(
        [message("alice", key="Call-A"), message("Alice", key="call-a")], 0
    )
    assert [r.outcome for r in results] == [S, S]
    assert await store.count("alice", OWNER[1]) == 1
    assert await store.count("Alice", OWNER[1]) == 1


async def test_long_dedupe_keys_are_kept_apart_by_their_hash(store: Store) -> None:
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    results = await store.store_batch([message(key=a), message(key=b)], 0)
    assert [r.outcome for r in results] == [S, S]
    [again] = await store.store_batch([message(key=a)], 0)
    assert again.outcome is D and again.mid == results[0].mid


async def test_contacts_and_devices_longer_than_the_key_columns_are_refused(
    store: Store, user: str
) -> None:
    long = "sip:" + "c" * KEY_TEXT_LIMIT + "@example.com"
    binding = Binding(user, "example.com", long, NOW + 600)
    with pytest.raises(InvalidRecord, match="contact"):
        await store.update_bindings(
            user, "example.com", lambda _: BindingPlan(upserts=(binding,)), now=NOW
        )
    with pytest.raises(InvalidRecord, match="device"):
        await store.touch_devices(user, "example.com", [long], now=NOW)
    assert await store.lookup_bindings(user, "example.com", now=NOW) == []


ROWS = 100_000


async def test_an_opensips_table_of_100000_rows_is_upgraded_and_served(
    make_store: StoreFactory, names: SiloNames
) -> None:
    """Every old row intact after `db upgrade`, then stored to, dumped and expired."""
    t = names.table
    s = _mysql(await make_store(SiloNames(table=t, mid="id")))
    from tests.mariadbserver import OPENSIPS_MYSQL

    ddl = OPENSIPS_MYSQL.format(t=t, now=NOW, exp=NOW + 1).split(f"INSERT INTO {t}")[0]
    digits = " UNION ALL ".join(f"SELECT {i} AS n" for i in range(10))
    # 100,000 rows of 1,000 owners; every tenth expired; bodies of every length up to 300.
    await mysql_script(
        s.url,
        ddl + f"INSERT INTO {t} (src_addr, dst_addr, username, domain, inc_time, exp_time, "
        "snd_time, ctype, body) "
        "SELECT CONCAT('sip:s', n, '@example.org'), CONCAT('sip:u', n % 1000, '@example.com'), "
        "CONCAT('u', n % 1000), 'example.com', "
        f"{NOW - 100_000} + n, IF(n % 10 = 0, {NOW - 1}, {NOW + 86400}), 0, "
        "IF(n % 3 = 0, NULL, 'text/plain'), "
        "IF(n % 7 = 0, NULL, REPEAT(CHAR(65 + n % 26), n % 300)) "
        f"FROM (SELECT a.n + 10 * b.n + 100 * c.n + 1000 * d.n + 10000 * e.n AS n "
        f"FROM ({digits}) a, ({digits}) b, ({digits}) c, ({digits}) d, ({digits}) e) x "
        "ORDER BY n",
    )
    check = (
        f"SELECT count(*), SUM(CRC32(CONCAT_WS('|', id, src_addr, dst_addr, username, domain, "
        f"inc_time, exp_time, snd_time, IFNULL(ctype, '-'), IFNULL(HEX(body), '-')))) FROM {t}"
    )
    before = await mysql_script(s.url, check)
    assert before[0][0] == ROWS
    actions = await s.upgrade_schema()
    assert f"widened {t}.id to BIGINT" in actions and f"added column {t}.dedupe_key" in actions
    await s.check_schema()
    assert await mysql_script(s.url, check) == before  # every old row, byte for byte

    # Served: one owner's old rows dumped in arrival order, a new one stored after them.
    owner = ("u7", "example.com")
    old = await s.list(*owner)
    assert len(old) == ROWS // 1000
    [new] = await s.store_batch([message(*owner, body=b"new", inc_time=NOW)], 0)
    assert new.outcome is S and new.mid is not None and new.mid > ROWS
    claimed = await s.claim_for_dump(*owner, lease_owner="w", lease_seconds=30, now=NOW)
    live = [m for m in old if m.exp_time > NOW]
    assert [m.mid for m in claimed] == [m.mid for m in live] + [new.mid]
    assert [m.body for m in claimed[:-1]] == [m.body for m in live]
    assert await s.delete_delivered([m.mid for m in claimed]) == len(claimed)
    # Expiry: every tenth old row, oldest ids first, in bounded batches.
    gone = 0
    while batch := await s.take_expired(NOW, 5000):
        gone += len(batch)
    assert gone == ROWS // 10
    assert (await s.silo_summary()).rows == ROWS - ROWS // 10 - len(live)


# --- failures --------------------------------------------------------------------------------


async def test_an_unreachable_server_is_unavailable_naming_where_not_the_password() -> None:
    from msilo.errors import DatabaseUnavailable

    s = MySQLStore("mysql://msilo:secret@127.0.0.1:1/msilo", connect_timeout=2)
    with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1:1/msilo") as info:
        await s.open()
    assert "secret" not in str(info.value)


async def _kill_sessions_of(url: str) -> int:
    """KILL every other session on the store's database (a restart, as its clients see it)."""
    database = url.rsplit("/", 1)[1]
    ids = await mysql_script(
        url,
        "SELECT ID FROM information_schema.PROCESSLIST "
        f"WHERE DB = '{database}' AND ID <> CONNECTION_ID()",
    )
    for (conn_id,) in ids:
        await mysql_script(url, f"KILL {conn_id}")
    return len(ids)


async def test_killed_sessions_are_replaced_and_unsafe_writes_fail_clearly(store: Store) -> None:
    from msilo.errors import DatabaseUnavailable

    s = _mysql(store)
    await s.store_batch([message(key="before")], 0)
    assert await _kill_sessions_of(s.url) >= 1
    # A read is retried on a fresh connection: the caller sees nothing.
    assert await s.count(*OWNER) == 1
    assert await _kill_sessions_of(s.url) >= 1
    # Keyed rows are retried too (a second attempt cannot store anything twice).
    [r] = await s.store_batch([message(key="after")], 0)
    assert r.outcome is S
    assert await _kill_sessions_of(s.url) >= 1
    # An unkeyed store is not: had the lost attempt committed, a retry would store it twice.
    with pytest.raises(DatabaseUnavailable, match="unavailable during store"):
        await s.store_batch([message()], 0)
    assert await s.count(*OWNER) == 2  # and the store works again at once
    [again] = await s.store_batch([message()], 0)
    assert again.outcome is S


async def test_a_missing_store_procedure_says_run_db_upgrade(store: Store) -> None:
    from msilo.errors import SchemaError

    s = _mysql(store)
    await mysql_script(s.url, f'DROP PROCEDURE "{s.procedure}"')
    with pytest.raises(SchemaError, match=r"msilo db init` \(or `msilo db upgrade`\)"):
        await s.store_batch([message()], 0)
    with pytest.raises(SchemaError, match=rf"procedure {s.procedure} .* run `msilo db upgrade`"):
        await s.check_schema()
    assert f"created procedure {s.procedure}" in await s.upgrade_schema()
    assert (await s.store_batch([message()], 0))[0].outcome is S


async def test_a_changed_store_procedure_is_replaced_at_start(store: Store) -> None:
    s = _mysql(store)
    await mysql_script(s.url, f'DROP PROCEDURE "{s.procedure}"')
    await mysql_script(
        s.url,
        f'CREATE PROCEDURE "{s.procedure}"(IN p_rows LONGTEXT, IN p_slots LONGTEXT, '
        "IN p_max BIGINT, IN p_now BIGINT, IN p_txn INT, IN p_fast INT) SELECT 'old'",
    )
    await s.create_schema()  # what `msilo serve` runs: an older release's body is replaced
    assert (await s.store_batch([message()], 0))[0].outcome is S
