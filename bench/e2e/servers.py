"""The servers under test and their silo and location tables.

msilo, msilo on MariaDB (``msilo-mysql``), Kamailio with usrloc in memory (``kamailio``,
``db_mode 0``) and Kamailio with usrloc writing through to PostgreSQL (``kamailio-db1``,
``db_mode 1``). Each server gets its own
database on the same PostgreSQL, its own SIP port, and is started and stopped by the
harness. Rows are preloaded and counted with asyncpg directly, in each server's own column
layout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from bench.e2e.procs import BenchError, Proc, free_port, wait_for_sip

T = TypeVar("T")
HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
MAIN = HERE.parents[1]

# Every preloaded body carries a key "k=<user>.<n>", so the UAS can tell rows apart.
KEY_PATTERN = re.compile(r"k=\d+\.\d+")
SENDER = f"sip:bench-sender@{HOST}"


def run_pg(dsn: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``fn`` on a fresh connection to ``dsn`` (the harness itself is synchronous)."""

    async def main() -> T:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise BenchError(f"cannot connect to PostgreSQL at {dsn}: {exc}") from None
        try:
            return await fn(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def database_dsn(admin_dsn: str, name: str) -> str:
    """The admin DSN with its database name replaced."""
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_dsn: str, name: str) -> str:
    """(Re)create database ``name``; returns its DSN."""

    async def create(conn: asyncpg.Connection) -> None:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')

    run_pg(admin_dsn, create)
    return database_dsn(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    async def drop(conn: asyncpg.Connection) -> None:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    run_pg(admin_dsn, drop)


def body_for(user: int, n: int, size: int) -> bytes:
    """A text/plain body of ``size`` bytes carrying the row's key."""
    text = f"k={user}.{n} offline message {n} for user{user}: "
    return (text + "lorem ipsum dolor sit amet " * 8)[:size].encode()


def rows_for(
    users: int | list[int], per_user: int, size: int, dst_port: int
) -> list[tuple[Any, ...]]:
    """(username, domain, src_addr, dst_addr, body, ctype, inc_time, exp_time) per row.

    ``users``: user1..userN, or the list of user numbers that get rows. dst_addr is what
    m_store keeps from store_uac.xml's To header: the AoR with the server's port. Kamailio's
    m_dump sends there (back to itself, then lookup + relay to the contact).
    """
    now = int(time.time())
    rows = []
    numbers = range(1, users + 1) if isinstance(users, int) else users
    for u in numbers:
        dst = f"sip:user{u}@{HOST}:{dst_port}"
        for n in range(1, per_user + 1):
            # inc_time spaced by one second keeps the arrival order well defined.
            inc = now - per_user + n
            rows.append(
                (
                    f"user{u}",
                    HOST,
                    SENDER,
                    dst,
                    body_for(u, n, size),
                    "text/plain",
                    inc,
                    inc + 86400,
                )
            )
    return rows


class Server:
    """What the harness needs from a server under test."""

    name = "server"
    table = "silo"
    columns: tuple[str, ...] = (
        "username",
        "domain",
        "src_addr",
        "dst_addr",
        "body",
        "ctype",
        "inc_time",
        "exp_time",
    )

    def __init__(self, admin_dsn: str, database: str, workdir: Path) -> None:
        self.admin_dsn = admin_dsn
        self.database = database
        self.dsn = database_dsn(admin_dsn, database)
        self.workdir = workdir
        self.port = 0
        self.proc: Proc | None = None
        self.info: dict[str, Any] = {}
        # Seconds a dump step waits, after the last REGISTER, for the silo to empty.
        self.drain_timeout = 30.0

    # --- lifecycle

    def prepare(self) -> None:
        """Create the database and the silo table."""
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=15.0)
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    def counters(self) -> dict[str, int]:
        """The server's own counters now (msilo's /stats); {} where it has none."""
        return {}

    def check_alive(self) -> None:
        """A clear error when the server died during a step."""
        if self.proc is None or not self.proc.running():
            tail = self.proc.tail() if self.proc else ""
            raise BenchError(f"{self.name} is not running any more; its output:\n{tail}")

    def cleanup(self) -> None:
        drop_database(self.admin_dsn, self.database)

    # --- the silo table

    def reset(self) -> None:
        """An empty silo for the next step."""

        async def truncate(conn: asyncpg.Connection) -> None:
            await conn.execute(f"TRUNCATE {self.table}")

        run_pg(self.dsn, truncate)

    def count_rows(self) -> int:
        async def count(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval(f"SELECT count(*) FROM {self.table}"))

        return run_pg(self.dsn, count)

    def reset_bindings(self) -> None:
        """No registered user any more (before a register ramp or a first-registration step)."""
        raise NotImplementedError

    def count_bindings(self) -> int | None:
        """Rows in the server's location table; None when bindings live in memory only."""

        async def count(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM location"))

        return run_pg(self.dsn, count)

    def preload(self, users: int | list[int], per_user: int, body_bytes: int) -> int:
        """Insert ``users`` x ``per_user`` deliverable rows; returns how many."""
        rows = rows_for(users, per_user, body_bytes, self.port)

        async def load(conn: asyncpg.Connection) -> None:
            await conn.copy_records_to_table(self.table, records=rows, columns=list(self.columns))
            await conn.execute(f"ANALYZE {self.table}")

        run_pg(self.dsn, load)
        return len(rows)


class MsiloServer(Server):
    """``msilo serve`` in registrar mode with N workers, its schema from ``msilo db init``."""

    name = "msilo"

    def __init__(
        self,
        admin_dsn: str,
        database: str,
        workdir: Path,
        workers: int,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(admin_dsn, database, workdir)
        self.workers = workers
        self.http_port = 0
        self.extra_sets = tuple(extra)  # "key=value", after the bench's own settings

    #: The checkout whose msilo runs (its C extension built in place).
    root: Path = MAIN
    #: "key=value" settings of this kind of server, before the run's --msilo-set ones.
    own_sets: tuple[str, ...] = ()

    def _msilo(self) -> list[str]:
        return [sys.executable, "-m", "msilo"]

    def counters(self) -> dict[str, int]:
        """``GET /stats`` (every worker summed); {} when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/stats", timeout=5) as r:
                stats = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in stats.items() if isinstance(v, int)}

    def _env(self) -> dict[str, str]:
        # The same interpreter as the harness, and this checkout's msilo first on the path:
        # an editable install may point at another checkout (a git worktree's harness
        # would otherwise measure the main checkout's code).
        path = os.environ.get("PYTHONPATH")
        root = str(self.root)
        return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}

    def settings(self) -> list[str]:
        sets = {
            "server.listen": f'["udp:{HOST}:{self.port}"]',
            "server.mode": '"registrar"',
            "server.http": f'"{HOST}:{self.http_port}"',
            "server.workers": str(self.workers),
            # One info line per stored or delivered message would be part of the measurement;
            # Kamailio's script logs at debug level too.
            "server.log_level": '"warning"',
            "msilo.db_url": f'"{self.dsn}"',
        }
        argv = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
        return argv + [
            arg for item in (*self.own_sets, *self.extra_sets) for arg in ("--set", item)
        ]

    def prepare(self) -> None:
        create_database(self.admin_dsn, self.database)
        self.prepare_schema()

    def prepare_schema(self) -> None:
        """``msilo db init`` on ``self.dsn``, and what the report says about msilo."""
        result = subprocess.run(
            [*self._msilo(), "db", "init", "--set", f'msilo.db_url="{self.dsn}"'],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.workdir,
            env=self._env(),
        )
        if result.returncode != 0:
            raise BenchError(f"msilo db init failed:\n{result.stdout}{result.stderr}")
        version = subprocess.run(
            [*self._msilo(), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.workdir,
            env=self._env(),
        )
        where = subprocess.run(
            [sys.executable, "-c", "import msilo; print(msilo.__file__)"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.workdir,
            env=self._env(),
        )
        commit = subprocess.run(
            ["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.info = {
            "version": version.stdout.strip(),
            "workers": self.workers,
            "module": where.stdout.strip(),
            "commit": commit.stdout.strip(),
        }

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        argv = [*self._msilo(), "serve", *self.settings()]
        self.info["command"] = " ".join(argv)
        self.proc = Proc(
            "msilo", argv, self.workdir / "msilo.log", cwd=self.workdir, env=self._env()
        )
        wait_for_sip(self.proc, HOST, self.port, timeout=60)

    def reset_bindings(self) -> None:
        # msilo keeps no binding in memory: the table is the registrar's whole state.
        async def truncate(conn: asyncpg.Connection) -> None:
            await conn.execute("TRUNCATE location")

        run_pg(self.dsn, truncate)

    # A step's users are the next step's too (user1..N), each registering from a new port:
    # the devices msilo remembers from one step would have every message of the next kept
    # for them (deliver_to = "all"). Each step starts with none, as a fresh deployment.
    MSILO_STATE = ("msilo_device", "msilo_silo_delivery")

    def reset(self) -> None:
        async def truncate(conn: asyncpg.Connection) -> None:
            # An older checkout (msilo-baseline) may not have every table yet.
            have = [t for t in self.MSILO_STATE if await conn.fetchval("SELECT to_regclass($1)", t)]
            await conn.execute(f"TRUNCATE {', '.join([self.table, *have])}")

        run_pg(self.dsn, truncate)


class MsiloBaselineServer(MsiloServer):
    """:class:`MsiloServer` running another checkout (``msilo-baseline``, ``--baseline
    DIR``, set as ``root``): the code before a change, measured in the same run as after."""

    name = "msilo-baseline"


class MsiloWriteBehindServer(MsiloServer):
    """:class:`MsiloServer` with ``registrar.write_behind`` on (``msilo-wb``): refreshes
    answered from a read and written every 5 seconds."""

    name = "msilo-wb"
    own_sets = ("registrar.write_behind=5",)


class MsiloMySQLServer(MsiloServer):
    """``msilo serve`` as :class:`MsiloServer`, on a throwaway MariaDB of its own (Debian's
    ``mariadb-server``, tests/mariadbserver.py: durable commits, binary log off)."""

    name = "msilo-mysql"

    def __init__(
        self,
        admin_dsn: str,
        database: str,
        workdir: Path,
        workers: int,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(admin_dsn, database, workdir, workers, extra)
        from tests.mariadbserver import MariaDBServer

        self.mariadb = MariaDBServer()
        self.dsn = self.mariadb.url(database)

    def _sql(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        from tests.conftest import _my_admin

        return asyncio.run(_my_admin(self.dsn, sql, args))

    def prepare(self) -> None:
        from tests.conftest import _my_admin

        self.mariadb.init()
        self.mariadb.start()
        asyncio.run(_my_admin(self.mariadb.url("mysql"), f"CREATE DATABASE {self.database}"))
        super().prepare_schema()
        version = self._sql("SELECT VERSION()")[0][0]
        self.info["mariadb"] = str(version)

    def cleanup(self) -> None:
        self.mariadb.destroy()

    def reset(self) -> None:
        for table in (self.table, *self.MSILO_STATE):
            self._sql(f"TRUNCATE {table}")

    def count_rows(self) -> int:
        return int(self._sql(f"SELECT count(*) FROM {self.table}")[0][0])

    def count_bindings(self) -> int | None:
        return int(self._sql("SELECT count(*) FROM location")[0][0])

    def reset_bindings(self) -> None:
        self._sql("TRUNCATE location")

    def preload(self, users: int | list[int], per_user: int, body_bytes: int) -> int:
        rows = rows_for(users, per_user, body_bytes, self.port)
        marks = "(" + ", ".join(["%s"] * len(self.columns)) + ")"
        for i in range(0, len(rows), 1000):
            chunk = rows[i : i + 1000]
            self._sql(
                f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES "
                + ", ".join([marks] * len(chunk)),
                tuple(v for row in chunk for v in row),
            )
        self._sql(f"ANALYZE TABLE {self.table}")
        return len(rows)


# Kamailio's own PostgreSQL DDL for usrloc's location table (Debian package kamailio).
KAMAILIO_DDL = Path("/usr/share/kamailio/postgres")


class KamailioServer(Server):
    """Kamailio from Debian running bench/e2e/kamailio.cfg (the admin guide's sample).

    ``db_mode`` is usrloc's: 0 keeps bindings in memory only (the guide's sample, server
    name ``kamailio``), 1 writes every change through to PostgreSQL's ``location`` table
    before the REGISTER is answered (``kamailio-db1``: durable like msilo).
    """

    MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")

    def __init__(
        self,
        admin_dsn: str,
        database: str,
        workdir: Path,
        children: int,
        check_time: int,
        db_mode: int = 0,
    ) -> None:
        super().__init__(admin_dsn, database, workdir)
        if db_mode not in (0, 1):
            raise BenchError(f"usrloc db_mode {db_mode} is not benchmarked (0 or 1)")
        self.name = "kamailio" if db_mode == 0 else f"kamailio-db{db_mode}"
        self.db_mode = db_mode
        self.children = children
        self.check_time = check_time
        # Delivered rows are deleted by the clean timer, up to check_time after the 200.
        self.drain_timeout = 2.0 * check_time + 15.0

    @staticmethod
    def ensure_installed() -> str:
        """Path of the kamailio binary, installing the Debian packages when missing."""
        binary = shutil.which("kamailio") or (
            "/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None
        )
        modules = KamailioServer.MODULES
        if binary and (modules / "db_postgres.so").exists() and (modules / "msilo.so").exists():
            return binary
        if not shutil.which("apt-get"):
            raise BenchError("kamailio is missing: install kamailio and kamailio-postgres-modules")
        if os.geteuid() != 0:
            raise BenchError(
                "kamailio is missing and we are not root: "
                "sudo apt-get install kamailio kamailio-postgres-modules"
            )
        print("installing kamailio and kamailio-postgres-modules from Debian ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "kamailio", "kamailio-postgres-modules"],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
            if result.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
        binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
        if not Path(binary).exists():
            raise BenchError("kamailio still missing after apt-get install")
        return binary

    def prepare(self) -> None:
        self.binary = self.ensure_installed()
        create_database(self.admin_dsn, self.database)

        async def schema(conn: asyncpg.Connection) -> None:
            # Kamailio's PostgreSQL layout, table version 8 (behaviour spec §5.2, §5.3).
            await conn.execute(
                """
                CREATE TABLE version (
                    id SERIAL PRIMARY KEY NOT NULL,
                    table_name VARCHAR(32) NOT NULL,
                    table_version INTEGER DEFAULT 0 NOT NULL,
                    CONSTRAINT version_table_name_idx UNIQUE (table_name)
                );
                CREATE TABLE silo (
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
                CREATE INDEX silo_account_idx ON silo (username, domain);
                INSERT INTO version (table_name, table_version) VALUES ('silo', 8);
                """
            )
            # usrloc's table from Kamailio's own DDL (it also adds its version rows).
            await conn.execute(location_ddl)

        ddl = KAMAILIO_DDL / "usrloc-create.sql"
        if not ddl.is_file():
            raise BenchError(
                f"{ddl} is missing: Kamailio's PostgreSQL DDL comes with the Debian package "
                "kamailio (apt-get install --reinstall kamailio)"
            )
        location_ddl = ddl.read_text()
        run_pg(self.dsn, schema)
        version = subprocess.run([self.binary, "-v"], capture_output=True, text=True, timeout=30)
        first = (version.stdout.splitlines() or [""])[0]
        self.info = {
            "version": first.replace("version:", "").strip(),
            "children": self.children,
            "check_time": self.check_time,
            "usrloc_db_mode": self.db_mode,
        }

    def write_config(self) -> Path:
        usrloc = f'modparam("usrloc", "db_mode", {self.db_mode})'
        if self.db_mode:
            usrloc += f'\nmodparam("usrloc", "db_url", "{self.dsn}")'
        values = {
            "usrloc": usrloc,
            "debug": "1",
            "children": str(self.children),
            "host": HOST,
            "port": str(self.port),
            "module_path": str(self.MODULES) + "/",
            "db_url": self.dsn,
            "check_time": str(self.check_time),
        }
        text = (HERE / "kamailio.cfg").read_text()
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        if "{{" in text:
            raise BenchError("bench/e2e/kamailio.cfg has a placeholder the harness does not fill")
        path = self.workdir / "kamailio.cfg"
        path.write_text(text)
        check = subprocess.run(
            [self.binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60
        )
        if check.returncode != 0:
            raise BenchError(f"kamailio rejects {path}:\n{(check.stdout + check.stderr)[-3000:]}")
        return path

    def start(self) -> None:
        self.port = free_port()
        cfg = self.write_config()
        # -DD: children fork, the main process stays in the foreground (our process group);
        # -E: log to stderr (our log file). Shared memory sized for ~10^5 transactions.
        argv = [self.binary, "-f", str(cfg), "-DD", "-E", "-m", "512", "-M", "16"]
        self.info["command"] = " ".join(argv)
        self.starts = getattr(self, "starts", 0) + 1
        log = self.workdir / f"{self.name}-{self.starts}.log"
        self.proc = Proc(self.name, argv, log, cwd=self.workdir)
        wait_for_sip(self.proc, HOST, self.port, timeout=30)

    def reset_bindings(self) -> None:
        # usrloc's bindings live in shared memory (db_mode 1 also loads the table at start):
        # empty the table, then a fresh process.
        async def truncate(conn: asyncpg.Connection) -> None:
            await conn.execute("TRUNCATE location")

        run_pg(self.dsn, truncate)
        self.stop()
        self.start()

    def count_bindings(self) -> int | None:
        return super().count_bindings() if self.db_mode else None
