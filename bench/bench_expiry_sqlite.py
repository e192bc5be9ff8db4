"""Expiry under a store load on SQLite, the single-writer backend (issue 19).

A SQLite silo file with ``--rows`` rows, the oldest ``--expired`` of them expired (the same
rows as ``bench_full_silo``), a paced store load (``--load-rate``, one ``submit`` each through
the batch writer); after ``--before`` seconds one expiry cycle runs while the load goes on.
Each ``--batches`` entry is one run on a fresh file: ``N`` deletes ``N`` rows a statement as
the leader does (``delete_expired_in_batches``), ``0`` one statement for every expired row
(what the leader ran before).  Reports store p50/p99 before and during the cycle.

    python -m bench.bench_expiry_sqlite --batches 250,0,2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_full_silo import COLUMNS, PacedLoad, pct, silo_rows
from msilo.leader.cycles import EXPIRY_PAUSE, delete_expired_in_batches
from msilo.storage import BatchWriter
from msilo.storage.sqlite import SQLiteStore


async def trial(batch: int, args: argparse.Namespace, where: Path) -> dict[str, Any]:
    path = where / f"silo-{time.monotonic_ns()}.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.create_schema()
    conn = sqlite3.connect(path)
    marks = ", ".join("?" * len(COLUMNS))
    rows = silo_rows(args.rows, args.rows // 10, args.expired, 0.1, int(time.time()), "s")
    conn.executemany(f"INSERT INTO silo ({', '.join(COLUMNS)}) VALUES ({marks})", rows)
    conn.commit()
    conn.close()

    writer = BatchWriter(store, max_messages=0, max_batch=512)
    load = PacedLoad(writer, args.load_rate, f"b{batch}")
    runner = asyncio.create_task(load.run())
    t_load = time.perf_counter()
    await asyncio.sleep(args.before)
    now = int(time.time())
    t0 = time.perf_counter()
    if batch:
        deleted = await delete_expired_in_batches(store, now, batch=batch, pause=args.pause)
    else:
        deleted = await store.delete_expired(now, args.rows)
    t1 = time.perf_counter()
    await asyncio.sleep(1.0)
    load.stop()
    await runner
    await writer.close()
    await store.close()
    conn = sqlite3.connect(path)
    [(stored,)] = conn.execute(
        "SELECT count(*) FROM silo WHERE dedupe_key LIKE ?", (f"{load.tag}-%",)
    )
    conn.close()
    if deleted != args.expired:
        raise SystemExit(f"batch {batch}: deleted {deleted} of {args.expired}")
    if stored != load.acked:
        raise SystemExit(f"batch {batch}: {load.acked} stores acknowledged, {stored} rows")
    before, during = load.window(t_load + 1.0, t0), load.window(t0, t1)
    return {
        "batch": batch, "deleted": deleted, "cycle_s": t1 - t0,
        "before_p50_ms": pct(before, 0.5), "before_p99_ms": pct(before, 0.99),
        "during_p50_ms": pct(during, 0.5), "during_p99_ms": pct(during, 0.99),
        "during_max_ms": pct(during, 1.0), "during_stores": len(during),
    }  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    print(
        f"rows={args.rows} expired={args.expired} load_rate={args.load_rate}/s "
        f"pause={args.pause}s synchronous=FULL"
    )
    print(
        f"{'batch':>7}{'deleted':>9}{'cycle s':>9}{'before p50':>12}{'p99':>8}"
        f"{'during p50':>12}{'p99':>8}{'max':>8}{'stores':>8}"
    )
    results = []
    with tempfile.TemporaryDirectory() as where:
        for batch in args.batches:
            r = await trial(batch, args, Path(where))
            results.append(r)
            print(
                f"{batch or 'one':>7}{r['deleted']:>9}{r['cycle_s']:>9.2f}"
                f"{r['before_p50_ms']:>12.2f}{r['before_p99_ms']:>8.2f}{r['during_p50_ms']:>12.2f}"
                f"{r['during_p99_ms']:>8.2f}{r['during_max_ms']:>8.1f}{r['during_stores']:>8}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--expired", type=int, default=200_000)
    p.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[SQLiteStore.expiry_batch, 0],
        help="rows per statement, one run each (0: one statement)",
    )
    p.add_argument("--pause", type=float, default=EXPIRY_PAUSE)
    p.add_argument("--load-rate", type=float, default=1000.0)
    p.add_argument("--before", type=float, default=3.0)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--json")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if not ns.no_uvloop:
        import uvloop

        uvloop.install()
    raise SystemExit(asyncio.run(main(ns)))
