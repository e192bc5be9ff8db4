"""The embedded backend: stdlib ``sqlite3`` on one dedicated thread.

Every call runs on a single worker thread that owns the connection, so the event loop never
blocks on disk and the store works from any asyncio loop.  The database is in WAL mode;
writes take the write lock up front with ``BEGIN IMMEDIATE`` so a quota count and its insert
(or a claim's select and update) are atomic, also against other processes on the host --
SQLite serialises writers, ``busy_timeout`` makes them queue instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias, TypeVar

from msilo.errors import DatabaseUnavailable, SchemaError, StorageError
from msilo.storage import _sql, subscriber
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
)
from msilo.storage.subscriber import Subscriber, validate_nonce, validate_subscriber

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
    )


def _chunks(mids: Sequence[int]) -> list[list[int]]:
    ids = [int(m) for m in mids]
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


_Q_LIVE_METHODS = "SELECT methods FROM location WHERE username = ? AND domain = ? AND expires > ?"


class SQLiteStore(Store):
    """``Store`` on a SQLite file (``path``; ``":memory:"`` for a private database)."""

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
            f"{s.ctype}, {s.inc_time}, {s.exp_time}, {s.snd_time}, dedupe_key) "
            f"VALUES ({{0}}, {{1}}, {{2}}, {{3}}, {{4}}, {{5}}, {{6}}, {{7}}, {{8}}, {{9}})"
        )
        self._q_by_key = q(f"SELECT {s.mid} FROM {t} WHERE dedupe_key = {{0}}")
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
        if {c.lower() for c in columns} >= set(_sql.EXTRA_COLUMN_DEFS):
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
        if version is not None and version != SILO_VERSION:
            _sql.diagnose_silo(self.names, columns, version, fold_case=True)
        if self.names.mid.lower() not in have:
            _sql.diagnose_silo(self.names, columns, version, fold_case=True)
        actions: list[str] = []
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

    async def upgrade_schema(self) -> list[str]:
        """Add our columns, indexes and tables to an existing (OpenSIPS) database."""
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
                ),
            )
            results.append(StoreResult(StoreOutcome.STORED, cur.lastrowid))
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

        def run(conn: Conn) -> list[StoredMessage]:
            rows = [
                _row(r)
                for r in conn.execute(
                    self._q_dump, (username, domain, now, -1 if limit is None else limit)
                )
            ]
            self._lease(conn, rows, lease_owner, now + lease_seconds)
            return rows

        return await self._call("claim", lambda c: self._write(c, run))

    async def claim_due_reminders(
        self, *, now: int, lease_owner: str, lease_seconds: int, limit: int
    ) -> list[StoredMessage]:
        """Lease up to ``limit`` due reminders, in ``snd_time`` order."""

        def run(conn: Conn) -> list[StoredMessage]:
            rows = [_row(r) for r in conn.execute(self._q_due, (now, limit))]
            self._lease(conn, rows, lease_owner, now + lease_seconds)
            return rows

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

    async def delete_expired(self, now: int) -> int:
        """Delete expired rows."""
        return await self._exec("delete expired", self._q_expire, (now,))

    async def take_expired(self, now: int, limit: int) -> list[StoredMessage]:
        """Delete up to ``limit`` expired rows and return them."""

        def run(conn: Conn) -> list[StoredMessage]:
            return [_row(r) for r in conn.execute(self._q_take_expired, (now, limit))]

        rows = await self._call("take expired", lambda c: self._write(c, run))
        rows.sort(key=lambda m: m.mid)
        return rows

    async def purge(self, username: str, domain: str) -> int:
        """Delete every row of the owner."""
        return await self._exec("purge", self._q_purge, (username, domain))

    # -- registrar bindings ---------------------------------------------------------

    async def update_bindings(
        self, username: str, domain: str, plan: PlanFunction, *, now: int
    ) -> BindingsOutcome:
        """Apply a registrar plan under the database write lock (BEGIN IMMEDIATE)."""
        sql = self._location

        def run(conn: Conn) -> BindingsOutcome:
            existing = [
                binding_from_row(r) for r in conn.execute(sql["select_all"], (username, domain))
            ]
            change = plan(existing)
            if change.error is not None:
                return BindingsOutcome(error=change.error)
            for contact in change.removes:
                conn.execute(sql["delete_one"], (username, domain, contact))
            conn.executemany(sql["upsert"], [binding_row(b) for b in change.upserts])
            live = conn.execute(sql["select_live"], (username, domain, now))
            return BindingsOutcome(bindings=tuple(binding_from_row(r) for r in live))

        return await self._call("register", lambda c: self._write(c, run))

    async def lookup_bindings(self, username: str, domain: str, *, now: int) -> list[Binding]:
        """The user's live bindings, best q first."""
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

    async def count(self, username: str, domain: str) -> int:
        """Rows of the owner."""
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
        sql = self._q_list
        return await self._call(
            "list", lambda c: [_row(r) for r in c.execute(sql, (username, domain))]
        )
