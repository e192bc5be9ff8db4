"""The MySQL/MariaDB backend (``mysql://user:password@host:port/database``), on asyncmy.

asyncmy, not aiomysql: asyncmy's protocol is Cython and stores batches faster
(bench/RESULTS.md, "MySQL drivers"), and aiomysql 0.3.2 cannot bind a ``bytes`` argument
with the PyMySQL it installs (1.2: ``escape_bytes_prefixed`` is a string there).

* **Group commit.** A batch is stored by one CALL of a stored procedure that
  ``create_schema`` installs (``mysql_sql.store_procedure_body``): one round trip, one
  transaction, the quota enforced under per-owner row locks, dedupe by a unique index.
* **Isolation.** Every session runs READ COMMITTED: each statement sees what was committed
  before it, so a count taken after a lock sees the previous holder's rows (and InnoDB takes
  no gap locks, which would make concurrent stores of neighbouring owners deadlock).
* **Leases** are taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` (MySQL 8.0.1, MariaDB
  10.6; an older server is refused at ``open()`` with its version).
* **Locks by key** (an owner's quota, a user's REGISTER, a device's claim) are row locks
  on a table of 65,536 pre-filled rows (``mysql_sql.LOCK_TABLE``), held to commit.
* **Connections** come from a small pool of our own; a connection that saw any error is
  closed, never reused (its session may be mid-transaction).  A deadlock (1213) or a lock
  wait timeout (1205) runs the whole transaction again, as InnoDB asks.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from msilo.errors import DatabaseUnavailable, InvalidRecord, SchemaError, StorageError
from msilo.storage import _sql, ledger, myurl, push_targets, subscriber
from msilo.storage import mysql_sql as my
from msilo.storage.base import (
    DEFAULT_NAMES,
    LOCATION_VERSION,
    SILO_VERSION,
    SUBSCRIBER_VERSION,
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
from msilo.storage.coalesce import Coalescer
from msilo.storage.location import COLUMNS as LOCATION_COLUMNS
from msilo.storage.location import ORDER_BY as LOCATION_ORDER
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
from msilo.storage.mysql_sql import Q
from msilo.storage.push_targets import PushRecord, PushSql
from msilo.storage.subscriber import (
    Subscriber,
    validate_auth_keys,
    validate_nonce,
    validate_subscriber,
)
from msilo.storage.values import check_text, owner_storable

log = logging.getLogger("msilo.store")

T = TypeVar("T")
Conn = Any  # an asyncmy (or, for the driver comparison, aiomysql) connection

# Client-side errors (asyncmy's and PyMySQL's CR codes) and server codes that mean "the
# server is not reachable right now" rather than "the statement is wrong".
_GONE = {
    2002, 2003, 2005, 2006, 2013, 2014, 2055,  # cannot connect, gone away, lost
    1040, 1053, 1077, 1152, 1153, 1158, 1159, 1160, 1161,  # too many, shutdown, aborted
    1927, 4031,  # killed (MariaDB), disconnected for inactivity (MySQL)
    1290, 1836,  # --read-only / read-only mode (a demoted primary)
}  # fmt: skip
_SCHEMA = {1146, 1054, 1305, 1049}  # no table, column, procedure, database
_RETRY = {1213, 1205}  # deadlock, lock wait timeout: run the transaction again
_RETRIES = 5
# ``LIMIT`` has no "all": the largest row count MySQL takes.
_NO_LIMIT = 18446744073709551615
_CHUNK = 1000
# A CALL's JSON is cut into several CALLs (in one transaction) above this size, so a batch
# of large bodies stays under max_allowed_packet (16 MiB on MariaDB, 64 MiB on MySQL).
_CALL_BYTES = 4 * 1024 * 1024
_SCHEMA_LOCK_SECONDS = 60


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class _Driver:
    """The driver's connect function and error classes."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "asyncmy":
            import asyncmy
            import asyncmy.errors

            self.module: Any = asyncmy
            self.error: type[BaseException] = asyncmy.errors.MySQLError
            self.interface: type[BaseException] = asyncmy.errors.InterfaceError
            self.database_kw = "database"
        elif name == "aiomysql":
            import aiomysql
            import pymysql.err

            self.module = aiomysql
            self.error = pymysql.err.MySQLError
            self.interface = pymysql.err.InterfaceError
            self.database_kw = "db"
        else:
            raise ValueError(f"driver is expected to be asyncmy or aiomysql, got {name!r}")

    async def connect(self, url: myurl.MyUrl, timeout: float) -> Conn:
        kwargs: dict[str, Any] = {
            "user": url.user,
            "password": url.password,
            self.database_kw: url.database,
            "autocommit": True,
            "charset": "utf8mb4",
            "connect_timeout": timeout,
        }
        if url.unix_socket:
            kwargs["unix_socket"] = url.unix_socket
        else:
            kwargs["host"], kwargs["port"] = url.host, url.port
        return await self.module.connect(**kwargs)


def _row(r: Sequence[Any]) -> StoredMessage:
    body = r[5]
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8")
    return StoredMessage(
        mid=int(r[0]),
        username=r[1],
        domain=r[2],
        src_addr=r[3],
        dst_addr=r[4],
        body=bytes(body),
        ctype=r[6],
        inc_time=int(r[7]),
        exp_time=int(r[8]),
        snd_time=int(r[9]),
        attempts=int(r[10]),
        callid=r[11],
    )


async def _fetch(conn: Conn, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, tuple(args))
        rows = await cur.fetchall()
        while await cur.nextset():
            pass
    return [tuple(r) for r in rows or ()]


async def _exec(conn: Conn, sql: str, args: Sequence[Any] = ()) -> int:
    async with conn.cursor() as cur:
        n = await cur.execute(sql, tuple(args))
        while await cur.nextset():
            pass
    return int(n or 0)


class _Pool:
    """At most ``size`` connections, opened on demand and kept while healthy."""

    def __init__(self, open_conn: Callable[[], Awaitable[Conn]], size: int) -> None:
        self._open = open_conn
        self._idle: list[Conn] = []
        self._slots = asyncio.Semaphore(size)
        self._all: set[Conn] = set()
        self.closing = False

    async def acquire(self) -> Conn:
        await self._slots.acquire()
        try:
            if self._idle:
                return self._idle.pop()
            conn = await self._open()
        except BaseException:
            self._slots.release()
            raise
        self._all.add(conn)
        return conn

    def release(self, conn: Conn, *, broken: bool) -> None:
        if broken or self.closing:
            self._all.discard(conn)
            conn.close()
        else:
            self._idle.append(conn)
        self._slots.release()

    def expire_idle(self) -> None:
        """Close every idle connection (after one failed: the server likely closed all)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._all.discard(conn)
            conn.close()

    async def close(self) -> None:
        self.closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._all.discard(conn)
            try:
                await asyncio.wait_for(conn.ensure_closed(), 2)
            except Exception:
                conn.close()
        for conn in list(self._all):
            conn.close()
        self._all.clear()


class MySQLStore(Store):
    """``Store`` on MySQL 8.0.4+ or MariaDB 10.6+ (``url``: ``mysql://user:pw@host:port/db``)."""

    def __init__(
        self,
        url: str,
        names: SiloNames = DEFAULT_NAMES,
        *,
        max_size: int = 8,
        connect_timeout: float = 10.0,
        driver: str = "asyncmy",
        warm: bool = False,
        **_ignored: Any,
    ) -> None:
        """``warm``: open ``max_size`` connections at ``open()`` (a serving process)."""
        if max_size <= 0:
            raise ValueError("max_size is expected to be greater than zero")
        self.url = url
        self._url = myurl.parse_my_url(url)
        self.names = names
        self._where = self._url.where()
        self._max_size = max_size
        self.warm = warm
        # InnoDB commits concurrent transactions with shared log flushes (group commit).
        self.write_concurrency = max_size
        self._connect_timeout = connect_timeout
        self._driver = _Driver(driver)
        self._pool: _Pool | None = None
        self.server_version = ""
        # The store procedure's set-based path needs consecutive AUTO_INCREMENT ids for one
        # INSERT ... SELECT (innodb_autoinc_lock_mode 0 or 1; see mysql_sql).
        self._fast = 0
        self._sql = _sql.SiloSql(names)
        self._ledger = ledger.LedgerSql(names)
        self.procedure = names.object_name("store", prefix="msilo_")
        self._lookups: Coalescer[tuple[str, str, int], tuple[Binding, ...]] = Coalescer(
            self._lookup_many, tuple
        )
        # Deliveries from every concurrent dump (deliver_to = "first") in one DELETE.
        self._deletes: Coalescer[int, bool] = Coalescer(self._delete_many, bool, max_batch=1024)
        # Deliveries to devices from every concurrent dump settle in one transaction.
        self._settles: Coalescer[tuple[int, str, int], bool] = Coalescer(
            self._settle_many, bool, max_batch=512
        )
        self._build_statements()

    # --- plumbing ---------------------------------------------------------------------------

    def _build_statements(self) -> None:
        s, t = self._sql, self._sql.table
        led = self._ledger.ledger
        self._location = location_sql(lambda n: f"{{{n - 1}}}")
        self._q_count = Q(s.count)
        self._q_list = Q(s.list)
        self._q_purge = Q(s.purge)
        self._q_recover = Q(s.recover)
        # MySQL cannot delete from a table its own subquery reads: DELETE ... LIMIT instead,
        # in expiry index order (deterministic for statement-based replication).
        self._q_expire = Q(
            f"DELETE FROM {t} WHERE {s.exp_time} <= {{0}} "
            f"ORDER BY {s.exp_time}, {s.mid} LIMIT {{1}}"
        )
        self._q_call = f"CALL {quote_ident(self.procedure)}(%s, %s, %s, %s, %s, %s)"
        callid = s.derived_callid_of(t)
        # FORCE INDEX: rows read (and so locked) in the order of the claim (see
        # mysql_sql.silo_indexes); on a small table the optimizer would rather sort.
        self._q_claim = Q(
            f"SELECT {s.columns}, {callid} FROM {t} FORCE INDEX ({s.idx_account}) "
            f"WHERE {s.dump_filter} "
            f"ORDER BY {s.order_arrival} LIMIT {{3}} FOR UPDATE SKIP LOCKED"
        )
        self._q_claim_due = Q(
            f"SELECT {s.columns}, {callid} FROM {t} FORCE INDEX ({s.idx_due}) "
            f"WHERE {s.due_filter} "
            f"ORDER BY {s.snd_time}, {s.mid} LIMIT {{1}} FOR UPDATE SKIP LOCKED"
        )
        self._q_take_expired = Q(
            f"SELECT {s.columns} FROM {t} WHERE {s.exp_time} <= {{0}} ORDER BY {s.mid} "
            f"LIMIT {{1}} FOR UPDATE"
        )
        # Candidates for one device (its claims are serialised by the device's lock row).
        self._q_device_dump = Q(
            f"SELECT {s.columns}, {callid}, (SELECT 1 FROM {led} l WHERE l.mid = {t}.{s.mid} "
            f"AND l.device = {{3}}) FROM {t} WHERE {s.dump_filter} AND NOT EXISTS (SELECT 1 "
            f"FROM {led} l WHERE l.mid = {t}.{s.mid} AND l.device = {{3}} "
            f"AND (l.delivered <> 0 OR l.lease_until > {{2}})) "
            f"ORDER BY {s.order_arrival} LIMIT {{4}}"
        )
        self._q_ledger_lease = (
            f"INSERT INTO {led} (mid, device, delivered, lease_until, lease_owner) VALUES "
            "{rows} ON DUPLICATE KEY UPDATE lease_until = VALUES(lease_until), "
            "lease_owner = VALUES(lease_owner)"
        )
        self._q_ledger_mark = (
            f"INSERT IGNORE INTO {led} (mid, device, delivered, lease_until, lease_owner) "
            "VALUES {rows}"
        )
        self._q_ledger_done = (
            f"INSERT INTO {led} (mid, device, delivered) VALUES {{rows}} "
            "ON DUPLICATE KEY UPDATE delivered = 1, lease_until = NULL, lease_owner = NULL"
        )
        # "{mids}" is replaced by an IN list; the memory is the last argument.
        self._q_complete = (
            f"SELECT m.{s.mid} FROM {t} m WHERE m.{s.mid} IN ({{mids}}) "
            f"AND NOT EXISTS ({self._ledger.undelivered('%s')})"
        )
        self._q_touch = (
            f"INSERT INTO {ledger.DEVICE_TABLE} (username, domain, device, last_register) "
            "VALUES {rows} ON DUPLICATE KEY UPDATE last_register = IF(last_register <= "
            f"VALUES(last_register) - {ledger.TOUCH_GRANULARITY}, VALUES(last_register), "
            "last_register)"
        )
        self._q_lock = f"SELECT slot FROM {my.LOCK_TABLE} WHERE slot IN ({{slots}}) FOR UPDATE"
        # Many users' live bindings in one query (each key with its own "now").
        self._q_lookup_many = (
            f"SELECT {LOCATION_COLUMNS}, k.n FROM location JOIN JSON_TABLE(%s, '$[*]' COLUMNS ("
            "u VARCHAR(64) PATH '$[0]', d VARCHAR(64) PATH '$[1]', n BIGINT PATH '$[2]')) AS k "
            f"ON username = k.u AND domain = k.d WHERE expires > k.n {LOCATION_ORDER}"
        )

    def _check_open(self, what: str) -> _Pool:
        if self._pool is None:
            raise StorageError(f"MySQL {what}: the store is not open")
        return self._pool

    def _wrap(self, exc: BaseException, what: str) -> StorageError:
        code = _code(exc)
        text = str(exc) or type(exc).__name__
        if code in _GONE or isinstance(exc, OSError | self._driver.interface):
            return DatabaseUnavailable(f"MySQL at {self._where} unavailable during {what}: {text}")
        if code in _SCHEMA:
            return SchemaError(f"MySQL {what}: {text}: run `msilo db init` (or `msilo db upgrade`)")
        return StorageError(f"MySQL {what} failed: {text}")

    async def _run(
        self,
        what: str,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        idempotent: bool = False,
        transaction: bool = False,
    ) -> T:
        """Run ``fn`` on a pooled connection (in a transaction with ``transaction``),
        mapping the driver's errors to ours.

        A deadlock or lock wait timeout rolled the transaction back: it runs again.  A
        connection-level failure closes every idle connection (the server has usually
        closed them all) and ``idempotent`` calls try once more on a fresh one.
        """
        pool = self._check_open(what)
        lost_retries = 1 if idempotent else 0
        for attempt in range(_RETRIES + 1):
            try:
                conn = await pool.acquire()
            except (self._driver.error, OSError) as exc:
                raise self._wrap(exc, what) from exc
            try:
                if transaction:
                    await _exec(conn, "START TRANSACTION")
                    result = await fn(conn)
                    await _exec(conn, "COMMIT")
                else:
                    result = await fn(conn)
            except BaseException as exc:
                # A connection that saw an error (or a cancellation mid-statement) may be
                # mid-transaction or out of step with the protocol: never reused.
                pool.release(conn, broken=True)
                if isinstance(exc, StorageError) or not isinstance(
                    exc, self._driver.error | OSError
                ):
                    raise
                wrapped = self._wrap(exc, what)
                # Safe whatever the call: the transaction was rolled back (this connection
                # is closed), so nothing of it was committed.
                if _code(exc) in _RETRY and attempt < _RETRIES:
                    log.debug("event=db_retry what=%s error=%r", what, str(exc))
                    await asyncio.sleep(0.005 * (attempt + 1))
                    continue
                if isinstance(wrapped, DatabaseUnavailable):
                    pool.expire_idle()
                    if lost_retries > 0 and not pool.closing:
                        lost_retries -= 1
                        continue
                raise wrapped from exc
            pool.release(conn, broken=False)
            return result
        raise StorageError(f"MySQL {what}: gave up after {_RETRIES} deadlocks")  # not reached

    async def _connect(self) -> Conn:
        conn = await self._driver.connect(self._url, self._connect_timeout)
        try:
            await _exec(conn, f"SET SESSION sql_mode = '{my.SESSION_SQL_MODE}'")
            await _exec(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            # The store procedure's fate list is a GROUP_CONCAT (MySQL's default cap: 1 KiB).
            await _exec(conn, "SET SESSION group_concat_max_len = 16777216")
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Connect, check the server's version (fails with ``DatabaseUnavailable`` if
        unreachable, ``SchemaError`` if too old)."""
        if self._pool is not None:
            return
        pool = _Pool(self._connect, self._max_size)
        try:
            conn = await pool.acquire()
        except (self._driver.error, OSError) as exc:
            raise DatabaseUnavailable(f"cannot connect to MySQL at {self._where}: {exc}") from exc
        try:
            row = (await _fetch(conn, "SELECT VERSION(), @@innodb_autoinc_lock_mode"))[0]
            version = str(row[0])
            self._fast = 1 if int(row[1]) in (0, 1) else 0
        except (self._driver.error, OSError) as exc:
            pool.release(conn, broken=True)
            raise DatabaseUnavailable(f"cannot query MySQL at {self._where}: {exc}") from exc
        pool.release(conn, broken=False)
        problem = my.server_version_problem(version)
        if problem is not None:
            await pool.close()
            raise SchemaError(f"MySQL at {self._where}: {problem}")
        self.server_version = version
        self._pool = pool
        if self.warm:
            conns = [await pool.acquire() for _ in range(self._max_size - 1)]
            for c in conns:
                pool.release(c, broken=False)

    async def close(self) -> None:
        """Close every connection; idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # --- schema -----------------------------------------------------------------------------

    @staticmethod
    async def _columns(conn: Conn, table: str) -> dict[str, str] | None:
        """Column name (lower case) → column type of ``table``, or None when missing."""
        rows = await _fetch(
            conn,
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (table,),
        )
        return {str(r[0]).lower(): str(r[1]).lower() for r in rows} if rows else None

    @staticmethod
    async def _indexes(conn: Conn, table: str) -> dict[str, tuple[str, ...]]:
        """Index name (lower case) → its columns (lower case), in order."""
        rows = await _fetch(
            conn,
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY INDEX_NAME, "
            "SEQ_IN_INDEX",
            (table,),
        )
        found: dict[str, tuple[str, ...]] = {}
        for name, column in rows:
            key = str(name).lower()
            found[key] = (*found.get(key, ()), str(column).lower())
        return found

    async def _version(self, conn: Conn, table: str) -> int | None:
        if await self._columns(conn, "version") is None:
            return None
        rows = await _fetch(
            conn, "SELECT table_version FROM version WHERE table_name = %s", (table,)
        )
        return int(rows[0][0]) if rows else None

    async def _procedure_body(self, conn: Conn) -> str | None:
        rows = await _fetch(
            conn,
            "SELECT ROUTINE_DEFINITION FROM information_schema.ROUTINES "
            "WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME = %s "
            "AND ROUTINE_TYPE = 'PROCEDURE'",
            (self.procedure,),
        )
        return None if not rows else str(rows[0][0] or "")

    async def _diagnose(self, conn: Conn) -> None:
        table = self.names.table
        columns = await self._columns(conn, table)
        version = await self._version(conn, table)
        _sql.diagnose_silo(
            self.names, None if columns is None else set(columns), version, fold_case=True
        )
        for aux, _ddl in my.aux_tables_ddl():
            if await self._columns(conn, aux) is None:
                raise SchemaError(f"table {aux!r} is missing: run `msilo db init`")
        if await self._procedure_body(conn) is None:
            raise SchemaError(
                f"procedure {self.procedure} (stores batches into {table!r}) is missing: "
                f"run `msilo db upgrade`"
            )

    async def _ensure_version_row(self, conn: Conn, table: str, version: int) -> bool:
        return (
            await _exec(
                conn,
                "INSERT INTO version (table_name, table_version) SELECT %s, %s FROM DUAL "
                "WHERE NOT EXISTS (SELECT 1 FROM version WHERE table_name = %s)",
                (table, version, table),
            )
            > 0
        )

    async def _create_aux(self, conn: Conn, actions: list[str]) -> None:
        if await self._columns(conn, "version") is None:
            await _exec(conn, my.VERSION_DDL)
            actions.append("created table version")
        versions = {"location": LOCATION_VERSION, "subscriber": SUBSCRIBER_VERSION}
        for table, ddl in [
            *my.aux_tables_ddl(),
            (ledger.ledger_table(self.names), my.ledger_ddl(self.names)),
        ]:
            if await self._columns(conn, table) is None:
                await _exec(conn, ddl)
                actions.append(f"created table {table}")
                if table == my.LOCK_TABLE:
                    await _exec(conn, my.FILL_LOCKS)
            if table in versions and await self._ensure_version_row(conn, table, versions[table]):
                actions.append(f"set version of {table} to {versions[table]}")

    async def _ensure_procedure(self, conn: Conn, actions: list[str]) -> None:
        body = my.store_procedure_body(self._sql)
        current = await self._procedure_body(conn)
        if current == body:
            return
        if current is not None:
            await _exec(conn, f"DROP PROCEDURE IF EXISTS {quote_ident(self.procedure)}")
        await _exec(conn, my.store_procedure_ddl(self.procedure, body))
        actions.append(f"{'created' if current is None else 'updated'} procedure {self.procedure}")

    async def _create_indexes(self, conn: Conn, actions: list[str]) -> None:
        have = await self._indexes(conn, self.names.table)
        # By name: the claims name theirs (FORCE INDEX).  OpenSIPS's account_idx (owner
        # only, no arrival time) stays beside ours.
        missing = [(n, ddl) for n, _, ddl in my.silo_indexes(self._sql) if n.lower() not in have]
        if missing:
            adds = ", ".join(f"ADD {ddl}" for _, ddl in missing)
            await _exec(conn, f"ALTER TABLE {self._sql.table} {adds}")
            actions.extend(f"created index {n}" for n, _ in missing)

    async def _create(self, conn: Conn) -> list[str]:
        actions: list[str] = []
        table = self.names.table
        columns = await self._columns(conn, table)
        if columns is None:
            await _exec(conn, my.silo_table_ddl(self._sql))
            actions.append(f"created table {table}")
            columns = await self._columns(conn, table) or {}
        await self._create_aux(conn, actions)
        if set(columns) >= set(my.EXTRA_COLUMN_DEFS) - set(_sql.LATER_COLUMNS):
            # A table of ours from an earlier release: its newer (nullable) columns.
            for name in _sql.LATER_COLUMNS:
                if name not in columns:
                    await _exec(
                        conn,
                        f"ALTER TABLE {self._sql.table} ADD COLUMN {name} "
                        f"{my.EXTRA_COLUMN_DEFS[name]}",
                    )
                    actions.append(f"added column {table}.{name}")
                    columns[name] = "text"
        if set(columns) >= set(my.EXTRA_COLUMN_DEFS) and self.names.mid.lower() in columns:
            # Only on a table of our layout: an OpenSIPS table is left to `db upgrade`.
            await self._create_indexes(conn, actions)
            if await self._ensure_version_row(conn, table, SILO_VERSION):
                actions.append(f"set version of {table} to {SILO_VERSION}")
            await self._ensure_procedure(conn, actions)
        return actions

    async def _under_schema_lock(self, what: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` holding a named lock: DDL commits by itself on MySQL, so concurrently
        starting workers and hosts are serialised by ``GET_LOCK`` instead of a transaction."""

        async def run(conn: Conn) -> T:
            name = f"msilo-schema:{self._url.database}"[:64]
            got = await _fetch(conn, "SELECT GET_LOCK(%s, %s)", (name, _SCHEMA_LOCK_SECONDS))
            if not got or got[0][0] != 1:
                raise StorageError(f"MySQL {what}: another process holds the schema lock")
            try:
                return await fn(conn)
            finally:
                await _exec(conn, "DO RELEASE_LOCK(%s)", (name,))

        return await self._run(what, run)

    async def create_schema(self) -> None:
        """Create what is missing (safe when several processes start at once), then check."""

        async def run(conn: Conn) -> None:
            for action in await self._create(conn):
                log.info("event=schema_created action=%r", action)
            await self._diagnose(conn)

        await self._under_schema_lock("create schema", run)

    async def check_schema(self) -> None:
        """Raise ``SchemaError`` naming the fix when the schema is unusable."""
        await self._run("check schema", self._diagnose, idempotent=True)

    async def _upgrade(self, conn: Conn) -> list[str]:
        names, table = self.names, self.names.table
        columns = await self._columns(conn, table)
        if columns is None:
            return await self._create(conn)
        version = await self._version(conn, table)
        kamailio = _sql.is_kamailio_silo(set(columns), version, fold_case=True)
        foreign = version is not None and version != SILO_VERSION and not kamailio
        if foreign or names.mid.lower() not in columns:
            _sql.diagnose_silo(names, set(columns), version, fold_case=True)
        actions: list[str] = []
        changes: list[str] = []
        collation = await _fetch(
            conn,
            "SELECT TABLE_COLLATION FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (table,),
        )
        if not collation or str(collation[0][0]).lower() != my.COLLATION:
            # OpenSIPS's tables take the server's default (latin1 or utf8 with a collation
            # that ignores case): msilo matches owners and Call-IDs exactly, in UTF-8.
            changes.append(f"CONVERT TO CHARACTER SET utf8mb4 COLLATE {my.COLLATION}")
            actions.append(f"converted {table} to utf8mb4 ({my.COLLATION}: owners match exactly)")
        for name, ddl in my.EXTRA_COLUMN_DEFS.items():
            if name not in columns:
                changes.append(f"ADD COLUMN {name} {ddl}")
                actions.append(f"added column {table}.{name}")
        q = quote_ident
        # 64-bit ids and times (spec D4, §10 Q14/Q16): OpenSIPS's are INT (UNSIGNED for
        # the id); widening keeps every value and AUTO_INCREMENT's next id.
        if not columns[names.mid.lower()].startswith("bigint"):
            changes.append(f"MODIFY {q(names.mid)} {my.ID_TYPE.replace(' PRIMARY KEY', '')}")
            actions.append(f"widened {table}.{names.mid} to BIGINT")
        for col in (names.inc_time, names.exp_time, names.snd_time):
            if not columns.get(col.lower(), "bigint").startswith("bigint"):
                changes.append(f"MODIFY {q(col)} BIGINT NOT NULL DEFAULT 0")
                actions.append(f"widened {table}.{col} to BIGINT")
        ctype = columns.get(names.ctype.lower(), "")
        if ctype.startswith(("char", "varchar", "tinytext")) or kamailio:
            # CHAR(255) (OpenSIPS) and VARCHAR(32) NOT NULL (Kamailio: cuts
            # application/vnd.gsma.rcs-ft-http+xml) become unlimited and nullable.
            changes.append(f"MODIFY {q(names.ctype)} TEXT DEFAULT NULL")
            actions.append(f"widened {table}.{names.ctype} to TEXT (nullable)")
        body = columns.get(names.body.lower(), "")
        if body in ("blob", "tinyblob", "text", "tinytext"):
            # A BLOB holds 64 KiB; outside strict mode a longer body would be cut silently.
            changes.append(f"MODIFY {q(names.body)} MEDIUMBLOB DEFAULT NULL")
            actions.append(f"widened {table}.{names.body} to MEDIUMBLOB (16 MiB)")
        if kamailio:
            # Kamailio's callid is VARCHAR(128) NOT NULL DEFAULT '': a Call-ID has no length
            # limit (RFC 3261 §8.1.1.4) and msilo stores NULL for a MESSAGE without one.
            # Its '' rows stay '': delivery treats an empty Call-ID as none.
            changes.append(f"MODIFY callid {my.EXTRA_COLUMN_DEFS['callid']}")
            actions.append(f"made {table}.callid TEXT and nullable")
        if changes:
            # One ALTER TABLE: the table is rebuilt once.
            await _exec(conn, f"ALTER TABLE {self._sql.table} " + ", ".join(changes))
        if kamailio:
            if version is not None:
                await _exec(
                    conn,
                    "UPDATE version SET table_version = %s WHERE table_name = %s",
                    (SILO_VERSION, table),
                )
            actions.append(_sql.kamailio_conversion(table, version))
        await self._create_indexes(conn, actions)
        await self._create_aux(conn, actions)
        if await self._ensure_version_row(conn, table, SILO_VERSION):
            actions.append(f"set version of {table} to {SILO_VERSION}")
        await self._ensure_procedure(conn, actions)
        await self._diagnose(conn)
        return actions

    async def upgrade_schema(self) -> list[str]:
        """Bring an OpenSIPS- or Kamailio-created table up to ours in place.

        MySQL commits each ALTER TABLE by itself: the upgrade is one ALTER TABLE of the silo
        table (all or nothing), then the indexes, tables and procedure, each idempotent --
        a failure part-way leaves a table the next ``db upgrade`` finishes.
        """
        actions = await self._under_schema_lock("upgrade schema", self._upgrade)
        for action in actions:
            log.info("event=schema_upgraded action=%r", action)
        return actions

    # --- storing ----------------------------------------------------------------------------

    def _validate(self, m: NewMessage) -> None:
        validate_message(m)
        if len(m.body) > my.BODY_LIMIT:
            raise InvalidRecord(
                f"body is larger than MEDIUMBLOB holds ({my.BODY_LIMIT} bytes)", field="body"
            )
        for device in (*m.delivered_to, *m.leased_to):
            check_text("device", device, my.KEY_TEXT_LIMIT)

    @staticmethod
    def _json_row(m: NewMessage) -> dict[str, Any]:
        row: dict[str, Any] = {
            "u": m.username,
            "d": m.domain,
            "s": m.src_addr,
            "t": m.dst_addr,
            "i": m.inc_time,
            "e": m.exp_time,
            "n": m.snd_time,
            "o": 1 if m.unless_online else 0,
        }
        if m.body:  # OpenSIPS stores NULL for no body
            row["b"] = base64.b64encode(bytes(m.body)).decode("ascii")
        if m.ctype is not None:
            row["c"] = m.ctype
        key = my.dedupe_value(m.dedupe_key)
        if key is not None:
            row["k"] = key
        if m.callid is not None:
            row["x"] = m.callid
        return row

    def _chunks(self, batch: Sequence[NewMessage]) -> list[list[NewMessage]]:
        chunks: list[list[NewMessage]] = [[]]
        size = 0
        for m in batch:
            weight = len(m.body) * 4 // 3 + 512
            if chunks[-1] and size + weight > _CALL_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(m)
            size += weight
        return chunks

    async def store_batch(
        self, messages: Sequence[NewMessage], max_messages: int
    ) -> list[StoreResult]:
        """Store the batch with one CALL of the store procedure (see ``Store.store_batch``)."""
        if not messages:
            return []
        for m in messages:
            self._validate(m)
        batch, slots = fold_repeated_keys(messages)
        now = int(time.time())
        lock = (
            sorted({my.owner_slot(self.names.table, m.username, m.domain) for m in batch})
            if max_messages > 0
            else []
        )
        chunks = self._chunks(batch)
        marks = any(m.delivered_to or m.leased_to for m in batch)
        call = self._q_call

        async def one(conn: Conn, part: list[NewMessage], txn: int, locks: list[int]) -> Any:
            rows = orjson.dumps([self._json_row(m) for m in part]).decode()
            args = (rows, orjson.dumps(locks).decode(), max_messages, now, txn, self._fast)
            got = await _fetch(conn, call, args)
            try:
                return my.parse_outcomes(got[0], len(part))
            except ValueError as exc:
                raise StorageError(f"MySQL store: {exc}") from exc

        async def run(conn: Conn) -> tuple[list[int], list[int | None]]:
            outcomes: list[int] = []
            mids: list[int | None] = []
            for i, part in enumerate(chunks):
                o, mm = await one(conn, part, 0, lock if i == 0 else [])
                outcomes += o
                mids += mm
            if marks:
                await self._mark_ledger(conn, batch, outcomes, mids)
            return outcomes, mids

        async def single(conn: Conn) -> tuple[list[int], list[int | None]]:
            result: tuple[list[int], list[int | None]] = await one(conn, chunks[0], 1, lock)
            return result

        # With a dedupe key on every row a second attempt cannot store anything twice.
        keyed = all(m.dedupe_key is not None for m in batch)
        if len(chunks) == 1 and not marks:
            # The common case: one CALL, one round trip, its own transaction.
            outcomes, mids = await self._run("store", single, idempotent=keyed)
        else:
            outcomes, mids = await self._run("store", run, idempotent=keyed, transaction=True)
        kinds = {
            my.STORED: StoreOutcome.STORED,
            my.DUPLICATE: StoreOutcome.DUPLICATE,
            my.OVER_QUOTA: StoreOutcome.OVER_QUOTA,
            my.ONLINE: StoreOutcome.ONLINE,
        }
        results = [StoreResult(kinds[o], mid) for o, mid in zip(outcomes, mids, strict=True)]
        return unfold_results(results, slots)

    async def _mark_ledger(
        self,
        conn: Conn,
        batch: Sequence[NewMessage],
        outcomes: Sequence[int],
        mids: Sequence[int | None],
    ) -> None:
        rows: list[tuple[Any, ...]] = []
        for m, outcome, mid in zip(batch, outcomes, mids, strict=True):
            if outcome != my.STORED or mid is None:
                continue
            rows.extend((mid, device, 1, None, None) for device in m.delivered_to)
            rows.extend((mid, device, 0, m.lease_until, m.lease_owner) for device in m.leased_to)
        if rows:
            sql = self._q_ledger_mark.format(rows=", ".join(["(%s, %s, %s, %s, %s)"] * len(rows)))
            await _exec(conn, sql, [v for r in rows for v in r])

    # --- delivery ---------------------------------------------------------------------------

    async def _lock(self, conn: Conn, slots: Sequence[int]) -> None:
        """Row locks on the lock table, held to commit (in slot order: no deadlock)."""
        ordered = sorted(set(slots))
        if ordered:
            await _fetch(conn, self._q_lock.format(slots=my.in_list(len(ordered))), ordered)

    async def _lease_rows(
        self, conn: Conn, rows: list[tuple[Any, ...]], owner: str, until: int
    ) -> list[StoredMessage]:
        """Lease claimed rows and write back the Call-IDs made unique (one UPDATE)."""
        if not rows:
            return []
        s = self._sql
        claimed = [_row(r) for r in rows]
        mids = [m.mid for m in claimed]
        fixed = {m.mid: r[12] for m, r in zip(claimed, rows, strict=True) if r[12] != m.callid}
        args: list[Any] = [until, owner]
        setcid = ""
        if fixed:
            setcid = ", callid = CASE " + " ".join(
                f"WHEN {s.mid} = %s THEN %s" for _ in fixed
            ) + " ELSE callid END"  # fmt: skip
            for mid, cid in fixed.items():
                args += [mid, cid]
        await _exec(
            conn,
            f"UPDATE {s.table} SET lease_until = %s, lease_owner = %s{setcid} "
            f"WHERE {s.mid} IN ({my.in_list(len(mids))})",
            [*args, *mids],
        )
        return [dataclasses.replace(m, callid=r[12]) for m, r in zip(claimed, rows, strict=True)]

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
        q = self._q_claim
        args = q.args(username, domain, now, _NO_LIMIT if limit is None else limit)

        async def run(conn: Conn) -> list[StoredMessage]:
            rows = await _fetch(conn, q.text, args)
            return await self._lease_rows(conn, rows, lease_owner, now + lease_seconds)

        return await self._run("claim", run, transaction=True)

    async def claim_due_reminders(
        self, *, now: int, lease_owner: str, lease_seconds: int, limit: int
    ) -> list[StoredMessage]:
        """Lease up to ``limit`` due reminders, in ``snd_time`` order."""
        q = self._q_claim_due

        async def run(conn: Conn) -> list[StoredMessage]:
            rows = await _fetch(conn, q.text, q.args(now, limit))
            return await self._lease_rows(conn, rows, lease_owner, now + lease_seconds)

        return await self._run("claim reminders", run, transaction=True)

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
        """Lease the rows ``device`` has not had, in arrival order (per-device leases).

        Claims for one device are serialised by its lock row (other devices of the owner
        claim the same messages at the same time): after the lock, READ COMMITTED shows
        the leases the previous claimer committed.
        """
        if not owner_storable(username, domain):
            return []
        check_text("device", device, my.KEY_TEXT_LIMIT)
        q = self._q_device_dump
        args = q.args(username, domain, now, device, _NO_LIMIT if limit is None else limit)
        s = self._sql
        until = now + lease_seconds

        async def run(conn: Conn) -> list[tuple[StoredMessage, bool]]:
            await self._lock(conn, [my.device_slot(self.names.table, username, domain, device)])
            rows = await _fetch(conn, q.text, args)
            if not rows:
                return []
            leases = [(int(r[0]), device, 0, until, lease_owner) for r in rows]
            await _exec(
                conn,
                self._q_ledger_lease.format(rows=", ".join(["(%s, %s, %s, %s, %s)"] * len(rows))),
                [v for lease in leases for v in lease],
            )
            out: list[tuple[StoredMessage, bool]] = []
            fixed = [(int(r[0]), r[12]) for r in rows if r[12] != r[11]]
            for mid, cid in fixed:
                await _exec(
                    conn, f"UPDATE {s.table} SET callid = %s WHERE {s.mid} = %s", (cid, mid)
                )
            for r in rows:
                out.append((dataclasses.replace(_row(r), callid=r[12]), r[13] is None))
            return out

        return await self._run("claim", run, transaction=True)

    async def settle_delivered(self, pairs: Sequence[tuple[int, str]], *, memory: int) -> int:
        """Record deliveries; delete the messages no due device lacks any more (concurrent
        settles share one transaction, as on PostgreSQL)."""
        if not pairs:
            return 0
        keys = dict.fromkeys((int(mid), device, memory) for mid, device in pairs)
        done = await asyncio.gather(*(self._settles.get(key) for key in keys))
        return len({key[0] for key, gone in zip(keys, done, strict=True) if gone})

    async def _settle_many(
        self, keys: list[tuple[int, str, int]]
    ) -> dict[tuple[int, str, int], bool]:
        # One transaction per memory setting (a deployment has one).
        found: dict[tuple[int, str, int], bool] = {}
        for memory in dict.fromkeys(k[2] for k in keys):
            batch = [(k[0], k[1]) for k in keys if k[2] == memory]
            gone = await self._settle_call(batch, memory)
            found.update({(m, d, memory): m in gone for m, d in batch})
        return found

    async def _settle_call(self, pairs: list[tuple[int, str]], memory: int) -> set[int]:
        """The messages of ``pairs`` that their deliveries completed (and so deleted)."""
        s = self._sql
        mids = sorted({m for m, _ in pairs})
        q = self._q_complete

        async def run(conn: Conn) -> set[int]:
            # The messages are locked first: two devices settling one message queue, and the
            # later one's completion check (a fresh statement) sees the other's delivery.
            found = await _fetch(
                conn,
                f"SELECT {s.mid} FROM {s.table} WHERE {s.mid} IN ({my.in_list(len(mids))}) "
                f"ORDER BY {s.mid} FOR UPDATE",
                mids,
            )
            live = {int(r[0]) for r in found}
            done = [(m, d) for m, d in pairs if m in live]
            if not done:
                return set()
            await _exec(
                conn,
                self._q_ledger_done.format(rows=", ".join(["(%s, %s, 1)"] * len(done))),
                [v for pair in done for v in pair],
            )
            ids = sorted(live)
            sql = q.replace("{mids}", my.in_list(len(ids)))
            gone = [int(r[0]) for r in await _fetch(conn, sql, [*ids, memory])]
            await self._delete_messages(conn, gone)
            return set(gone)

        # Idempotent: a delivery recorded twice is recorded once.
        return await self._run("settle delivered", run, transaction=True, idempotent=True)

    async def _delete_messages(self, conn: Conn, mids: Sequence[int]) -> int:
        """Delete messages and their ledger rows; returns how many messages went."""
        if not mids:
            return 0
        s, marks = self._sql, my.in_list(len(mids))
        n = await _exec(conn, f"DELETE FROM {s.table} WHERE {s.mid} IN ({marks})", mids)
        await _exec(conn, f"DELETE FROM {self._ledger.ledger} WHERE mid IN ({marks})", mids)
        return n

    async def release_device_leases(
        self, pairs: Sequence[tuple[int, str]], *, failed: bool = True
    ) -> int:
        """Drop the leases of unsuccessful deliveries; ``failed`` counts an attempt."""
        if not pairs:
            return 0
        s, led = self._sql, self._ledger.ledger
        unique = list(dict.fromkeys((int(m), d) for m, d in pairs))
        cond = " OR ".join(["(mid = %s AND device = %s)"] * len(unique))
        flat = [v for pair in unique for v in pair]

        async def run(conn: Conn) -> int:
            held = await _fetch(
                conn,
                f"SELECT mid FROM {led} WHERE ({cond}) AND delivered = 0 FOR UPDATE",
                flat,
            )
            if not held:
                return 0
            await _exec(conn, f"DELETE FROM {led} WHERE ({cond}) AND delivered = 0", flat)
            if failed:
                # One attempt per message whose lease went (as on PostgreSQL).
                bumped = sorted({int(r[0]) for r in held})
                await _exec(
                    conn,
                    f"UPDATE {s.table} SET attempts = attempts + 1 "
                    f"WHERE {s.mid} IN ({my.in_list(len(bumped))})",
                    bumped,
                )
            return len(held)

        return await self._run("release lease", run, transaction=True)

    async def touch_devices(
        self, username: str, domain: str, devices: Sequence[str], *, now: int
    ) -> None:
        """Remember the owner's devices as registered now."""
        if not devices:
            return
        for device in devices:
            check_text("device", device, my.KEY_TEXT_LIMIT)
        unique = list(dict.fromkeys(devices))
        sql = self._q_touch.format(rows=", ".join(["(%s, %s, %s, %s)"] * len(unique)))
        args = [v for d in unique for v in (username, domain, d, now)]

        async def run(conn: Conn) -> int:
            return await _exec(conn, sql, args)

        await self._run("touch devices", run, idempotent=True)

    async def forget_devices(
        self, username: str, domain: str, devices: Sequence[str] | None, *, memory: int
    ) -> int:
        """Forget devices; delete the messages that leaves complete."""
        led = self._ledger
        complete = Q(led.complete_of_owner)

        async def run(conn: Conn) -> int:
            if devices is None:
                for sql in (led.forget_all, PushSql.forget_all):
                    q = Q(sql)
                    await _exec(conn, q.text, q.args(username, domain))
            elif devices:
                for table in (ledger.DEVICE_TABLE, push_targets.PUSH_TABLE):
                    await _exec(
                        conn,
                        f"DELETE FROM {table} WHERE username = %s AND domain = %s "
                        f"AND device IN ({my.in_list(len(devices))})",
                        [username, domain, *devices],
                    )
            gone = await _fetch(conn, complete.text, complete.args(username, domain, memory))
            return await self._delete_messages(conn, [int(r[0]) for r in gone])

        return await self._run("forget devices", run, transaction=True)

    async def remembered_devices(self, username: str, domain: str, *, since: int) -> list[str]:
        """The owner's devices registered at ``since`` or later."""
        q = Q(self._ledger.remembered)

        async def run(conn: Conn) -> list[str]:
            return [str(r[0]) for r in await _fetch(conn, q.text, q.args(username, domain, since))]

        return await self._run("devices", run, idempotent=True)

    async def forget_old_devices(self, before: int) -> int:
        """Forget devices not registered since ``before``; drop orphan ledger rows."""
        old = Q(self._ledger.forget_old)

        old_push = Q(PushSql.forget_old)

        async def run(conn: Conn) -> int:
            n = await _exec(conn, old.text, old.args(before))
            await _exec(conn, old_push.text, old_push.args(before))
            await _exec(conn, self._ledger.orphans)
            return n

        return await self._run("forget devices", run, idempotent=True)

    # -- push targets (RFC 8599) ------------------------------------------------------

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
        check_text("device", device, my.KEY_TEXT_LIMIT)
        # pushed_ms is assigned first, from the old prid (MySQL assigns in order): a new
        # token starts a new window.
        sql = (
            f"INSERT INTO {push_targets.PUSH_TABLE} (username, domain, device, provider, prid, "
            "param, last_register) VALUES (%s, %s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
            "pushed_ms = IF(prid = VALUES(prid), pushed_ms, NULL), provider = VALUES(provider), "
            "prid = VALUES(prid), param = VALUES(param), last_register = VALUES(last_register)"
        )
        args = (username, domain, device, provider, prid, param, now)

        async def run(conn: Conn) -> int:
            return await _exec(conn, sql, args)

        await self._run("save push target", run, idempotent=True)

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
        """Take the owner's push targets that may be pushed now (marked pushed).

        The candidates are locked (FOR UPDATE): a concurrent claimer waits, then reads the
        rows as committed (a locking read sees the newest version) and finds them pushed.
        """
        if not owner_storable(username, domain):
            return []
        table = push_targets.PUSH_TABLE
        skip = list(dict.fromkeys(exclude))
        not_in = f" AND device NOT IN ({my.in_list(len(skip))})" if skip else ""
        pick = (
            f"SELECT device, provider, prid, param FROM {table} WHERE username = %s "
            f"AND domain = %s AND last_register >= %s AND (pushed_ms IS NULL OR pushed_ms <= %s)"
            f"{not_in} ORDER BY device FOR UPDATE"
        )
        args = [username, domain, since, now_ms - window_ms, *skip]
        count = self._q_count

        async def run(conn: Conn) -> list[PushRecord]:
            taken = await _fetch(conn, pick, args)
            if not taken:
                return []
            devices = [r[0] for r in taken]
            await _exec(
                conn,
                f"UPDATE {table} SET pushed_ms = %s WHERE username = %s AND domain = %s "
                f"AND device IN ({my.in_list(len(devices))})",
                [now_ms, username, domain, *devices],
            )
            waiting = int((await _fetch(conn, count.text, count.args(username, domain)))[0][0])
            return [PushRecord(r[0], r[1], r[2], r[3], waiting) for r in taken]

        return await self._run("claim push targets", run, transaction=True)

    async def drop_push_target(self, username: str, domain: str, device: str, *, prid: str) -> bool:
        """Forget a device's dead push token (unless it registered another meanwhile)."""
        q = Q(PushSql.drop)
        return await self._execute("drop push target", q, username, domain, device, prid) > 0

    async def take_push_time(self, username: str, domain: str, device: str) -> int | None:
        """When the device was last pushed (ms), cleared; None when none is outstanding."""
        read, clear = Q(PushSql.pushed_at), Q(PushSql.clear_pushed)

        async def run(conn: Conn) -> int | None:
            rows = await _fetch(conn, read.text, read.args(username, domain, device))
            if not rows:
                return None
            at = int(rows[0][0])
            taken = await _exec(conn, clear.text, clear.args(username, domain, device, at))
            return at if taken else None

        return await self._run("push time", run)

    async def _by_mids(self, what: str, verb: str, mids: Sequence[int], *pre: Any) -> int:
        ids = my.mids_args(mids)
        if not ids:
            return 0
        s = self._sql

        async def run(conn: Conn) -> int:
            n = 0
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                n += await _exec(
                    conn, f"{verb} WHERE {s.mid} IN ({my.in_list(len(chunk))})", [*pre, *chunk]
                )
            return n

        return await self._run(what, run, idempotent=True)

    async def delete_delivered(self, mids: Sequence[int]) -> int:
        """Delete delivered rows (one at a time: concurrent deliveries share one DELETE)."""
        if len(mids) == 1:
            return int(await self._deletes.get(int(mids[0])))
        return await self._by_mids("delete delivered", f"DELETE FROM {self._sql.table}", mids)

    async def _delete_many(self, mids: list[int]) -> dict[int, bool]:
        s = self._sql
        marks = my.in_list(len(mids))

        async def run(conn: Conn) -> dict[int, bool]:
            # The rows that exist, locked to the commit: exactly the ones the DELETE takes, so
            # each caller learns whether its own row went.
            found = await _fetch(
                conn,
                f"SELECT {s.mid} FROM {s.table} WHERE {s.mid} IN ({marks}) FOR UPDATE",
                mids,
            )
            await _exec(conn, f"DELETE FROM {s.table} WHERE {s.mid} IN ({marks})", mids)
            return {int(r[0]): True for r in found}

        return await self._run("delete delivered", run, transaction=True, idempotent=True)

    async def release_lease(self, mids: Sequence[int], *, failed: bool = True) -> int:
        """Clear leases; ``failed`` counts an attempt."""
        return await self._by_mids(
            "release lease",
            f"UPDATE {self._sql.table} SET lease_until = NULL, lease_owner = NULL, "
            f"attempts = attempts + %s",
            mids,
            1 if failed else 0,
        )

    async def reset_reminder(self, mids: Sequence[int]) -> int:
        """Failed reminders become ordinary offline messages."""
        return await self._by_mids(
            "reset reminder",
            f"UPDATE {self._sql.table} SET {self._sql.snd_time} = 0, lease_until = NULL, "
            f"lease_owner = NULL",
            mids,
        )

    async def _execute(self, what: str, q: Q, *values: Any, idempotent: bool = True) -> int:
        args = q.args(*values)

        async def run(conn: Conn) -> int:
            return await _exec(conn, q.text, args)

        return await self._run(what, run, idempotent=idempotent)

    async def recover_expired_leases(self, now: int) -> int:
        """Clear leases past their deadline."""
        return await self._execute("recover leases", self._q_recover, now)

    async def delete_expired(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` expired rows."""
        return await self._execute("delete expired", self._q_expire, now, limit)

    async def take_expired(self, now: int, limit: int) -> list[StoredMessage]:
        """Delete up to ``limit`` expired rows and return them."""
        q = self._q_take_expired

        async def run(conn: Conn) -> list[StoredMessage]:
            rows = [_row(r) for r in await _fetch(conn, q.text, q.args(now, limit))]
            await self._delete_messages(conn, [m.mid for m in rows])
            return rows

        rows = await self._run("take expired", run, transaction=True)
        rows.sort(key=lambda m: m.mid)
        return rows

    async def purge(self, username: str, domain: str) -> int:
        """Delete every row of the owner."""
        if not owner_storable(username, domain):
            return 0
        return await self._execute("purge", self._q_purge, username, domain)

    # -- registrar bindings ---------------------------------------------------------

    async def update_bindings(
        self, username: str, domain: str, plan: PlanFunction, *, now: int
    ) -> BindingsOutcome:
        """Apply a registrar plan in one transaction holding the user's lock row, so
        concurrent REGISTERs for the user on any worker or host queue."""
        validate_owner(username, domain)
        sql = {k: Q(v) for k, v in self._location.items()}
        upsert = self._location_upsert()

        async def run(conn: Conn) -> BindingsOutcome:
            await self._lock(conn, [my.location_slot(username, domain)])
            rows = await _fetch(conn, sql["select_all"].text, (username, domain))
            current = [binding_from_row(r) for r in rows]
            change = plan(current)
            if change.error is not None:
                return BindingsOutcome(error=change.error)
            for binding in change.upserts:
                validate_binding(binding)  # raised inside the transaction: it rolls back
                check_text("contact", binding.contact, my.KEY_TEXT_LIMIT)
            for contact in change.removes:
                q = sql["delete_one"]
                await _exec(conn, q.text, q.args(username, domain, contact))
            for binding in change.upserts:
                await _exec(conn, upsert, binding_row(binding))
            live = await _fetch(conn, sql["select_live"].text, (username, domain, now))
            return BindingsOutcome(bindings=tuple(binding_from_row(r) for r in live))

        return await self._run("register", run, transaction=True)

    @staticmethod
    def _location_upsert() -> str:
        from msilo.storage.location import COLUMNS

        cols = [c.strip() for c in COLUMNS.split(",")]
        updates = ", ".join(f"{c} = VALUES({c})" for c in cols[3:])
        return (
            f"INSERT INTO location ({COLUMNS}) VALUES ({my.in_list(len(cols))}) "
            f"ON DUPLICATE KEY UPDATE {updates}"
        )

    async def lookup_bindings(self, username: str, domain: str, *, now: int) -> list[Binding]:
        """The user's live bindings, best q first (concurrent lookups share one query)."""
        if not owner_storable(username, domain):
            return []
        return list(await self._lookups.get((username, domain, now)))

    async def _lookup_many(
        self, keys: list[tuple[str, str, int]]
    ) -> dict[tuple[str, str, int], tuple[Binding, ...]]:
        sql = self._q_lookup_many
        wanted = orjson.dumps(keys).decode()

        async def run(conn: Conn) -> list[tuple[Any, ...]]:
            return await _fetch(conn, sql, (wanted,))

        found: dict[tuple[str, str, int], list[Binding]] = {}
        # Rows arrive in the query's order (best q first), so each user's list keeps it.
        for row in await self._run("lookup", run, idempotent=True):
            found.setdefault((row[0], row[1], int(row[13])), []).append(binding_from_row(row))
        return {key: tuple(bindings) for key, bindings in found.items()}

    async def delete_expired_bindings(self, now: int) -> int:
        """Delete bindings past their expiry."""
        return await self._execute("expire bindings", Q(self._location["delete_expired"]), now)

    # -- digest credentials and nonce counts ----------------------------------------

    async def get_subscriber(self, username: str, domain: str) -> Subscriber | None:
        """The user's credentials, or None."""
        if not owner_storable(username, domain):
            return None
        q = Q(subscriber.SELECT_SUBSCRIBER)

        async def run(conn: Conn) -> Subscriber | None:
            rows = await _fetch(conn, q.text, q.args(username, domain))
            return subscriber.subscriber_from_row(rows[0]) if rows else None

        return await self._run("get subscriber", run, idempotent=True)

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
        q = Q(
            subscriber.INSERT_SUBSCRIBER
            + " ON DUPLICATE KEY UPDATE password = VALUES(password), ha1 = VALUES(ha1), "
            "ha1_sha256 = VALUES(ha1_sha256), ha1_sha512t256 = VALUES(ha1_sha512t256)"
        )
        args = q.args(
            sub.username, sub.domain, sub.password, sub.ha1, sub.ha1_sha256, sub.ha1_sha512t256
        )

        async def run(conn: Conn) -> bool:
            # Affected rows: 1 inserted, 2 updated, 0 the same credentials were there.
            return await _exec(conn, q.text, args) == 1

        return await self._run("set subscriber", run, idempotent=True)

    async def remove_subscriber(self, username: str, domain: str) -> bool:
        """Delete the subscriber; False when there was none."""
        if not owner_storable(username, domain):
            return False
        return (
            await self._execute(
                "remove subscriber", Q(subscriber.DELETE_SUBSCRIBER), username, domain
            )
            > 0
        )

    async def use_nonce(self, nonce: str, nc: int, *, expires: int) -> bool:
        """Record ``nc`` for ``nonce`` if it increases; False for a replay.

        The upsert locks the row, so two equal counts racing on two hosts cannot both be
        accepted; affected rows are 1 (new nonce) or 2 (higher count), 0 for a replay.
        """
        validate_nonce(nonce, nc)
        q = Q(
            f"INSERT INTO {subscriber.NONCE_TABLE} (nonce, nc, expires) VALUES ({{0}}, {{1}}, "
            f"{{2}}) ON DUPLICATE KEY UPDATE nc = IF(nc < VALUES(nc), VALUES(nc), nc)"
        )
        return await self._execute("use nonce", q, nonce, nc, expires, idempotent=False) > 0

    async def delete_expired_nonces(self, now: int) -> int:
        """Forget the counts of expired nonces."""
        return await self._execute("expire nonces", Q(subscriber.DELETE_EXPIRED_NONCES), now)

    async def count_auth_failures(
        self, source: str, identity: str, *, now: int, window: int
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """One more failure for each key: (count in the window, window end) per key."""
        validate_auth_keys(source, identity)
        table = subscriber.AUTH_FAIL_TABLE
        # failures is assigned first, from the old window_end (MySQL assigns in order).
        upsert = (
            f"INSERT INTO {table} (who, failures, window_end) VALUES (%s, 1, %s), (%s, 1, %s) "
            f"ON DUPLICATE KEY UPDATE failures = IF(window_end <= %s, 1, failures + 1), "
            f"window_end = IF(window_end <= %s, VALUES(window_end), window_end)"
        )
        end = now + window

        async def run(conn: Conn) -> tuple[tuple[int, int], tuple[int, int]]:
            await _exec(conn, upsert, (source, end, identity, end, now, now))
            rows = await _fetch(
                conn,
                f"SELECT who, failures, window_end FROM {table} WHERE who IN (%s, %s)",
                (source, identity),
            )
            got = {str(r[0]): (int(r[1]), int(r[2])) for r in rows}
            return got[source], got[identity]

        # Not retried on a lost connection: a first attempt that committed would count twice.
        return await self._run("count auth failures", run, transaction=True)

    async def forgive_auth_failures(self, source: str, identity: str, *, now: int) -> None:
        """Take back one failure of each key."""
        validate_auth_keys(source, identity)
        await self._execute(
            "forgive auth failures",
            Q(subscriber.FORGIVE_AUTH_FAILURES),
            source,
            identity,
            now,
            idempotent=False,
        )

    async def delete_expired_auth_failures(self, now: int) -> int:
        """Forget ended failure windows."""
        return await self._execute(
            "expire auth failures", Q(subscriber.DELETE_EXPIRED_AUTH_FAILURES), now
        )

    # -- operations --------------------------------------------------------------------

    async def count(self, username: str, domain: str) -> int:
        """Rows of the owner."""
        if not owner_storable(username, domain):
            return 0
        q = self._q_count

        async def run(conn: Conn) -> int:
            return int((await _fetch(conn, q.text, q.args(username, domain)))[0][0])

        return await self._run("count", run, idempotent=True)

    async def list_page(
        self, username: str, domain: str, limit: int | None, offset: int = 0
    ) -> list[StoredMessage]:
        """Rows of the owner in arrival order, ``limit`` (None: all) from ``offset``."""
        if not owner_storable(username, domain):
            return []
        q = self._q_list
        sql = q.text + " LIMIT %s OFFSET %s"
        args = (*q.args(username, domain), _NO_LIMIT if limit is None else limit, offset)

        async def run(conn: Conn) -> list[StoredMessage]:
            return [_row(r) for r in await _fetch(conn, sql, args)]

        return await self._run("list", run, idempotent=True)

    async def silo_summary(self) -> SiloSummary:
        """Row count, and the arrival time of the row that expires first (expiry index)."""
        s = self._sql
        sql = (
            f"SELECT (SELECT count(*) FROM {s.table}), "
            f"(SELECT {s.inc_time} FROM {s.table} ORDER BY {s.exp_time} LIMIT 1)"
        )

        async def run(conn: Conn) -> SiloSummary:
            row = (await _fetch(conn, sql))[0]
            return SiloSummary(int(row[0]), int(row[1]) if row[1] is not None else None)

        return await self._run("summary", run, idempotent=True)

    async def list(self, username: str, domain: str) -> list[StoredMessage]:
        """Rows of the owner in arrival order."""
        return await self.list_page(username, domain, None)
