"""Store throughput on PostgreSQL: the batch writer (group commit) against single-row stores.

N concurrent callers each store one message at a time and wait for its commit, as SIP
MESSAGE requests do.  Two ways, measured in the same run on the same server:

* ``single`` -- each caller runs ``store_batch([msg])`` itself on a shared pool: one
  transaction (and one WAL flush) per message;
* ``batch``  -- each caller ``submit``s to one ``BatchWriter``: one transaction per flush.

Each variation gets a fresh table, a warm-up, then a fixed measuring window.  At the end every
acknowledged row is counted in the database; a shortfall fails the run.

    python bench/bench_store.py --dsn postgres://postgres@127.0.0.1:5432/postgres

A scratch database is created next to the one named in ``--dsn`` and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msilo.storage import BatchWriter, NewMessage, SiloNames, Store, StoreOutcome
from msilo.storage.postgres import PostgresStore


@dataclass
class Result:
    mode: str
    callers: int
    rows_per_s: float
    acked: int
    counted: int
    p50_ms: float
    p99_ms: float
    flushes: int
    mean_batch: float


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _message(caller: int, seq: int, now: int, owners: int, tag: str = "") -> NewMessage:
    user = f"user{caller}-{seq % owners}"  # each caller writes to `owners` mailboxes in turn
    return NewMessage(
        username=user,
        domain="example.com",
        src_addr="sip:sender@example.org",
        dst_addr=f"sip:{user}@example.com",
        body=b"Hello! This is an offline message of a typical length, about a tweet long.",
        ctype="text/plain; charset=UTF-8",
        inc_time=now,
        exp_time=now + 259200,
        dedupe_key=f"{tag}{caller}-{seq}@bench;1;tag{caller}",  # as the server sets it (D12)
    )


@dataclass
class Drive:
    """What ``drive`` measured: every acknowledgement, and those of the measuring window."""

    acked: int  # every STORED acknowledgement, warm-up included (for the row count check)
    measured: int
    elapsed: float
    flushes: int
    rows: int
    latencies: list[float]  # sorted, seconds

    def pct(self, p: float) -> float:
        """The ``p`` quantile of the window's latencies, in ms (0 when there were none)."""
        lat = self.latencies
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

    def mean_batch(self, mode: str) -> float:
        """Rows per group commit (1 for ``single``)."""
        return self.rows / self.flushes if mode == "batch" and self.flushes else 1.0


async def drive(
    store: Store, mode: str, callers: int, args: argparse.Namespace, tag: str = ""
) -> Drive:
    """``callers`` concurrent callers storing one message at a time on ``store`` (open, its
    schema made) through one BatchWriter (``batch``) or one store_batch each (``single``):
    ``args.warmup`` seconds, then ``args.duration`` measured.  ``tag`` prefixes the dedupe
    keys, so that several drives can fill one table."""
    writer = BatchWriter(store, max_messages=args.max_messages, max_batch=args.max_batch)
    now = int(time.time())
    measuring = False
    stop = False
    acked = 0
    measured = 0
    latencies: list[float] = []

    async def caller(i: int) -> None:
        nonlocal acked, measured
        seq = 0
        while not stop:
            msg = _message(i, seq, now, args.owners, tag)
            seq += 1
            t0 = time.perf_counter()
            if mode == "batch":
                result = await writer.submit(msg)
            else:
                [result] = await store.store_batch([msg], args.max_messages)
            if result.outcome is not StoreOutcome.STORED:
                raise AssertionError(f"row not stored: {result}")
            acked += 1
            if measuring:
                measured += 1
                latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(args.warmup)
    flushes0, rows0 = writer.flushes, writer.rows
    measuring = True
    t_start = time.perf_counter()
    await asyncio.sleep(args.duration)
    measuring = False
    elapsed = time.perf_counter() - t_start
    flushes, rows = writer.flushes - flushes0, writer.rows - rows0
    stop = True
    await asyncio.gather(*tasks)
    await writer.close()
    latencies.sort()
    return Drive(acked, measured, elapsed, flushes, rows, latencies)


async def run_variation(dsn: str, mode: str, callers: int, args: argparse.Namespace) -> Result:
    names = SiloNames(table=f"bench_{mode}_{callers}_{uuid.uuid4().hex[:6]}")
    store = PostgresStore(dsn, names, min_size=args.pool_size, max_size=args.pool_size)
    await store.open()
    await store.create_schema()
    d = await drive(store, mode, callers, args)

    conn = await asyncpg.connect(dsn)
    try:
        counted = await conn.fetchval(f'SELECT count(*) FROM "{names.table}"')
        await conn.execute(f'DROP TABLE "{names.table}"')
        await conn.execute(f'DROP FUNCTION "{store.function}"')
    finally:
        await conn.close()
    await store.close()
    if counted != d.acked:
        raise SystemExit(
            f"{mode}/{callers}: {d.acked} rows acknowledged but {counted} in the table"
        )

    return Result(
        mode=mode,
        callers=callers,
        rows_per_s=d.measured / d.elapsed,
        acked=d.acked,
        counted=counted,
        p50_ms=d.pct(0.50),
        p99_ms=d.pct(0.99),
        flushes=d.flushes if mode == "batch" else d.measured,
        mean_batch=d.mean_batch(mode),
    )


def machine_info(server_version: str) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "postgresql": server_version,
        "date": time.strftime("%Y-%m-%d"),
    }


async def main(args: argparse.Namespace) -> int:
    scratch = f"msilo_bench_{uuid.uuid4().hex[:8]}"
    await _admin(args.dsn, f'CREATE DATABASE "{scratch}"')
    dsn = _with_database(args.dsn, scratch)
    results: list[Result] = []
    try:
        conn = await asyncpg.connect(dsn)
        version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
        await conn.close()
        info = machine_info(version) | {"synchronous_commit": sync}
        print(" ".join(f"{k}={v}" for k, v in info.items()))
        print(
            f"duration={args.duration}s warmup={args.warmup}s pool_size={args.pool_size} "
            f"max_batch={args.max_batch} max_messages={args.max_messages} owners={args.owners}"
        )
        print(
            f"{'mode':<7}{'callers':>8}{'rows/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'mean batch':>12}{'rows ok':>10}"
        )
        for callers in args.callers:
            for mode in ("single", "batch"):
                r = await run_variation(dsn, mode, callers, args)
                results.append(r)
                print(
                    f"{r.mode:<7}{r.callers:>8}{r.rows_per_s:>11.0f}{r.p50_ms:>9.2f}"
                    f"{r.p99_ms:>9.2f}{r.mean_batch:>12.1f}{r.counted:>10}"
                )
        print()
        for callers in args.callers:
            single = next(r for r in results if r.callers == callers and r.mode == "single")
            batch = next(r for r in results if r.callers == callers and r.mode == "batch")
            print(f"callers={callers}: batch/single = {batch.rows_per_s / single.rows_per_s:.1f}x")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"machine": info, "args": vars(args), "results": [asdict(r) for r in results]},
                    indent=2,
                )
            )
    finally:
        await _admin(args.dsn, f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
    ratio_512 = [
        next(r.rows_per_s for r in results if r.callers == c and r.mode == "batch")
        / next(r.rows_per_s for r in results if r.callers == c and r.mode == "single")
        for c in args.callers
        if c >= 512
    ]
    if ratio_512 and statistics.fmean(ratio_512) < args.target:
        # The ratio is a property of the disk (one WAL flush per single-row commit) as much
        # as of msilo: a fast disk narrows it.  Reported always; a failure only on request.
        print(f"below target: batch writer < {args.target}x single-row at >= 512 callers")
        return 1 if args.strict else 0
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--callers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 512])
    p.add_argument("--duration", type=float, default=5.0, help="measuring window, seconds")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--pool-size", type=int, default=8, help="connections, both modes")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--max-messages", type=int, default=0, help="quota (0 = off)")
    p.add_argument(
        "--owners", type=int, default=1, help="mailboxes per caller (quota cost grows with size)"
    )
    p.add_argument("--target", type=float, default=10.0, help="expected ratio at 512")
    p.add_argument("--strict", action="store_true", help="exit 1 when the ratio is below --target")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if not ns.no_uvloop:
        import uvloop

        uvloop.install()
    raise SystemExit(asyncio.run(main(ns)))
