"""The embedded backend: stdlib ``sqlite3`` on one dedicated thread.

Every call runs on a single worker thread that owns the connection, so the event loop never
blocks on disk and the store works from any asyncio loop.  The database is in WAL mode;
writes take the write lock up front with ``BEGIN IMMEDIATE`` so a quota count and its insert
(or a claim's select and update) are atomic, also against other processes on the host --
SQLite serialises writers, ``busy_timeout`` makes them queue instead of failing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias, TypeVar

import orjson

from msilo.errors import DatabaseUnavailable, SchemaError, StorageError
from msilo.storage import _sql, ledger, push_targets, subscriber
from msilo.storage.base import (
    DEFAULT_NAMES,
    SILO_VERSION,
    NewMessage,
    SiloNames,
    SiloSummary,
    Store,
    StoredMessage,
    StoreOutcome,
    StoreResult,
    fold_repeated_keys,
    quote_ident,
    unfold_results,
    validate_message,
)
from msilo.storage.location import (
    Binding,
    BindingsOutcome,
    PlanFunction,
    binding_from_row,
    binding_row,
    location_sql,
    validate_binding,
    validate_owner,
)
from msilo.storage.push_targets import PushRecord, PushSql
from msilo.storage.subscriber import (
    Subscriber,
    validate_auth_keys,
    validate_nonce,
    validate_subscriber,
)
from msilo.storage.values import owner_storable

log = logging.getLogger("msilo.store")

T = TypeVar("T")
Conn: TypeAlias = sqlite3.Connection

# Large ``IN (...)`` lists are split: SQLite caps the number of bound parameters.
_CHUNK = 500


def _wrap(exc: sqlite3.Error, what: str) -> StorageError:
    text = str(exc)
    low = text.lower()
    if "no such table" in low or "no such column" in low:
        return SchemaError(f"SQLite {what}: {text}: run `msilo db init` or `msilo db upgrade`")
    if isinstance(exc, sqlite3.OperationalError) and any(
        s in low for s in ("locked", "busy", "unable to open", "disk i/o", "readonly")
    ):
        return DatabaseUnavailable(f"SQLite {what}: {text}")
    return StorageError(f"SQLite {what}: {text}")


def _row(r: Sequence[Any]) -> StoredMessage:
    body = r[5]
    if body is None:
        body = b""
    elif isinstance(body, str):  # a row written by another tool as TEXT
        body = body.encode("utf-8")
    return StoredMessage(
        mid=r[0],
        username=r[1],
        domain=r[2],
        src_addr=r[3],
        dst_addr=r[4],
        body=bytes(body),
        ctype=r[6],
        inc_time=r[7],
        exp_time=r[8],
        snd_time=r[9],
        attempts=r[10],
        callid=r[11],
    )


def _chunks(mids: Sequence[int]) -> list[list[int]]:
    ids = [int(m) for m in mids]
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


_Q_LIVE_METHODS = "SELECT methods FROM location WHERE username = ? AND domain = ? AND expires > ?"


class SQLiteStore(Store):
    """``Store`` on a SQLite file (``path``; ``":memory:"`` for a private database)."""

    # One writer: every store waits for the whole of an expiry statement, and for the WAL
    # checkpoint its commit may run.  200,000 expired rows under 1,000 stores/s: the
    # stores' p99 13 ms at 100 rows a statement, 19-36 ms at 250, 92 ms at 2,000, 1.2 s
    # in one statement (bench/bench_expiry_sqlite.py).
    expiry_batch = 100

    def __init__(
        self,
        path: str,
        names: SiloNames = DEFAULT_NAMES,
        *,
        busy_timeout: float = 10.0,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(
                f"synchronous is expected to be OFF/NORMAL/FULL/EXTRA, got {synchronous!r}"
            )
        if busy_timeout <= 0:
            raise ValueError("busy_timeout is expected to be greater than zero")
        self.path = path
        self.names = names
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._sql = _sql.SiloSql(names)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: Conn | None = None
        self._build_statements()

    # --- plumbing ---------------------------------------------------------------------------

    def _build_statements(self) -> None:
        self._location = location_sql(lambda n: "?")
        s = self._sql
        q = _sql.to_sqlite
        t = s.table
        self._q_count = q(s.count)
        self._q_list = q(s.list)
        self._q_purge = q(s.purge)
        self._q_recover = q(s.recover)
        self._q_expire = q(s.expire)
        self._q_take_expired = q(s.take_expired)
        self._q_insert = q(
            f"INSERT INTO {t} ({s.username}, {s.domain}, {s.src_addr}, {s.dst_addr}, {s.body}, "
            f"{s.ctype}, {s.inc_time}, {s.exp_time}, {s.snd_time}, dedupe_key, callid) "
            f"VALUES ({{0}}, {{1}}, {{2}}, {{3}}, {{4}}, {{5}}, {{6}}, {{7}}, {{8}}, {{9}}, {{10}})"
        )
        self._q_by_key = q(f"SELECT {s.mid} FROM {t} WHERE dedupe_key = {{0}}")
        # One identity per message, fixed when a row is first claimed (see SiloSql).
        self._q_fix_callid = q(
            f"UPDATE {t} SET callid = {s.derived_callid_of(t)} "
            f"WHERE {t}.{s.mid} = {{0}} AND {s.callid_shared(t)} RETURNING callid"
        )
        self._ledger = ledger.LedgerSql(self.names)
        led = self._ledger.ledger
        self._q_device_dump = q(
            f"SELECT {s.columns}, (SELECT 1 "
            f"FROM {led} l WHERE l.mid = {t}.{s.mid} AND l.device = {{3}}) "
            f"FROM {t} WHERE {s.dump_filter} AND NOT EXISTS (SELECT 1 FROM {led} l "
            f"WHERE l.mid = {t}.{s.mid} AND l.device = {{3}} "
            f"AND (l.delivered <> 0 OR l.lease_until > {{2}})) "
            f"ORDER BY {s.order_arrival} LIMIT {{4}}"
        )
        self._q_ledger_lease = q(
            f"INSERT INTO {led} (mid, device, delivered, lease_until, lease_owner) "
            f"VALUES ({{0}}, {{1}}, 0, {{2}}, {{3}}) ON CONFLICT (mid, device) DO UPDATE SET "
            f"lease_until = excluded.lease_until, lease_owner = excluded.lease_owner"
        )
        self._q_ledger_mark = q(
            f"INSERT INTO {led} (mid, device, delivered, lease_until, lease_owner) "
            f"VALUES ({{0}}, {{1}}, {{2}}, {{3}}, {{4}}) ON CONFLICT (mid, device) DO NOTHING"
        )
        self._q_ledger_done = q(
            f"INSERT INTO {led} (mid, device, delivered) "
            f"SELECT {{0}}, {{1}}, 1 WHERE EXISTS (SELECT 1 FROM {t} WHERE {s.mid} = {{0}}) "
            f"ON CONFLICT (mid, device) DO UPDATE SET delivered = 1, lease_until = NULL, "
            f"lease_owner = NULL"
        )
        self._q_complete = q(
            f"SELECT {s.mid} FROM {t} m WHERE {s.mid} = {{0}} "
            f"AND NOT EXISTS ({self._ledger.undelivered('{1}')})"
        )
        self._q_ledger_release = q(
            f"DELETE FROM {led} WHERE mid = {{0}} AND device = {{1}} AND delivered = 0"
        )
        self._q_bump = q(f"UPDATE {t} SET attempts = attempts + 1 WHERE {s.mid} = {{0}}")
        self._q_touch = q(
            f"INSERT INTO {ledger.DEVICE_TABLE} (username, domain, device, last_register) "
            f"VALUES ({{0}}, {{1}}, {{2}}, {{3}}) ON CONFLICT (username, domain, device) "
            f"DO UPDATE SET last_register = excluded.last_register "
            f"WHERE last_register <= excluded.last_register - {ledger.TOUCH_GRANULARITY}"
        )
        self._q_forget_one = q(
            f"DELETE FROM {ledger.DEVICE_TABLE} WHERE username = {{0}} AND domain = {{1}} "
            f"AND device = {{2}}"
        )
        self._q_dump = q(
            f"SELECT {s.columns} FROM {t} WHERE {s.dump_filter} ORDER BY {s.order_arrival} "
            f"LIMIT {{3}}"
        )
        self._q_due = q(
            f"SELECT {s.columns} FROM {t} WHERE {s.due_filter} "
            f"ORDER BY {s.snd_time}, {s.mid} LIMIT {{1}}"
        )

    async def _call(self, what: str, fn: Callable[[Conn], T]) -> T:
        if self._executor is None or self._conn is None:
            raise StorageError(f"SQLite {what}: the store is not open")
        conn = self._conn
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, conn)
        except sqlite3.Error as exc:
            raise _wrap(exc, what) from exc

    @staticmethod
    def _write(conn: Conn, fn: Callable[[Conn], T]) -> T:
        # IMMEDIATE: take the write lock before reading, so what we read (a count, the rows
        # to lease) cannot change before we write -- also across processes.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _connect(self) -> Conn:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            cached_statements=64,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            if self.path != ":memory:":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("event=sqlite_no_wal path=%s journal_mode=%s", self.path, mode)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Open the database file (created if missing; its directory must exist)."""
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msilo-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, self._connect)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise DatabaseUnavailable(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        self._executor, self._conn = executor, conn

    async def close(self) -> None:
        """Close the connection and stop the worker thread."""
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    # --- schema -----------------------------------------------------------------------------

    def _columns(self, conn: Conn, table: str) -> set[str] | None:
        rows = conn.execute(f"PRAGMA table_info({quote_ident(table)})").fetchall()
        return {r[1] for r in rows} if rows else None

    def _version(self, conn: Conn, table: str) -> int | None:
        if self._columns(conn, "version") is None:
            return None
        row = conn.execute(
            "SELECT table_version FROM version WHERE table_name = ?", (table,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _diagnose(self, conn: Conn) -> None:
        table = self.names.table
        _sql.diagnose_silo(
            self.names, self._columns(conn, table), self._version(conn, table), fold_case=True
        )

    @staticmethod
    def _ensure_version_row(conn: Conn, table: str, version: int) -> bool:
        cur = conn.execute(
            "INSERT INTO version (table_name, table_version) SELECT ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM version WHERE table_name = ?)",
            (table, version, table),
        )
        return cur.rowcount > 0

    def _create_aux(self, conn: Conn, actions: list[str]) -> None:
        if self._columns(conn, "version") is None:
            actions.append("created table version")
        conn.execute(_sql.VERSION_DDL)
        for table, statements, version in _sql.aux_tables_ddl(
            id_type="INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL"
        ):
            if self._columns(conn, table) is None:
                actions.append(f"created table {table}")
            for stmt in statements:
                conn.execute(stmt)
            if self._ensure_version_row(conn, table, version):
                actions.append(f"set version of {table} to {version}")
        if self._columns(conn, subscriber.NONCE_TABLE) is None:
            actions.append(f"created table {subscriber.NONCE_TABLE}")
        for stmt in subscriber.nonce_table_ddl():
            conn.execute(stmt)
        for table, statements in (
            (ledger.DEVICE_TABLE, ledger.device_ddl()),
            (ledger.ledger_table(self.names), ledger.ledger_ddl(self.names)),
            (push_targets.PUSH_TABLE, push_targets.push_ddl()),
        ):
            if self._columns(conn, table) is None:
                actions.append(f"created table {table}")
            for stmt in statements:
                conn.execute(stmt)
        if self._columns(conn, subscriber.AUTH_FAIL_TABLE) is None:
            actions.append(f"created table {subscriber.AUTH_FAIL_TABLE}")
        for stmt in subscriber.auth_fail_table_ddl():
            conn.execute(stmt)

    def _create(self, conn: Conn) -> list[str]:
        actions: list[str] = []
        table = self.names.table
        if self._columns(conn, table) is None:
            conn.execute(
                _sql.silo_table_ddl(
                    self._sql,
                    id_type="INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL",
                    blob_type="BLOB",
                )
            )
            actions.append(f"created table {table}")
        self._create_aux(conn, actions)
        columns = self._columns(conn, table) or set()
        have = {c.lower() for c in columns}
        if have >= set(_sql.EXTRA_COLUMN_DEFS) - set(_sql.LATER_COLUMNS):
            # A table of ours from an earlier release: its newer (nullable) columns.
            for name in _sql.LATER_COLUMNS:
                if name not in have:
                    ddl = _sql.EXTRA_COLUMN_DEFS[name]
                    conn.execute(f"ALTER TABLE {self._sql.table} ADD COLUMN {name} {ddl}")
                    actions.append(f"added column {table}.{name}")
                    have.add(name)
        if have >= set(_sql.EXTRA_COLUMN_DEFS):
            # Only on a table of our layout: an OpenSIPS table is left to `db upgrade`.
            for stmt in _sql.silo_index_ddl(self._sql):
                conn.execute(stmt)
            if self._ensure_version_row(conn, table, SILO_VERSION):
                actions.append(f"set version of {table} to {SILO_VERSION}")
        return actions

    async def create_schema(self) -> None:
        """Create what is missing, then check the result."""

        def run(conn: Conn) -> None:
            actions = self._write(conn, self._create)
            for action in actions:
                log.info("event=schema_created action=%r", action)
            self._diagnose(conn)

        await self._call("create schema", run)

    async def check_schema(self) -> None:
        """Raise ``SchemaError`` naming the fix when the schema is unusable."""
        await self._call("check schema", self._diagnose)

    def _upgrade(self, conn: Conn) -> list[str]:
        table = self.names.table
        columns = self._columns(conn, table)
        if columns is None:
            return self._create(conn)
        have = {c.lower() for c in columns}
        version = self._version(conn, table)
        kamailio = _sql.is_kamailio_silo(columns, version, fold_case=True)
        if version is not None and version != SILO_VERSION and not kamailio:
            _sql.diagnose_silo(self.names, columns, version, fold_case=True)
        if self.names.mid.lower() not in have:
            _sql.diagnose_silo(self.names, columns, version, fold_case=True)
        actions: list[str] = []
        if kamailio:
            actions += self._convert_kamailio(conn, version)
            have = {c.lower() for c in self._columns(conn, table) or set()}
        # SQLite INTEGER is already 64-bit and an AUTOINCREMENT id never wraps: only the
        # missing columns and indexes are ours to add.
        for name, ddl in _sql.EXTRA_COLUMN_DEFS.items():
            if name not in have:
                conn.execute(f"ALTER TABLE {self._sql.table} ADD COLUMN {name} {ddl}")
                actions.append(f"added column {table}.{name}")
        existing = {
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                (table,),
            )
        }
        for stmt in _sql.silo_index_ddl(self._sql):
            conn.execute(stmt)
        added = {
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                (table,),
            )
        } - existing
        actions.extend(f"created index {name}" for name in sorted(added))
        self._create_aux(conn, actions)
        if self._ensure_version_row(conn, table, SILO_VERSION):
            actions.append(f"set version of {table} to {SILO_VERSION}")
        self._diagnose(conn)
        return actions

    def _convert_kamailio(self, conn: Conn, version: int | None) -> list[str]:
        """Rebuild Kamailio's silo table as ours, every row and id kept.

        SQLite cannot drop a NOT NULL constraint in place, and Kamailio's ``callid`` and
        ``ctype`` are NOT NULL where msilo stores NULL: so the table is created anew with
        msilo's columns plus every other column it had (``extra_hdrs``, ``status``, as they
        were declared), filled from the old one and swapped in, in the caller's transaction
        (https://www.sqlite.org/lang_altertable.html#otheralter).
        """
        s, table = self._sql, self.names.table
        info = conn.execute(f"PRAGMA table_info({s.table})").fetchall()
        configured = {getattr(self.names, f).lower() for f in _sql.CONFIGURED_COLUMNS}
        ours = configured | set(_sql.EXTRA_COLUMN_DEFS)
        kept: list[str] = []
        for _cid, name, decl, notnull, default, _pk in info:
            if name.lower() in ours:
                continue
            ddl = f"{quote_ident(name)} {decl or ''}".rstrip()
            if notnull:
                ddl += " NOT NULL"
            if default is not None:
                ddl += f" DEFAULT {default}"
            kept.append(ddl)
        copied = ", ".join(quote_ident(name) for _c, name, *_ in info)
        old = quote_ident(self.names.object_name("kamailio_v8"))
        conn.execute(f"ALTER TABLE {s.table} RENAME TO {old}")
        conn.execute(
            _sql.silo_table_ddl(
                s,
                id_type="INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL",
                blob_type="BLOB",
                more=tuple(kept),
            )
        )
        conn.execute(f"INSERT INTO {s.table} ({copied}) SELECT {copied} FROM {old}")
        conn.execute(f"DROP TABLE {old}")  # its indexes go with it; ours are created next
        if version is not None:  # else the caller's _ensure_version_row writes ours
            conn.execute(
                "UPDATE version SET table_version = ? WHERE table_name = ?", (SILO_VERSION, table)
            )
        return [
            f"rebuilt {table} with msilo's columns (callid and {self.names.ctype} nullable)",
            _sql.kamailio_conversion(table, version),
        ]

    async def upgrade_schema(self) -> list[str]:
        """Add our columns, indexes and tables to an existing (OpenSIPS) database, or
        convert a Kamailio one (``_convert_kamailio``)."""
        return await self._call("upgrade schema", lambda c: self._write(c, self._upgrade))

    # --- storing ----------------------------------------------------------------------------

    def _store(
        self, conn: Conn, messages: Sequence[NewMessage], max_messages: int
    ) -> list[StoreResult]:
        results: list[StoreResult] = []
        # Counted once per owner under the write lock, then kept up to date by hand: nobody
        # else can write until we commit.
        counts: dict[tuple[str, str], int] = {}
        by_key, insert, count = self._q_by_key, self._q_insert, self._q_count
        for m in messages:
            if m.dedupe_key is not None:
                row = conn.execute(by_key, (m.dedupe_key,)).fetchone()
                if row is not None:
                    results.append(StoreResult(StoreOutcome.DUPLICATE, row[0]))
                    continue
            owner = (m.username, m.domain)
            if m.unless_online and self._online(conn, owner):
                results.append(StoreResult(StoreOutcome.ONLINE, None))
                continue
            if max_messages > 0:
                n = counts.get(owner)
                if n is None:
                    n = conn.execute(count, owner).fetchone()[0]
                if n >= max_messages:
                    counts[owner] = n
                    results.append(StoreResult(StoreOutcome.OVER_QUOTA, None))
                    continue
                counts[owner] = n + 1
            cur = conn.execute(
                insert,
                (
                    m.username,
                    m.domain,
                    m.src_addr,
                    m.dst_addr,
                    bytes(m.body) if m.body else None,  # OpenSIPS stores NULL for no body
                    m.ctype,
                    m.inc_time,
                    m.exp_time,
                    m.snd_time,
                    m.dedupe_key,
                    m.callid,
                ),
            )
            mid = cur.lastrowid
            assert mid is not None
            for device in m.delivered_to:
                conn.execute(self._q_ledger_mark, (mid, device, 1, None, None))
            for device in m.leased_to:
                conn.execute(self._q_ledger_mark, (mid, device, 0, m.lease_until, m.lease_owner))
            results.append(StoreResult(StoreOutcome.STORED, mid))
        return results

    def _online(self, conn: Conn, owner: tuple[str, str]) -> bool:
        """The owner has a live binding that takes MESSAGE (``Binding.takes_message``)."""
        now = int(time.time())
        for (methods,) in conn.execute(_Q_LIVE_METHODS, (*owner, now)):
            if methods is None or "MESSAGE" in methods.split(","):
                return True
        return False

    async def store_batch(
        self, messages: Sequence[NewMessage], max_messages: int
    ) -> list[StoreResult]:
        """Store the batch in one transaction (see ``Store.store_batch``)."""
        if not messages:
            return []
        for m in messages:
            validate_message(m)
        batch, slots = fold_repeated_keys(messages)
        results = await self._call(
            "store", lambda c: self._write(c, lambda c2: self._store(c2, batch, max_messages))
        )
        return unfold_results(results, slots)

    # --- delivery ---------------------------------------------------------------------------

    def _fix_callids(self, conn: Conn, rows: list[StoredMessage]) -> list[StoredMessage]:
        """Rows with their delivery Call-ID made unique where an earlier stored message of
        the owner has the same (written back: the same on every attempt)."""
        fixed = []
        for row in rows:
            if row.callid is not None:
                got = conn.execute(self._q_fix_callid, (row.mid,)).fetchone()
                if got is not None:
                    row = dataclasses.replace(row, callid=got[0])
            fixed.append(row)
        return fixed

    def _lease(self, conn: Conn, rows: list[StoredMessage], lease_owner: str, until: int) -> None:
        for chunk in _chunks([r.mid for r in rows]):
            marks = ", ".join("?" * len(chunk))
            conn.execute(
                f"UPDATE {self._sql.table} SET lease_until = ?, lease_owner = ? "
                f"WHERE {self._sql.mid} IN ({marks})",
                (until, lease_owner, *chunk),
            )

    async def claim_for_dump(
        self,
        username: str,
        domain: str,
        *,
        lease_owner: str,
        lease_seconds: int,
        now: int,
        limit: int | None = None,
    ) -> list[StoredMessage]:
        """Lease the owner's deliverable rows, in arrival order."""
        if not owner_storable(username, domain):
            return []

        def run(conn: Conn) -> list[StoredMessage]:
            rows = [
                _row(r)
                for r in conn.execute(
                    self._q_dump, (username, domain, now, -1 if limit is None else limit)
                )
            ]
            self._lease(conn, rows, lease_owner, now + lease_seconds)
            return self._fix_callids(conn, rows)

        return await self._call("claim", lambda c: self._write(c, run))

    async def claim_for_device(
        self,
        username: str,
        domain: str,
        device: str,
        *,
        lease_owner: str,
        lease_seconds: int,
        now: int,
        limit: int | None = None,
    ) -> list[tuple[StoredMessage, bool]]:
        """Lease the rows ``device`` has not had, in arrival order (per-device leases)."""
        args = (username, domain, now, device, -1 if limit is None else limit)

        def run(conn: Conn) -> list[tuple[StoredMessage, bool]]:
            # The subquery is NULL when the device never had a ledger row: first attempt.
            rows = [(_row(r), r[12] is None) for r in conn.execute(self._q_device_dump, args)]
            until = now + lease_seconds
            conn.executemany(
                self._q_ledger_lease, [(m.mid, device, until, lease_owner) for m, _ in rows]
            )
            fixed = self._fix_callids(conn, [m for m, _ in rows])
            return [(m, first) for m, (_, first) in zip(fixed, rows, strict=True)]

        return await self._call("claim", lambda c: self._write(c, run))

    async def settle_delivered(self, pairs: Sequence[tuple[int, str]], *, memory: int) -> int:
        """Mark deliveries; delete the messages they complete."""
        if not pairs:
            return 0

        def run(conn: Conn) -> int:
            conn.executemany(self._q_ledger_done, pairs)
            gone = 0
            for mid in dict.fromkeys(m for m, _ in pairs):
                if conn.execute(self._q_complete, (mid, memory)).fetchone() is not None:
                    gone += self._delete_message(conn, mid)
            return gone

        return await self._call("settle delivered", lambda c: self._write(c, run))

    def _delete_message(self, conn: Conn, mid: int) -> int:
        n = conn.execute(f"DELETE FROM {self._sql.table} WHERE {self._sql.mid} = ?", (mid,))
        conn.execute(f"DELETE FROM {self._ledger.ledger} WHERE mid = ?", (mid,))
        return n.rowcount

    async def release_device_leases(
        self, pairs: Sequence[tuple[int, str]], *, failed: bool = True
    ) -> int:
        """Drop the leases of unsuccessful deliveries; ``failed`` counts an attempt."""
        if not pairs:
            return 0

        def run(conn: Conn) -> int:
            n = 0
            for mid, device in pairs:
                dropped = conn.execute(self._q_ledger_release, (mid, device)).rowcount
                if dropped and failed:
                    conn.execute(self._q_bump, (mid,))
                n += dropped
            return n

        return await self._call("release lease", lambda c: self._write(c, run))

    async def touch_devices(
        self, username: str, domain: str, devices: Sequence[str], *, now: int
    ) -> None:
        """Remember the owner's devices as registered now."""
        if not devices:
            return
        rows = [(username, domain, d, now) for d in devices]
        sql = self._q_touch
        await self._call(
            "touch devices", lambda c: self._write(c, lambda c2: c2.executemany(sql, rows))
        )

    async def forget_devices(
        self, username: str, domain: str, devices: Sequence[str] | None, *, memory: int
    ) -> int:
        """Forget devices; delete the messages that leaves complete."""
        led = self._ledger

        def run(conn: Conn) -> int:
            if devices is None:
                conn.execute(_sql.to_sqlite(led.forget_all), (username, domain))
                conn.execute(_sql.to_sqlite(PushSql.forget_all), (username, domain))
            else:
                pairs = [(username, domain, d) for d in devices]
                conn.executemany(self._q_forget_one, pairs)
                conn.executemany(_sql.to_sqlite(PushSql.forget_one), pairs)
            done = conn.execute(
                _sql.to_sqlite(led.complete_of_owner), (username, domain, memory)
            ).fetchall()
            return sum(self._delete_message(conn, r[0]) for r in done)

        return await self._call("forget devices", lambda c: self._write(c, run))

    async def remembered_devices(self, username: str, domain: str, *, since: int) -> list[str]:
        """The owner's devices registered at ``since`` or later."""
        sql = _sql.to_sqlite(self._ledger.remembered)

        def run(conn: Conn) -> list[str]:
            return [r[0] for r in conn.execute(sql, (username, domain, since))]

        return await self._call("devices", run)

    async def forget_old_devices(self, before: int) -> int:
        """Forget devices not registered since ``before``; drop orphan ledger rows."""
        led = self._ledger

        def run(conn: Conn) -> int:
            n = conn.execute(_sql.to_sqlite(led.forget_old), (before,)).rowcount
            conn.execute(_sql.to_sqlite(PushSql.forget_old), (before,))
            conn.execute(led.orphans)
            return n

        return await self._call("forget devices", lambda c: self._write(c, run))

    async def save_push_target(
        self,
        username: str,
        domain: str,
        device: str,
        *,
        provider: str,
        prid: str,
        param: str | None,
        now: int,
    ) -> None:
        """Keep (or replace) the push parameters of the owner's ``device``."""
        sql, args = (
            _sql.to_sqlite(PushSql.save),
            (username, domain, device, provider, prid, param, now),
        )
        await self._call(
            "save push target", lambda c: self._write(c, lambda c2: c2.execute(sql, args))
        )

    async def claim_push_targets(
        self,
        username: str,
        domain: str,
        *,
        now_ms: int,
        window_ms: int,
        since: int,
        exclude: Sequence[str] = (),
    ) -> list[PushRecord]:
        """Take the owner's push targets that may be pushed now (marked pushed)."""
        sql = _sql.to_sqlite(PushSql.sqlite_claim)
        args = (
            username,
            domain,
            now_ms,
            since,
            now_ms - window_ms,
            orjson.dumps(list(exclude)).decode(),
        )

        count = _sql.to_sqlite(self._sql.count)

        def run(conn: Conn) -> list[PushRecord]:
            taken = conn.execute(sql, args).fetchall()
            if not taken:
                return []
            (waiting,) = conn.execute(count, (username, domain)).fetchone()
            return [PushRecord(r[0], r[1], r[2], r[3], int(waiting)) for r in taken]

        return await self._call("claim push targets", lambda c: self._write(c, run))

    async def drop_push_target(self, username: str, domain: str, device: str, *, prid: str) -> bool:
        """Forget a device's dead push token."""
        sql = _sql.to_sqlite(PushSql.drop)

        def run(conn: Conn) -> bool:
            return conn.execute(sql, (username, domain, device, prid)).rowcount > 0

        return await self._call("drop push target", lambda c: self._write(c, run))

    async def take_push_time(self, username: str, domain: str, device: str) -> int | None:
        """When the device was last pushed (ms), cleared; None when none is outstanding."""
        read, clear = _sql.to_sqlite(PushSql.pushed_at), _sql.to_sqlite(PushSql.clear_pushed)

        def run(conn: Conn) -> int | None:
            row = conn.execute(read, (username, domain, device)).fetchone()
            if row is None:
                return None
            taken = conn.execute(clear, (username, domain, device, row[0])).rowcount
            return int(row[0]) if taken else None

        return await self._call("push time", lambda c: self._write(c, run))

    async def claim_due_reminders(
        self, *, now: int, lease_owner: str, lease_seconds: int, limit: int
    ) -> list[StoredMessage]:
        """Lease up to ``limit`` due reminders, in ``snd_time`` order."""

        def run(conn: Conn) -> list[StoredMessage]:
            rows = [_row(r) for r in conn.execute(self._q_due, (now, limit))]
            self._lease(conn, rows, lease_owner, now + lease_seconds)
            return self._fix_callids(conn, rows)

        return await self._call("claim reminders", lambda c: self._write(c, run))

    async def _update_mids(self, what: str, set_clause: str, mids: Sequence[int]) -> int:
        chunks = _chunks(mids)
        if not chunks:
            return 0

        def run(conn: Conn) -> int:
            n = 0
            for chunk in chunks:
                marks = ", ".join("?" * len(chunk))
                verb = (
                    f"DELETE FROM {self._sql.table}"
                    if set_clause == ""
                    else f"UPDATE {self._sql.table} SET {set_clause}"
                )
                n += conn.execute(f"{verb} WHERE {self._sql.mid} IN ({marks})", chunk).rowcount
            return n

        return await self._call(what, lambda c: self._write(c, run))

    async def delete_delivered(self, mids: Sequence[int]) -> int:
        """Delete delivered rows."""
        return await self._update_mids("delete delivered", "", mids)

    async def release_lease(self, mids: Sequence[int], *, failed: bool = True) -> int:
        """Clear leases; ``failed`` counts an attempt."""
        bump = ", attempts = attempts + 1" if failed else ""
        return await self._update_mids(
            "release lease", f"lease_until = NULL, lease_owner = NULL{bump}", mids
        )

    async def reset_reminder(self, mids: Sequence[int]) -> int:
        """Failed reminders become ordinary offline messages."""
        return await self._update_mids(
            "reset reminder",
            f"{self._sql.snd_time} = 0, lease_until = NULL, lease_owner = NULL",
            mids,
        )

    async def _exec(self, what: str, sql: str, args: tuple[Any, ...]) -> int:
        return await self._call(
            what, lambda c: self._write(c, lambda c2: c2.execute(sql, args).rowcount)
        )

    async def recover_expired_leases(self, now: int) -> int:
        """Clear leases past their deadline."""
        return await self._exec("recover leases", self._q_recover, (now,))

    async def delete_expired(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` expired rows."""
        return await self._exec("delete expired", self._q_expire, (now, limit))

    async def take_expired(self, now: int, limit: int) -> list[StoredMessage]:
        """Delete up to ``limit`` expired rows and return them."""

        def run(conn: Conn) -> list[StoredMessage]:
            return [_row(r) for r in conn.execute(self._q_take_expired, (now, limit))]

        rows = await self._call("take expired", lambda c: self._write(c, run))
        rows.sort(key=lambda m: m.mid)
        return rows

    async def purge(self, username: str, domain: str) -> int:
        """Delete every row of the owner."""
        if not owner_storable(username, domain):
            return 0
        return await self._exec("purge", self._q_purge, (username, domain))

    # -- registrar bindings ---------------------------------------------------------

    async def update_bindings(
        self, username: str, domain: str, plan: PlanFunction, *, now: int
    ) -> BindingsOutcome:
        """Apply a registrar plan under the database write lock (BEGIN IMMEDIATE)."""
        validate_owner(username, domain)
        sql = self._location

        def run(conn: Conn) -> BindingsOutcome:
            existing = [
                binding_from_row(r) for r in conn.execute(sql["select_all"], (username, domain))
            ]
            change = plan(existing)
            if change.error is not None:
                return BindingsOutcome(error=change.error)
            for binding in change.upserts:
                validate_binding(binding)  # raised inside the transaction: it rolls back
            for contact in change.removes:
                conn.execute(sql["delete_one"], (username, domain, contact))
            conn.executemany(sql["upsert"], [binding_row(b) for b in change.upserts])
            live = conn.execute(sql["select_live"], (username, domain, now))
            return BindingsOutcome(bindings=tuple(binding_from_row(r) for r in live))

        return await self._call("register", lambda c: self._write(c, run))

    async def lookup_bindings(self, username: str, domain: str, *, now: int) -> list[Binding]:
        """The user's live bindings, best q first."""
        if not owner_storable(username, domain):
            return []
        sql = self._location["select_live"]

        def run(conn: Conn) -> list[Binding]:
            return [binding_from_row(r) for r in conn.execute(sql, (username, domain, now))]

        return await self._call("lookup", run)

    async def delete_expired_bindings(self, now: int) -> int:
        """Delete bindings past their expiry."""
        return await self._exec("expire bindings", self._location["delete_expired"], (now,))

    # -- digest credentials and nonce counts ----------------------------------------

    async def get_subscriber(self, username: str, domain: str) -> Subscriber | None:
        """The user's credentials, or None."""
        if not owner_storable(username, domain):
            return None
        sql = _sql.to_sqlite(subscriber.SELECT_SUBSCRIBER)

        def run(conn: Conn) -> Subscriber | None:
            row = conn.execute(sql, (username, domain)).fetchone()
            return None if row is None else subscriber.subscriber_from_row(row)

        return await self._call("get subscriber", run)

    async def set_subscriber(
        self,
        username: str,
        domain: str,
        *,
        password: str | None = None,
        ha1: str | None = None,
        ha1_sha256: str | None = None,
        ha1_sha512t256: str | None = None,
    ) -> bool:
        """Create the subscriber or replace its credentials; True when created."""
        sub = Subscriber(
            username, domain, password or "", ha1 or "", ha1_sha256 or "", ha1_sha512t256 or ""
        )
        validate_subscriber(sub)
        args = (sub.username, sub.domain, sub.password, sub.ha1, sub.ha1_sha256, sub.ha1_sha512t256)
        update = _sql.to_sqlite(subscriber.UPDATE_SUBSCRIBER)
        insert = _sql.to_sqlite(subscriber.INSERT_SUBSCRIBER)

        def run(conn: Conn) -> bool:
            # Under the write lock (BEGIN IMMEDIATE): nobody can insert between the two.
            if conn.execute(update, args).rowcount > 0:
                return False
            conn.execute(insert, args)
            return True

        return await self._call("set subscriber", lambda c: self._write(c, run))

    async def remove_subscriber(self, username: str, domain: str) -> bool:
        """Delete the subscriber; False when there was none."""
        if not owner_storable(username, domain):
            return False
        sql = _sql.to_sqlite(subscriber.DELETE_SUBSCRIBER)
        return await self._exec("remove subscriber", sql, (username, domain)) > 0

    async def use_nonce(self, nonce: str, nc: int, *, expires: int) -> bool:
        """Record ``nc`` for ``nonce`` if it increases; False for a replay."""
        validate_nonce(nonce, nc)
        sql = _sql.to_sqlite(subscriber.USE_NONCE)
        return await self._exec("use nonce", sql, (nonce, nc, expires)) > 0

    async def delete_expired_nonces(self, now: int) -> int:
        """Forget the counts of expired nonces."""
        sql = _sql.to_sqlite(subscriber.DELETE_EXPIRED_NONCES)
        return await self._exec("expire nonces", sql, (now,))

    async def count_auth_failures(
        self, source: str, identity: str, *, now: int, window: int
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """One more failure for each key: (count in the window, window end) per key."""
        validate_auth_keys(source, identity)
        sql = _sql.to_sqlite(subscriber.COUNT_AUTH_FAILURES)

        def run(conn: Conn) -> tuple[tuple[int, int], tuple[int, int]]:
            cursor = conn.execute(sql, (source, identity, now, now + window))
            rows = {r[0]: (int(r[1]), int(r[2])) for r in cursor.fetchall()}
            return rows[source], rows[identity]

        return await self._call("count auth failures", lambda c: self._write(c, run))

    async def forgive_auth_failures(self, source: str, identity: str, *, now: int) -> None:
        """Take back one failure of each key."""
        validate_auth_keys(source, identity)
        sql = _sql.to_sqlite(subscriber.FORGIVE_AUTH_FAILURES)
        await self._exec("forgive auth failures", sql, (source, identity, now))

    async def delete_expired_auth_failures(self, now: int) -> int:
        """Forget ended failure windows."""
        sql = _sql.to_sqlite(subscriber.DELETE_EXPIRED_AUTH_FAILURES)
        return await self._exec("expire auth failures", sql, (now,))

    async def count(self, username: str, domain: str) -> int:
        """Rows of the owner."""
        if not owner_storable(username, domain):
            return 0
        sql = self._q_count
        return await self._call(
            "count", lambda c: int(c.execute(sql, (username, domain)).fetchone()[0])
        )

    async def list_page(
        self, username: str, domain: str, limit: int | None, offset: int = 0
    ) -> list[StoredMessage]:
        """Rows of the owner in arrival order, ``limit`` (None: all) from ``offset``."""
        sql = self._q_list + " LIMIT ? OFFSET ?"
        args = (username, domain, -1 if limit is None else limit, offset)
        return await self._call("list", lambda c: [_row(r) for r in c.execute(sql, args)])

    async def silo_summary(self) -> SiloSummary:
        """Row count, and the arrival time of the row that expires first (expiry index)."""
        s = self._sql
        count_sql = f"SELECT count(*) FROM {s.table}"
        oldest_sql = f"SELECT {s.inc_time} FROM {s.table} ORDER BY {s.exp_time} LIMIT 1"

        def run(c: Any) -> SiloSummary:
            rows = int(c.execute(count_sql).fetchone()[0])
            first = c.execute(oldest_sql).fetchone()
            return SiloSummary(rows, int(first[0]) if first is not None else None)

        return await self._call("summary", run)

    async def list(self, username: str, domain: str) -> list[StoredMessage]:
        """Rows of the owner in arrival order."""
        if not owner_storable(username, domain):
            return []
        sql = self._q_list
        return await self._call(
            "list", lambda c: [_row(r) for r in c.execute(sql, (username, domain))]
        )
