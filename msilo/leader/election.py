"""Leader election: exactly one process per deployment runs the timer cycles.

Two implementations share one loop (:meth:`LeaderElection.run`):

* :class:`PostgresLeaderElection` -- a session-level ``pg_try_advisory_lock`` held on a
  **dedicated** asyncpg connection.  Never a pooled one: the pool's reset query runs
  ``pg_advisory_unlock_all()`` on release and would drop the lock silently.  Losing the
  connection is losing leadership, detected by asyncpg's termination listener and by a cheap
  ``SELECT 1`` every ``retry_interval`` (a half-open TCP connection reports nothing).
* :class:`MySQLLeaderElection` -- ``GET_LOCK`` on a dedicated connection: a named lock the
  server releases when the session ends (the holder died, its host vanished, the server
  restarted), checked like the PostgreSQL one with a ``SELECT`` every ``retry_interval``.
* :class:`FileLeaderElection` -- SQLite deployments on one host: an exclusive non-blocking
  ``flock`` on a lock file beside the database; the kernel releases it when the holder dies.

State changes are logged on ``msilo.leader`` as one ``key=value`` line each; retries are not.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from msilo.errors import ConfigError, DatabaseUnavailable
from msilo.log import redact_url

__all__ = [
    "FileLeaderElection",
    "LeaderElection",
    "MySQLLeaderElection",
    "PostgresLeaderElection",
    "advisory_lock_key",
    "leader_election_for",
]

log = logging.getLogger("msilo.leader")

Callback = Callable[[], Awaitable[None]]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class LeaderElection(abc.ABC):
    """Compete for the deployment-wide leader lock; hold it until lost or stopped.

    Subclasses provide the lock primitives; this class owns the state machine, the
    callbacks and the logging.  An election that was stopped stays stopped.
    """

    def __init__(self, *, retry_interval: float = 2.0, rejoin_delay: float | None = None) -> None:
        if retry_interval <= 0:
            raise ValueError(f"retry_interval is expected to be > 0 (got {retry_interval!r})")
        self.retry_interval = retry_interval
        # A process that just lost the lock is the suspect one (its connection or host
        # failed); waiting a little longer than a standby's poll lets a healthy standby win.
        self.rejoin_delay = 2 * retry_interval if rejoin_delay is None else rejoin_delay
        self.host = socket.gethostname()
        self._is_leader = False
        self._elected_at: float | None = None
        self._lost = asyncio.Event()
        self._lost.set()  # not leader yet: waiting for loss returns at once
        self._elected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running = False
        self._run_task: asyncio.Task[Any] | None = None
        self._done = asyncio.Event()
        self._done.set()
        self._state: tuple[str, str] | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """This process's id (read each time: the object may predate a fork)."""
        return os.getpid()

    @property
    def is_leader(self) -> bool:
        """True while this process holds the leader lock."""
        return self._is_leader

    @property
    def lost(self) -> asyncio.Event:
        """Event of the current (or last) term: set the moment leadership is lost.

        A new event is created at each election, so one captured at election time stays
        set once that term is over.
        """
        return self._lost

    async def wait_lost(self) -> None:
        """Return when the current term ends (at once when not leader)."""
        await self._lost.wait()

    async def wait_elected(self) -> None:
        """Return when this process is leader (at once when it already is)."""
        await self._elected.wait()

    def holder_info(self) -> dict[str, Any]:
        """What this process knows about itself, for ``/health``."""
        return {
            "host": self.host,
            "pid": self.pid,
            "is_leader": self._is_leader,
            "since": self._elected_at,
            "lock": self.describe(),
        }

    @abc.abstractmethod
    def describe(self) -> str:
        """The lock as ``key=value`` text for log lines (``key=…`` or ``path=…``)."""

    @abc.abstractmethod
    async def current_leader(self) -> dict[str, Any] | None:
        """Who holds the lock right now (``host``, ``pid``, ...), or None if nobody.

        Works from any process, whether or not it runs this election.
        """

    async def run(
        self,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
    ) -> None:
        """Compete for the lock until :meth:`stop`; call back on each election and loss.

        ``on_elected`` is awaited right after the lock is taken and should only start the
        work (spawn tasks), not run it.  ``on_lost`` is awaited after ``is_leader`` turns
        False and before the lock is released on a clean stop, so work stops before another
        process can start it.  Exceptions from the callbacks propagate (after the lock is
        released); database trouble never does: it only sends the process to standby.
        """
        if self._running:
            raise RuntimeError("LeaderElection.run() is already running")
        if self._stopping.is_set():
            return
        self._running = True
        self._run_task = asyncio.current_task()
        self._done.clear()
        reason = "stopped"
        try:
            await self._loop(on_elected, on_lost)
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        except BaseException as exc:
            reason = f"error={type(exc).__name__}"
            raise
        finally:
            try:
                if self._is_leader:
                    # Work stops (on_lost) before the lock is released, so no other
                    # process starts it while ours is still running.
                    self._step_down()
                    self._log_state("leader_lost", reason, logging.INFO)
                    if on_lost is not None:
                        await on_lost()
            finally:
                try:
                    await self._release(abort=False)
                finally:
                    self._running = False
                    self._run_task = None
                    self._done.set()
                    if self._stopping.is_set():
                        self._log_state("stopped", "", logging.INFO)

    async def stop(self) -> None:
        """Stop competing: end the term (``on_lost``), release the lock, close resources."""
        self._stopping.set()
        if self._running:
            # Called from a callback inside run(): run() finishes the job on its way out.
            if asyncio.current_task() is self._run_task:
                return
            await self._done.wait()
        else:
            await self._release(abort=False)

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self, on_elected: Callback | None, on_lost: Callback | None) -> None:
        delay = 0.0
        while not self._stopping.is_set():
            if delay and await self._sleep(delay):
                return
            delay = self.retry_interval
            try:
                acquired = await self._acquire_unless_stopped()
            except DatabaseUnavailable as exc:
                self._log_state("standby", f"unavailable error={exc}", logging.WARNING)
                await self._release(abort=True)
                continue
            if not acquired:
                self._log_state("standby", "lock_held", logging.INFO)
                continue
            if self._stopping.is_set():
                return  # run()'s cleanup releases anything we just took
            self._is_leader = True
            self._elected_at = time.time()
            self._lost = asyncio.Event()
            self._elected.set()
            self._log_state("leader_elected", "", logging.INFO)
            if on_elected is not None:
                await on_elected()
            reason = await self._watch()
            if reason is None:
                return  # stopping; run()'s cleanup ends the term in order
            self._step_down()
            self._log_state("leader_lost", reason, logging.WARNING)
            # Stop the work first: after a liveness timeout the server may still hold our
            # lock until it notices, and closing a half-open socket can take a while.
            if on_lost is not None:
                await on_lost()
            await self._release(abort=True)
            delay = self.rejoin_delay

    async def _acquire_unless_stopped(self) -> bool:
        """``_try_acquire``, abandoned the moment stop() is called.

        Connecting to an unreachable database can take connect_timeout; a shutdown should
        not wait for it.
        """
        acquire = asyncio.ensure_future(self._try_acquire())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not acquire.done():
                acquire.cancel()
                # wait() rather than await: a cancellation of run() itself stays visible.
                await asyncio.wait({acquire})
                if not acquire.cancelled():
                    acquire.exception()  # retrieved, so asyncio does not report it
                # A statement cut short leaves the session in doubt: drop it.
                await self._release(abort=True)
        return acquire.result() if not acquire.cancelled() else False

    def _step_down(self) -> None:
        self._is_leader = False
        self._elected_at = None
        self._elected.clear()
        self._lost.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True if stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def _log_state(self, event: str, reason: str, level: int) -> None:
        # One line per state change: a standby polling every retry_interval logs once,
        # again only if the reason changes (lock held ↔ database unavailable).
        state = (event, reason)
        if state == self._state and event == "standby":
            return
        self._state = state
        extra = f" reason={reason}" if reason else ""
        # The log formatter already stamps pid=; the host is what it lacks.
        log.log(level, "event=%s%s %s host=%s", event, extra, self.describe(), self.host)

    # -- primitives -------------------------------------------------------------------------

    @abc.abstractmethod
    async def _try_acquire(self) -> bool:
        """Take the lock without waiting; raise DatabaseUnavailable on backend trouble."""

    @abc.abstractmethod
    async def _watch(self) -> str | None:
        """While leader: return the reason leadership was lost, or None on stop."""

    @abc.abstractmethod
    async def _release(self, *, abort: bool) -> None:
        """Release the lock (if held) and close every resource; never raises.

        ``abort``: the resource is suspect, drop it without a graceful goodbye.
        """


# -- PostgreSQL -------------------------------------------------------------------------------


def advisory_lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (same in every process).

    Python's ``hash()`` is randomized per process, so it cannot be shared across hosts.
    """
    digest = hashlib.blake2b(b"msilo.leader:" + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# Take the lock and, in the same statement, advertise ourselves: nobody can see the lock
# held under a standby's name.  CASE evaluates its branches in order.
_ACQUIRE_SQL = """
SELECT CASE WHEN pg_try_advisory_lock($1::bigint)
            THEN set_config('application_name', $2::text, false) IS NOT NULL
            ELSE false END
"""

# A bigint advisory lock shows in pg_locks as classid = high 32 bits, objid = low 32 bits,
# objsubid = 1, in the database it was taken in.
_HOLDER_SQL = """
SELECT a.pid AS backend_pid, a.application_name, host(a.client_addr) AS client_addr
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid AND l.objsubid = 1
LIMIT 1
"""

_APPNAME_RE = re.compile(r"host=(?P<host>\S+) pid=(?P<pid>\d+)")

# The server side of the same problem as our liveness check: if the leader's host vanishes,
# the backend keeps the lock until TCP keepalive gives up (2 h by default on Linux).  These
# session settings make it give up in ~20 s; the leader itself steps down much sooner
# (retry_interval + check_timeout), so the two never overlap.  Ignored on Unix sockets.
_KEEPALIVE_SETTINGS = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "3",
    "tcp_keepalives_count": "3",
}

# InternalClientError: TargetServerAttributeNotMatched -- a multi-host db_url whose hosts
# are all standbys for the moment (a failover under way).
_PG_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class PostgresLeaderElection(LeaderElection):
    """Leader lock = a session advisory lock on a dedicated (non-pooled) connection.

    Advisory locks are per database: the lock is shared by every process connected to the
    same database with the same ``lock_key`` (an int, or a name hashed by
    :func:`advisory_lock_key`).  The holder's connection is named
    ``msilo-leader host=… pid=…`` in ``pg_stat_activity``; standbys' ``msilo-standby …``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        lock_key: int | str = "msilo",
        retry_interval: float = 2.0,
        rejoin_delay: float | None = None,
        connect_timeout: float = 5.0,
        check_timeout: float = 2.0,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(retry_interval=retry_interval, rejoin_delay=rejoin_delay)
        if isinstance(lock_key, str):
            self.lock_key = advisory_lock_key(lock_key)
        elif isinstance(lock_key, int) and _INT64_MIN <= lock_key <= _INT64_MAX:
            self.lock_key = lock_key
        else:
            raise ValueError(f"lock_key is expected to be a str or a 64-bit int ({lock_key!r})")
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.check_timeout = check_timeout
        self._server_settings = {**_KEEPALIVE_SETTINGS, **(server_settings or {})}
        self._conn: asyncpg.Connection | None = None
        self._terminated = asyncio.Event()

    def describe(self) -> str:
        return f"key={self.lock_key}"

    def _name(self, role: str) -> str:
        # application_name is cut at 63 bytes by the server; host and pid come first.
        return f"msilo-{role} host={self.host} pid={self.pid}"

    async def _connect(self) -> asyncpg.Connection:
        try:
            conn = await asyncpg.connect(
                self.dsn,
                timeout=self.connect_timeout,
                server_settings={
                    **self._server_settings,
                    "application_name": self._name("standby"),
                },
            )
        except _PG_ERRORS as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        terminated = asyncio.Event()
        # Called by asyncpg when the socket closes, even while the connection is idle:
        # the fastest notice of a terminated backend or a restarted server.
        conn.add_termination_listener(lambda _conn: terminated.set())
        self._terminated = terminated
        return conn

    async def _try_acquire(self) -> bool:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
        try:
            got = await self._conn.fetchval(
                _ACQUIRE_SQL, self.lock_key, self._name("leader"), timeout=self.check_timeout
            )
        except _PG_ERRORS as exc:
            # If the statement timed out after taking the lock, closing the connection
            # (done by the caller) gives it back.
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return bool(got)

    async def _watch(self) -> str | None:
        conn = self._conn
        assert conn is not None
        terminated = self._terminated
        while True:
            stop = asyncio.ensure_future(self._stopping.wait())
            term = asyncio.ensure_future(terminated.wait())
            try:
                await asyncio.wait(
                    {stop, term}, timeout=self.retry_interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stop.cancel()
                term.cancel()
            if self._stopping.is_set():
                return None
            if terminated.is_set():
                return "connection_terminated"
            try:
                await conn.fetchval("SELECT 1", timeout=self.check_timeout)
            except TimeoutError:
                return "liveness_timeout"
            except _PG_ERRORS as exc:
                if terminated.is_set() or conn.is_closed():
                    return "connection_terminated"
                return f"liveness_failed error={type(exc).__name__}"

    async def _release(self, *, abort: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        if abort:
            conn.terminate()
        else:
            # Ending the session releases its advisory locks, so no explicit unlock; a
            # graceful close tells the server at once instead of at its next read.
            await _close_quietly(conn, self.check_timeout)

    async def current_leader(self) -> dict[str, Any] | None:
        """Who holds ``lock_key`` in this database (opens a short-lived connection).

        Returns ``host`` and ``pid`` of the holder process (from its application_name),
        its ``backend_pid`` and ``client_addr``; None if the lock is free.
        """
        unsigned = self.lock_key & 0xFFFFFFFFFFFFFFFF
        try:
            conn = await asyncpg.connect(
                self.dsn,
                timeout=self.connect_timeout,
                server_settings={"application_name": "msilo-leader-query"},
            )
        except _PG_ERRORS as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        try:
            row = await conn.fetchrow(
                _HOLDER_SQL, unsigned >> 32, unsigned & 0xFFFFFFFF, timeout=self.check_timeout
            )
        except _PG_ERRORS as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        finally:
            await _close_quietly(conn, self.check_timeout)
        if row is None:
            return None
        match = _APPNAME_RE.search(row["application_name"] or "")
        return {
            "host": match["host"] if match else None,
            "pid": int(match["pid"]) if match else None,
            "backend_pid": row["backend_pid"],
            "client_addr": row["client_addr"],
            "lock": self.describe(),
        }


async def _close_quietly(conn: asyncpg.Connection, timeout: float) -> None:
    try:
        await conn.close(timeout=timeout)
    except _PG_ERRORS:
        # close() has already aborted the socket; the session ends with it.
        conn.terminate()
    except asyncio.CancelledError:
        conn.terminate()
        raise


# -- MySQL / MariaDB --------------------------------------------------------------------------


class MySQLLeaderElection(LeaderElection):
    """Leader lock = ``GET_LOCK(name, 0)`` on a dedicated connection (never a pooled one: a
    lock belongs to its session, and the store's pool closes connections that saw errors).

    ``GET_LOCK`` names are server-wide, not per database: the name hashes the database and
    ``lock_key``, so two deployments on one server do not exclude each other.  The holder
    notes its host and pid (and connection id) in ``msilo_leader``; :meth:`current_leader`
    trusts that note only while ``IS_USED_LOCK`` names the same connection.
    """

    def __init__(
        self,
        url: str,
        *,
        lock_key: int | str = "msilo",
        retry_interval: float = 2.0,
        rejoin_delay: float | None = None,
        connect_timeout: float = 5.0,
        check_timeout: float = 2.0,
    ) -> None:
        from msilo.storage.myurl import parse_my_url

        super().__init__(retry_interval=retry_interval, rejoin_delay=rejoin_delay)
        self.url = url
        self._url = parse_my_url(url)
        digest = hashlib.blake2b(
            f"msilo.leader:{self._url.database}:{lock_key}".encode(), digest_size=12
        ).hexdigest()
        # At most 64 characters (MySQL's limit for lock names).
        self.lock_name = f"msilo-leader-{digest}"
        self.connect_timeout = connect_timeout
        self.check_timeout = check_timeout
        self._conn: Any = None

    def describe(self) -> str:
        return f"name={self.lock_name}"

    async def _connect(self) -> Any:
        import asyncmy

        u = self._url
        kwargs: dict[str, Any] = {
            "user": u.user, "password": u.password, "database": u.database,
            "autocommit": True, "charset": "utf8mb4", "connect_timeout": self.connect_timeout,
        }  # fmt: skip
        if u.unix_socket:
            kwargs["unix_socket"] = u.unix_socket
        else:
            kwargs["host"], kwargs["port"] = u.host, u.port
        try:
            return await asyncio.wait_for(asyncmy.connect(**kwargs), self.connect_timeout + 1)
        except _MY_ERRORS as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc

    async def _query(self, conn: Any, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        async def run() -> list[Any]:
            async with conn.cursor() as cur:
                await cur.execute(sql, args or None)
                return list(await cur.fetchall() or ())

        return await asyncio.wait_for(run(), self.check_timeout)

    async def _try_acquire(self) -> bool:
        if self._conn is None:
            self._conn = await self._connect()
        try:
            rows = await self._query(self._conn, "SELECT GET_LOCK(%s, 0)", (self.lock_name,))
            if not rows or rows[0][0] != 1:
                return False
            await self._note(self._conn)
        except _MY_ERRORS as exc:
            # If the statement timed out after taking the lock, closing the connection
            # (done by the caller) gives it back.
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return True

    async def _note(self, conn: Any) -> None:
        """Write who holds the lock (for ``/health`` and ``db upgrade``'s guard)."""
        try:
            await self._query(
                conn,
                "REPLACE INTO msilo_leader (lock_name, conn_id, host, pid, since) "
                "VALUES (%s, CONNECTION_ID(), %s, %s, %s)",
                (self.lock_name, self.host, self.pid, time.time()),
            )
        except _MY_ERRORS as exc:
            if _my_code(exc) != 1146:  # no table yet (the schema comes later): no note
                raise

    async def _watch(self) -> str | None:
        conn = self._conn
        assert conn is not None
        while True:
            if await self._sleep(self.retry_interval):
                return None
            try:
                rows = await self._query(conn, "SELECT IS_USED_LOCK(%s) = CONNECTION_ID()",
                                         (self.lock_name,))  # fmt: skip
            except TimeoutError:
                return "liveness_timeout"
            except _MY_ERRORS as exc:
                return f"connection_terminated error={type(exc).__name__}"
            if not rows or rows[0][0] != 1:
                return "lock_lost"

    async def _release(self, *, abort: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not abort:
            # Ending the session releases the lock; a graceful close tells the server now.
            try:
                await asyncio.wait_for(conn.ensure_closed(), self.check_timeout)
                return
            except _MY_ERRORS:
                pass
            except asyncio.CancelledError:
                conn.close()
                raise
        conn.close()

    async def current_leader(self) -> dict[str, Any] | None:
        """Who holds the lock on this server and database (a short-lived connection):
        ``host`` and ``pid`` from the holder's note, ``conn_id``; None if the lock is free."""
        conn = await self._connect()
        try:
            rows = await self._query(conn, "SELECT IS_USED_LOCK(%s)", (self.lock_name,))
            holder = rows[0][0] if rows else None
            if holder is None:
                return None
            note: list[Any] = []
            try:
                note = await self._query(
                    conn,
                    "SELECT host, pid FROM msilo_leader WHERE lock_name = %s AND conn_id = %s",
                    (self.lock_name, holder),
                )
            except _MY_ERRORS as exc:
                if _my_code(exc) != 1146:
                    raise
        except _MY_ERRORS as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        finally:
            # QUIT, not a dropped socket: the server would log an aborted connection for
            # every health check (every 2 s).
            try:
                await asyncio.wait_for(conn.ensure_closed(), self.check_timeout)
            except _MY_ERRORS:
                conn.close()
            except asyncio.CancelledError:
                conn.close()
                raise
        return {
            "host": note[0][0] if note else None,
            "pid": int(note[0][1]) if note else None,
            "conn_id": int(holder),
            "lock": self.describe(),
        }


def _my_code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _my_errors() -> tuple[type[BaseException], ...]:
    try:
        import asyncmy.errors
    except ImportError:  # pragma: no cover - asyncmy is a dependency
        return (OSError, TimeoutError)
    return (OSError, TimeoutError, asyncmy.errors.MySQLError)


_MY_ERRORS = _my_errors()


# -- lock file --------------------------------------------------------------------------------


class FileLeaderElection(LeaderElection):
    """Leader lock = an exclusive ``flock`` on ``path`` (one host only: not over NFS).

    The holder writes ``host=… pid=… since=…`` into the file for :meth:`current_leader`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retry_interval: float = 2.0,
        rejoin_delay: float | None = None,
    ) -> None:
        super().__init__(retry_interval=retry_interval, rejoin_delay=rejoin_delay)
        self.path = os.fspath(path)
        self._fd: int | None = None

    def describe(self) -> str:
        return f"path={self.path}"

    async def _try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise DatabaseUnavailable(type(exc).__name__) from exc
        # The file may have been unlinked or replaced between open() and flock(); a lock on
        # an orphaned inode excludes nobody, so only a lock on what the path names counts.
        if not self._still_ours(fd):
            os.close(fd)
            return False
        self._fd = fd
        info = f"host={self.host} pid={self.pid} since={time.time():.3f}\n".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass  # the lock is what matters; the note is only for /health
        return True

    def _still_ours(self, fd: int) -> bool:
        try:
            held, named = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    async def _watch(self) -> str | None:
        # The kernel never takes a flock away from a live process; the only way to lose it
        # is someone deleting or replacing the file, which lets a newcomer lock a new inode.
        while not await self._sleep(self.retry_interval):
            if self._fd is None or not self._still_ours(self._fd):
                return "lock_file_replaced"
        return None

    async def _release(self, *, abort: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if self._still_ours(fd):
                os.ftruncate(fd, 0)  # no stale note once the lock is free
        os.close(fd)  # closing the last descriptor releases the flock

    async def current_leader(self) -> dict[str, Any] | None:
        """Who holds the lock file (from the note the holder wrote), or None if nobody."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                # A shared lock succeeds only if no one holds the exclusive one.  flock locks
                # belong to the open file, so this also works inside the leader process.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 512, 0).decode(errors="replace")
            else:
                return None
        finally:
            os.close(fd)
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
        pid = fields.get("pid", "")
        since = fields.get("since", "")
        return {
            "host": fields.get("host"),
            "pid": int(pid) if pid.isdigit() else None,
            "since": float(since) if re.fullmatch(r"\d+(\.\d+)?", since) else None,
            "lock": self.describe(),
        }


# -- choice by URL ----------------------------------------------------------------------------


def leader_election_for(db_url: str, **options: Any) -> LeaderElection:
    """The election that fits ``db_url``: a lock file beside SQLite, an advisory lock on
    PostgreSQL, ``GET_LOCK`` on MySQL/MariaDB.

    ``options`` go to the chosen class; ``lock_key`` is ignored for SQLite (the lock file
    ``<database>.leader`` already names the deployment).
    """
    if db_url.startswith("sqlite:///") and len(db_url) > len("sqlite:///"):
        options.pop("lock_key", None)
        return FileLeaderElection(db_url[len("sqlite:///") :] + ".leader", **options)
    if db_url.startswith(("postgres://", "postgresql://")):
        return PostgresLeaderElection(db_url, **options)
    if db_url.startswith("mysql://"):
        options.pop("server_settings", None)
        return MySQLLeaderElection(db_url, **options)
    raise ConfigError(
        "db_url: must be sqlite:///path/to/file.db, postgres://user@host:port/db or "
        "mysql://user@host:port/db "
        f"(got {redact_url(db_url)!r})"
    )
