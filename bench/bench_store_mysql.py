"""Store throughput on MariaDB beside PostgreSQL, in one run (bench_store.py's ladder).

N concurrent callers each store one message at a time and wait for its commit, as SIP
MESSAGE requests do, through one ``BatchWriter`` (group commit: ``batch``) and, with
``--single``, each with its own ``store_batch([msg])`` (``single``).  The same ladder runs on
PostgreSQL (``--dsn``, a scratch database) and on MariaDB: a throwaway server started from
Debian's ``mariadb-server`` (tests/mariadbserver.py, default durability:
``innodb_flush_log_at_trx_commit = 1``, as PostgreSQL's ``synchronous_commit = on``), or
``--mysql URL``.  ``--drivers asyncmy,aiomysql`` compares the two asyncio drivers on MariaDB.
Every acknowledged row is counted in its table at the end; a shortfall fails the run.

    python bench/bench_store_mysql.py --dsn postgres://postgres@127.0.0.1:5432/postgres \
        --drivers asyncmy,aiomysql --json bench/RESULTS-mysql-store.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_store import _admin, _with_database, drive, machine_info
from msilo.storage import SiloNames, Store
from msilo.storage.mysql import MySQLStore
from msilo.storage.postgres import PostgresStore


@dataclass
class Row:
    backend: str
    mode: str
    callers: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    acked: int
    counted: int


async def run(
    backend: str,
    make: Callable[[SiloNames], Store],
    count: Callable[[Store], Awaitable[int]],
    mode: str,
    callers: int,
    args: argparse.Namespace,
) -> Row:
    names = SiloNames(table=f"bench_{mode}_{callers}_{uuid.uuid4().hex[:6]}")
    store = make(names)
    await store.open()
    await store.create_schema()
    d = await drive(store, mode, callers, args)
    counted = await count(store)
    await store.close()
    if counted != d.acked:
        raise SystemExit(f"{backend} {mode}/{callers}: {d.acked} acknowledged, {counted} stored")
    return Row(
        backend, mode, callers, d.measured / d.elapsed, d.pct(0.5), d.pct(0.99),
        d.mean_batch(mode), d.acked, counted,
    )  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    server = None
    my_url = args.mysql
    if my_url is None:
        from tests.conftest import _my_admin
        from tests.mariadbserver import MariaDBServer

        server = MariaDBServer()
        server.init()
        server.start()
        await _my_admin(server.url("mysql"), "CREATE DATABASE msilo_bench")
        my_url = server.url("msilo_bench")
    scratch = f"msilo_bench_{uuid.uuid4().hex[:8]}"
    await _admin(args.dsn, f'CREATE DATABASE "{scratch}"')
    dsn = _with_database(args.dsn, scratch)
    rows: list[Row] = []
    try:
        conn = await asyncpg.connect(dsn)
        pg_version = await conn.fetchval("SHOW server_version")
        await conn.close()
        probe = MySQLStore(my_url)
        await probe.open()
        my_version = probe.server_version
        await probe.close()
        info = machine_info(pg_version) | {"mariadb": my_version}
        print(" ".join(f"{k}={v}" for k, v in info.items()))
        print(
            f"duration={args.duration}s warmup={args.warmup}s pool_size={args.pool_size} "
            f"max_batch={args.max_batch} max_messages={args.max_messages} owners={args.owners}"
        )

        async def pg_count(store: Store) -> int:
            c = await asyncpg.connect(dsn)
            try:
                return int(await c.fetchval(f'SELECT count(*) FROM "{store.names.table}"'))
            finally:
                await c.close()

        async def my_count(store: Store) -> int:
            from tests.conftest import _my_admin

            got = await _my_admin(my_url, f'SELECT count(*) FROM "{store.names.table}"')
            return int(got[0][0])

        backends: list[tuple[str, Callable[[SiloNames], Store], Any]] = [
            (
                "postgres",
                lambda n: PostgresStore(dsn, n, min_size=args.pool_size, max_size=args.pool_size),
                pg_count,
            )
        ]
        for driver in args.drivers:
            backends.append(
                (
                    f"mariadb/{driver}",
                    lambda n, d=driver: MySQLStore(my_url, n, max_size=args.pool_size, driver=d),
                    my_count,
                )
            )
        modes = ("single", "batch") if args.single else ("batch",)
        print(f"{'backend':<18}{'mode':<7}{'callers':>8}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'batch':>8}")  # fmt: skip
        for callers in args.callers:
            for mode in modes:
                for name, make, count in backends:
                    r = await run(name, make, count, mode, callers, args)
                    rows.append(r)
                    print(
                        f"{r.backend:<18}{r.mode:<7}{r.callers:>8}{r.rows_per_s:>10.0f}"
                        f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.mean_batch:>8.1f}"
                    )
        print()
        for callers in args.callers:
            for mode in modes:
                pg = next(r for r in rows if (r.backend, r.mode, r.callers) ==
                          ("postgres", mode, callers))  # fmt: skip
                for r in rows:
                    if r.backend != "postgres" and (r.mode, r.callers) == (mode, callers):
                        ratio = r.rows_per_s / pg.rows_per_s
                        print(f"{mode} callers={callers}: {r.backend}/postgres = {ratio:.2f}x")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"machine": info, "args": vars(args), "results": [asdict(r) for r in rows]},
                    indent=2,
                )
            )
    finally:
        await _admin(args.dsn, f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        if server is not None:
            server.destroy()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--mysql", help="mysql://user@host:port/db (default: a throwaway MariaDB)")
    p.add_argument("--drivers", type=lambda s: s.split(","), default=["asyncmy"])
    p.add_argument("--callers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 512])
    p.add_argument("--single", action="store_true", help="also single-row stores per caller")
    p.add_argument("--duration", type=float, default=5.0, help="measuring window, seconds")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--pool-size", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--max-messages", type=int, default=0, help="quota (0 = off)")
    p.add_argument("--owners", type=int, default=1, help="mailboxes per caller")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if not ns.no_uvloop:
        import uvloop

        uvloop.install()
    raise SystemExit(asyncio.run(main(ns)))
