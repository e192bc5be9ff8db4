"""The batch-store function with parts removed or rewritten, timed side by side (the
variants table in bench/README.md, "Several devices"):

    python bench/store_sql_variants.py --rounds 60

Creates a throwaway database with this checkout's schema, copies msilo_silo_store_batch
into variants (no owner locks, no Call-ID check, neither, the check as a ``LIMIT 1``
scalar subquery), calls each with 256 rows per round (the order reversed every other
round; the silo grows by 5 x 256 rows a round) and prints the medians. The database is
dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msilo.storage.base import DEFAULT_NAMES
from msilo.storage.postgres import PostgresStore

FN = "msilo_silo_store_batch"
LIMIT1 = (
    '(i.cid IS NOT NULL AND coalesce((SELECT true FROM "silo" x WHERE x."username" = i.u '
    'AND x."domain" = i.d AND x.callid = i.cid LIMIT 1), false))'
)


def variants(src: str) -> dict[str, str]:
    """Function bodies: the real one and its variants."""
    lock_start = src.index("    IF p_max > 0 OR EXISTS")
    lock_end = src.index("END IF;", lock_start) + len("END IF;")
    nolock = src[:lock_start] + src[lock_end:]
    cid = src[src.index("(i.cid IS NOT NULL AND EXISTS") : src.index(") AS cid_taken") + 1]
    return {
        "nolock": nolock,
        "nocidcheck": src.replace(cid, "false"),
        "neither": nolock.replace(cid, "false"),
        "limit1": src.replace(cid, LIMIT1),
    }


async def main(dsn: str, rounds: int, size: int) -> None:
    database = f"msilo_sqlvariants_{os.getpid()}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{database}"')
    try:
        db_dsn = dsn.rsplit("/", 1)[0] + "/" + database
        store = PostgresStore(db_dsn, DEFAULT_NAMES, min_size=1, max_size=1)
        await store.open()
        await store.create_schema()
        await store.close()
        conn = await asyncpg.connect(db_dsn)
        src = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = $1", FN)
        ddl = await conn.fetchval(
            "SELECT pg_get_functiondef(oid) FROM pg_proc WHERE proname = $1", FN
        )
        names = {"as committed": FN}
        for name, body in variants(src).items():
            await conn.execute(ddl.replace(f"public.{FN}(", f"public.v_{name}(").replace(src, body))
            names[name] = f"v_{name}"
        now, seq = int(time.time()), 0
        took: dict[str, list[float]] = {k: [] for k in names}
        for rnd in range(rounds):
            order = list(names.items())
            for name, fn in order if rnd % 2 == 0 else order[::-1]:
                cols: list[list[object]] = [[] for _ in range(12)]
                for _ in range(size):
                    seq += 1
                    u = f"user{seq % 10000}"
                    row = (u, "127.0.0.1", "sip:s@x", f"sip:{u}@x", b"body" * 20, "text/plain")
                    row += (now, now + 86400, 0, f"k{seq}", True, f"{seq}-cid@x")  # type: ignore[assignment]
                    for col, value in zip(cols, row, strict=True):
                        col.append(value)
                query = (
                    f"SELECT outcomes, mids FROM {fn}"
                    f"($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, {now}, $12)"
                )
                t0 = time.perf_counter()
                await conn.fetchrow(query, *cols)
                took[name].append(time.perf_counter() - t0)
        await conn.close()
        for name, values in took.items():
            print(f"{name:14s} median {statistics.median(values) * 1e3:7.2f} ms per {size} rows")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args()
    asyncio.run(main(a.dsn, a.rounds, a.size))
