"""Where the store path's time goes: one ``PostgresStore.store_batch`` call, A/B.

    python bench/bench_store_sql.py --base /work/wt-base --rounds 3

The end-to-end store ladder (``bench_devices.py store``) is noisy on a shared machine;
this times only the database side of a store, which is what per-device delivery changed
(the Call-ID column, the derived-Call-ID check and the owner locks in the batch-store
function). Each variant runs in its own process with its own checkout on ``PYTHONPATH``
and its own fresh database:

* ``A``: the baseline checkout;
* ``B``: this checkout, each row carrying its Call-ID as the server sets it;
* ``B-nocid``: this checkout, rows without a Call-ID (what ``B`` costs without the
  Call-ID work: no owner locks, no derived-Call-ID check).

Rows go to offline users (``unless_online``, as in registrar mode) spread over 10,000
mailboxes, in batches of 1, 32 and 256 (what the batch writer sends when idle, loaded,
saturated). The variants alternate within every round so noise hits all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def child(dsn: str, database: str, sizes: list[int], calls: int, callid: bool) -> None:
    """Runs with the checkout under test first on sys.path; prints JSON timings."""
    from msilo.storage import NewMessage, StoreOutcome
    from msilo.storage.base import DEFAULT_NAMES
    from msilo.storage.postgres import PostgresStore

    db_dsn = dsn.rsplit("/", 1)[0] + "/" + database
    await _admin(dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await _admin(dsn, f'CREATE DATABASE "{database}"')
    try:
        store = PostgresStore(db_dsn, DEFAULT_NAMES, min_size=1, max_size=1)
        await store.open()
        await store.create_schema()
        now = int(time.time())
        seq = 0
        fields = getattr(NewMessage, "__dataclass_fields__", {})
        out: dict[str, Any] = {}
        for size in sizes:
            took = []
            for _ in range(calls):
                batch = []
                for _ in range(size):
                    seq += 1
                    user = f"user{seq % 10000}"
                    extra = {"callid": f"{seq}-bench@127.0.0.1"} if callid else {}
                    if callid and "callid" not in fields:
                        extra = {}
                    batch.append(
                        NewMessage(
                            username=user,
                            domain="127.0.0.1",
                            src_addr="sip:sipp@127.0.0.1:5070",
                            dst_addr=f"sip:{user}@127.0.0.1:5060",
                            body=b"Offline message for a user from sipp: lorem ipsum dolor sit "
                            b"amet, consectetur adipiscing elit.",
                            ctype="text/plain",
                            inc_time=now,
                            exp_time=now + 259200,
                            dedupe_key=f"{seq}-bench@127.0.0.1;1;tag{seq}",
                            unless_online=True,
                            **extra,
                        )
                    )
                t0 = time.perf_counter()
                results = await store.store_batch(batch, 0)
                took.append(time.perf_counter() - t0)
                if any(r.outcome is not StoreOutcome.STORED for r in results):
                    raise SystemExit(f"not stored: {results[:3]}")
            out[str(size)] = took
        await store.close()
        print(json.dumps(out))
    finally:
        await _admin(dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def run_variant(root: Path, args: argparse.Namespace, callid: bool, tag: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--dsn", args.dsn]
    argv += ["--database", f"msilo_storesql_{tag}_{os.getpid()}", "--calls", str(args.calls)]
    argv += ["--sizes", ",".join(map(str, args.sizes))] + (["--callid"] if callid else [])
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{done.stdout}{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--base", type=Path, default=Path("/work/wt-base"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200, help="store_batch calls per size")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 256])
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--database", help=argparse.SUPPRESS)
    p.add_argument("--callid", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        asyncio.run(child(args.dsn, args.database, args.sizes, args.calls, args.callid))
        return 0
    variants = [("A", args.base, True), ("B", ROOT, True), ("B-nocid", ROOT, False)]
    samples: dict[str, dict[str, list[float]]] = {v[0]: {} for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for tag, root, callid in order:
            got = run_variant(root, args, callid, tag.replace("-", "_").lower())
            for size, took in got.items():
                samples[tag].setdefault(size, []).extend(took)
    print("| batch | variant | median ms/call | p99 ms/call | µs/row (median) | vs A |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    summary: dict[str, Any] = {}
    for size in map(str, args.sizes):
        base = statistics.median(samples["A"][size])
        for tag, _, _ in variants:
            took = sorted(samples[tag][size])
            med = statistics.median(took)
            p99 = took[min(len(took) - 1, int(0.99 * len(took)))]
            summary[f"{tag}/{size}"] = {"median_ms": med * 1e3, "p99_ms": p99 * 1e3}
            print(
                f"| {size} | {tag} | {med * 1e3:.2f} | {p99 * 1e3:.2f} "
                f"| {med * 1e6 / int(size):.0f} | {med / base:.2f}x |"
            )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": samples}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
