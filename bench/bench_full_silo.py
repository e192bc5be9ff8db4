"""Workload 2, a full silo (issue 19): store, dump and expiry on a table of a million rows.

Against PostgreSQL, in one run and on one server:

1. **dump and store rates, empty against full** -- the full table: ``--rows`` rows over
   ``--users`` mailboxes loaded with COPY, 10 % scheduled reminders (``snd_time`` in the
   future), the oldest ``--expired`` already expired; the empty one: a fresh silo holding
   only the mailboxes about to be dumped, with the same mix.  On each, the dump rate
   (``--dump-users`` mailboxes emptied as the dump path does: ``claim_for_dump`` a chunk, one
   ``delete_delivered`` per delivered row, until nothing is left), then the store rate
   (``bench_store.drive``: ``--callers`` callers through one ``BatchWriter``, group commit).
   ``--rounds`` rounds, empty and full in turns (ABBA), each round's full/empty ratio and
   their median;
2. **expiry under load** -- a paced store load (``--load-rate``, one ``submit`` per message)
   runs for ``--before`` seconds, then the leader's expiry (``delete_expired_in_batches``)
   deletes the expired rows while it goes on; store p50/p99 before and during the cycle, and
   how long the cycle took.  Then the same again with the expired rows loaded anew and the
   single statement the leader ran before batching (``DELETE ... WHERE exp_time <= now``).

Checks that the work happened: every acknowledged store is a row, every dumped mailbox has
no deliverable row left, the expiry deleted exactly the expired rows and no other.

    python -m bench.bench_full_silo --rows 1000000 --users 100000 --json full.json

A scratch database is created next to the one named in ``--dsn`` and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_store import _admin, _with_database, drive, machine_info
from msilo.leader.cycles import EXPIRY_PAUSE, delete_expired_in_batches
from msilo.routing.delivery import DeliverySettings
from msilo.storage import BatchWriter, NewMessage, SiloNames, StoreOutcome
from msilo.storage.postgres import PostgresStore

DOMAIN = "example.com"
LIFETIME = 259200  # three days, as bench_store's rows
BODY = b"Hello! This is an offline message of a typical length, about a tweet long."
CTYPE = "text/plain; charset=UTF-8"
COLUMNS = (
    "username", "domain", "src_addr", "dst_addr", "body", "ctype",
    "inc_time", "exp_time", "snd_time", "dedupe_key", "callid",
)  # fmt: skip
CHUNK = DeliverySettings().chunk  # rows per claim, as the server's dump
DEVICE = "<urn:uuid:00000000-0000-4000-8000-00000000b00c>"


# --- loading ------------------------------------------------------------------------------


def silo_rows(
    rows: int, users: int, expired: int, reminders: float, now: int, tag: str
) -> Iterator[tuple[Any, ...]]:
    """``rows`` rows in arrival order, round-robin over ``users`` mailboxes: the first
    ``expired`` long expired (expiry takes the oldest), a ``reminders`` share of the rest
    scheduled for tomorrow."""
    pick = random.Random(19)
    for i in range(rows):
        user = f"u{i % users}"
        exp = now - 3600 - (expired - i) if i < expired else now + 86400 + i
        snd = now + 86400 if i >= expired and pick.random() < reminders else 0
        yield (
            user, DOMAIN, "sip:sender@example.org", f"sip:{user}@{DOMAIN}", BODY, CTYPE,
            exp - LIFETIME, exp, snd, f"{tag}-{i}@bench;1;tag{i}", f"{tag}-{i}@bench",
        )  # fmt: skip


async def load(
    dsn: str, table: str, rows: int, users: int, expired: int, reminders: float, tag: str
) -> float:
    """COPY the rows into ``table`` (indexes in place, as on a live server), then VACUUM
    ANALYZE; returns the seconds it took."""
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        now = int(time.time())
        records = silo_rows(rows, users, expired, reminders, now, tag)
        step = 100_000
        for start in range(0, rows, step):
            part = [next(records) for _ in range(min(step, rows - start))]
            await conn.copy_records_to_table(table, records=part, columns=COLUMNS)
        await conn.execute(f'VACUUM ANALYZE "{table}"')
        await conn.execute("CHECKPOINT")  # the load's dirty pages are not the run's
    finally:
        await conn.close()
    return time.perf_counter() - t0


# --- dump ---------------------------------------------------------------------------------


@dataclass
class DumpRate:
    mode: str
    mailboxes: int
    rows: int
    seconds: float
    rows_per_s: float
    mailbox_p50_ms: float
    mailbox_p99_ms: float


def pct(sorted_values: list[float], p: float) -> float:
    """The ``p`` quantile, in ms."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))] * 1000


async def dump(store: PostgresStore, users: list[str], concurrency: int, mode: str) -> DumpRate:
    """Empty each mailbox as the dump path does: claim a chunk, settle each delivered row on
    its own (the store coalesces concurrent settles).  ``first`` (OpenSIPS's): the row is
    leased and deleted; ``all`` (per device, the default): the (row, device) pair is leased
    in the ledger and the row goes once its one device has it."""
    todo = list(users)
    rows = 0
    per_mailbox: list[float] = []
    memory = DeliverySettings().device_memory
    if mode == "all":  # the REGISTER that starts a dump remembers the device (not timed)
        for k in range(0, len(users), 64):
            await asyncio.gather(
                *(store.touch_devices(u, DOMAIN, [DEVICE], now=int(time.time()))
                  for u in users[k : k + 64])
            )  # fmt: skip

    async def dumper() -> None:
        nonlocal rows
        lease = {"lease_owner": "bench", "lease_seconds": 600}
        while todo:
            user = todo.pop()
            t0 = time.perf_counter()
            while True:
                now = int(time.time())
                if mode == "first":
                    claimed = await store.claim_for_dump(
                        user,
                        DOMAIN,
                        now=now,
                        limit=CHUNK,
                        **lease,  # type: ignore[arg-type]
                    )
                    done = [store.delete_delivered([m.mid]) for m in claimed]
                else:
                    pairs = await store.claim_for_device(
                        user,
                        DOMAIN,
                        DEVICE,
                        now=now,
                        limit=CHUNK,
                        **lease,  # type: ignore[arg-type]
                    )
                    claimed = [m for m, _ in pairs]
                    done = [
                        store.settle_delivered([(m.mid, DEVICE)], memory=memory) for m in claimed
                    ]
                if not claimed:
                    break
                gone = await asyncio.gather(*done)
                rows += sum(gone)  # after the await: ``rows +=`` across one would lose counts
            per_mailbox.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(dumper() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    per_mailbox.sort()
    return DumpRate(
        mode, len(users), rows, seconds, rows / seconds,
        pct(per_mailbox, 0.5), pct(per_mailbox, 0.99),
    )  # fmt: skip


async def check_dumped(dsn: str, table: str, users: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchval(
            f'SELECT count(*) FROM "{table}" WHERE username = ANY($1::text[]) '
            "AND snd_time = 0 AND exp_time > $2",
            users,
            int(time.time()),
        )
    finally:
        await conn.close()
    if left:
        raise SystemExit(f"{table}: {left} deliverable rows left in dumped mailboxes")


# --- store --------------------------------------------------------------------------------


@dataclass
class StoreRate:
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    acked: int


async def store_rate(
    dsn: str, store: PostgresStore, table: str, args: argparse.Namespace, tag: str
) -> StoreRate:
    """bench_store's group-commit driver on ``store``; every acknowledgement is a row."""
    d = await drive(store, "batch", args.callers, args, tag)
    conn = await asyncpg.connect(dsn)
    try:
        counted = await conn.fetchval(
            f'SELECT count(*) FROM "{table}" WHERE dedupe_key LIKE $1', f"{tag}%"
        )
    finally:
        await conn.close()
    if counted != d.acked:
        raise SystemExit(f"{table}: {d.acked} stores acknowledged but {counted} rows")
    return StoreRate(
        d.measured / d.elapsed, d.pct(0.5), d.pct(0.99), d.mean_batch("batch"), d.acked
    )


# --- expiry under a paced load ------------------------------------------------------------


@dataclass
class PacedLoad:
    """Stores at a fixed rate, one ``submit`` each; latency from the moment each was due
    (a stalled loop counts against it)."""

    writer: BatchWriter
    rate: float
    tag: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (due, latency)
    acked: int = 0
    _stop: bool = False

    async def run(self) -> None:
        start = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        n = 0
        while not self._stop:
            due_count = int((time.perf_counter() - start) * self.rate)
            while n < due_count:
                task = asyncio.create_task(self._one(n, start + n / self.rate))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*pending)

    async def _one(self, n: int, due: float) -> None:
        now = int(time.time())
        user = f"load{n % 1000}"
        msg = NewMessage(
            username=user, domain=DOMAIN, src_addr="sip:sender@example.org",
            dst_addr=f"sip:{user}@{DOMAIN}", body=BODY, ctype=CTYPE, inc_time=now,
            exp_time=now + LIFETIME, dedupe_key=f"{self.tag}-{n}@bench;1;tag",
        )  # fmt: skip
        result = await self.writer.submit(msg)
        if result.outcome is not StoreOutcome.STORED:
            raise AssertionError(f"row not stored: {result}")
        self.acked += 1
        self.samples.append((due, time.perf_counter() - due))

    def stop(self) -> None:
        self._stop = True

    def window(self, start: float, end: float) -> list[float]:
        return sorted(lat for due, lat in self.samples if start <= due < end)


@dataclass
class Expiry:
    how: str
    deleted: int
    cycle_s: float
    before_p50_ms: float
    before_p99_ms: float
    during_p50_ms: float
    during_p99_ms: float
    during_max_ms: float
    during_stores: int


async def expire_under_load(
    dsn: str, store: PostgresStore, table: str, how: str, args: argparse.Namespace
) -> Expiry:
    """The paced load for ``--before`` s, then one expiry cycle (``batched``: the leader's
    now; ``one statement``: what it ran before) while the load goes on, then ``--after`` s."""
    writer = BatchWriter(store, max_messages=args.max_messages, max_batch=args.max_batch)
    load = PacedLoad(writer, args.load_rate, f"{how[:3]}{uuid.uuid4().hex[:6]}")
    runner = asyncio.create_task(load.run())
    t_load = time.perf_counter()
    await asyncio.sleep(args.before)
    now = int(time.time())
    t0 = time.perf_counter()
    if how == "batched":
        deleted = await delete_expired_in_batches(
            store, now, batch=args.expiry_batch, pause=args.expiry_pause
        )
    else:
        conn = await asyncpg.connect(dsn)
        try:
            status = await conn.execute(f'DELETE FROM "{table}" WHERE exp_time <= $1', now)
        finally:
            await conn.close()
        deleted = int(status.split()[-1])
    t1 = time.perf_counter()
    await asyncio.sleep(args.after)
    load.stop()
    await runner
    await writer.close()

    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchval(f'SELECT count(*) FROM "{table}" WHERE exp_time <= $1', now)
        stored = await conn.fetchval(
            f'SELECT count(*) FROM "{table}" WHERE dedupe_key LIKE $1', f"{load.tag}-%"
        )
    finally:
        await conn.close()
    if left or deleted != args.expired:
        raise SystemExit(f"{how}: deleted {deleted} of {args.expired}, {left} expired left")
    if stored != load.acked:
        raise SystemExit(f"{how}: {load.acked} stores acknowledged but {stored} rows")
    before = load.window(t_load + 1.0, t0)  # the first second warms the writer up
    during = load.window(t0, t1)
    return Expiry(
        how, deleted, t1 - t0, pct(before, 0.5), pct(before, 0.99),
        pct(during, 0.5), pct(during, 0.99), pct(during, 1.0), len(during),
    )  # fmt: skip


# --- the run ------------------------------------------------------------------------------


async def open_table(dsn: str, table: str, pool_size: int, warm: bool = False) -> PostgresStore:
    """``warm``: as a serving process opens it (every connection's first statements run
    before the load: a cold connection's first store costs tens of milliseconds)."""
    store = PostgresStore(
        dsn, SiloNames(table=table), min_size=pool_size, max_size=pool_size, warm=warm
    )
    await store.open()
    await store.create_schema()
    return store


async def measure(
    dsn: str, table: str, users: dict[str, list[str]], args: argparse.Namespace, tag: str
) -> tuple[list[DumpRate], StoreRate]:
    """Dump the mailboxes of ``table`` (``users`` per dump mode), then the store rate on it."""
    store = await open_table(dsn, table, args.pool_size)
    try:
        dumps = []
        for mode, mailboxes in users.items():
            dumps.append(await dump(store, mailboxes, args.dump_concurrency, mode))
            await check_dumped(dsn, table, mailboxes)
        return dumps, await store_rate(dsn, store, table, args, tag)
    finally:
        await store.close()


def _split(users: list[str], modes: list[str]) -> dict[str, list[str]]:
    n = len(users) // len(modes)
    return {mode: users[k * n : (k + 1) * n] for k, mode in enumerate(modes)}


async def run(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    per_user = args.rows // args.users
    modes = args.deliver_to
    per_round = args.dump_users * len(modes)  # mailboxes dumped per table and round
    small = per_round * per_user
    samples = random.Random(2).sample(range(args.users), per_round * args.rounds)
    out: dict[str, Any] = {"rounds": []}

    full_t = f"silo_full_{uuid.uuid4().hex[:6]}"
    await (await open_table(dsn, full_t, 1)).close()
    out["load_s"] = await load(dsn, full_t, args.rows, args.users, args.expired,
                               args.reminders, "full")  # fmt: skip
    conn = await asyncpg.connect(dsn)
    mb = await conn.fetchval(f"SELECT pg_total_relation_size('\"{full_t}\"') / 1048576")
    await conn.close()
    out["full_table_mb"] = mb
    print(f"loaded {args.rows} rows in {out['load_s']:.1f} s ({mb} MB with indexes)")
    print(
        f"{'round':<6}{'table':<7}"
        + "".join(f"{'dump ' + m + ' r/s':>15}{'p99':>7}" for m in modes)
        + f"{'store r/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'batch':>7}"
    )

    # Empty and full measured in turns, the order swapped every round (ABBA): the VM's
    # speed drifts over minutes, and a ratio of two neighbours is what it cannot skew.
    for r in range(args.rounds):
        result: dict[str, Any] = {}

        async def empty_table(r: int = r, result: dict[str, Any] = result) -> None:
            # A fresh silo holding only the mailboxes to dump, each with the full mix.
            t = f"silo_empty{r}_{uuid.uuid4().hex[:6]}"
            await (await open_table(dsn, t, 1)).close()
            await load(dsn, t, small, per_round, small * args.expired // args.rows,
                       args.reminders, f"empty{r}")  # fmt: skip
            users = _split([f"u{i}" for i in range(per_round)], modes)
            result["empty"] = await measure(dsn, t, users, args, f"e{r}-")

        async def full_table(r: int = r, result: dict[str, Any] = result) -> None:
            picked = samples[r * per_round : (r + 1) * per_round]
            users = _split([f"u{i}" for i in picked], modes)
            result["full"] = await measure(dsn, full_t, users, args, f"f{r}-")

        for step in (empty_table, full_table) if r % 2 == 0 else (full_table, empty_table):
            await step()
        for which in ("empty", "full"):
            print_row(r, which, *result[which])
        (e_dumps, e_store), (f_dumps, f_store) = result["empty"], result["full"]
        out["rounds"].append(
            {
                "empty": {"dump": e_dumps, "store": e_store},
                "full": {"dump": f_dumps, "store": f_store},
                "dump_ratio": {
                    e.mode: f.rows_per_s / e.rows_per_s
                    for e, f in zip(e_dumps, f_dumps, strict=True)
                },
                "store_ratio": f_store.rows_per_s / e_store.rows_per_s,
            }
        )
    rounds = out["rounds"]
    out["dump_ratio"] = {m: statistics.median(x["dump_ratio"][m] for x in rounds) for m in modes}
    out["store_ratio"] = statistics.median(x["store_ratio"] for x in rounds)
    for m in modes:
        per = " ".join(f"{x['dump_ratio'][m]:.2f}" for x in rounds)
        print(f"full/empty dump {m}: {per} (median {out['dump_ratio'][m]:.2f})")
    per = " ".join(f"{x['store_ratio']:.2f}" for x in rounds)
    print(f"full/empty store: {per} (median {out['store_ratio']:.2f})")

    # Expiry of the oldest rows while stores go on: batched, then one statement.
    print()
    print(
        f"{'expiry':<15}{'deleted':>9}{'cycle s':>9}{'before p50':>12}{'p99':>8}"
        f"{'during p50':>12}{'p99':>8}{'max':>8}{'stores':>8}"
    )
    out["expiry"] = []
    full = await open_table(dsn, full_t, args.pool_size, warm=True)
    for how in args.expiry:
        if out["expiry"]:  # the expired rows again, and the dead ones gone, as autovacuum would
            await load(dsn, full_t, args.expired, args.users, args.expired, 0.0,
                       f"again{len(out['expiry'])}")  # fmt: skip
        else:
            conn = await asyncpg.connect(dsn)
            await conn.execute(f'VACUUM ANALYZE "{full_t}"')
            await conn.execute("CHECKPOINT")
            await conn.close()
        e = await expire_under_load(dsn, full, full_t, how, args)
        out["expiry"].append(e)
        print(
            f"{e.how:<15}{e.deleted:>9}{e.cycle_s:>9.2f}{e.before_p50_ms:>12.2f}"
            f"{e.before_p99_ms:>8.2f}{e.during_p50_ms:>12.2f}{e.during_p99_ms:>8.2f}"
            f"{e.during_max_ms:>8.1f}{e.during_stores:>8}"
        )
    await full.close()
    return out


def print_row(r: int, table: str, dumps: list[DumpRate], s: StoreRate) -> None:
    print(
        f"{r:<6}{table:<7}"
        + "".join(f"{d.rows_per_s:>15.0f}{d.mailbox_p99_ms:>7.1f}" for d in dumps)
        + f"{s.rows_per_s:>11.0f}{s.p50_ms:>8.2f}{s.p99_ms:>8.2f}{s.mean_batch:>7.1f}"
    )


async def main(args: argparse.Namespace) -> int:
    scratch = f"msilo_bench_full_{uuid.uuid4().hex[:8]}"
    dsn = _with_database(args.dsn, scratch)
    if args.pg_set:  # asyncpg passes a DSN's query parameters as session settings
        dsn += "?" + urlencode([tuple(kv.split("=", 1)) for kv in args.pg_set])
    await _admin(args.dsn, f'CREATE DATABASE "{scratch}"')
    try:
        conn = await asyncpg.connect(dsn)
        settings = {
            k: await conn.fetchval(f"SHOW {k}")
            for k in ("server_version", "synchronous_commit", "shared_buffers", "autovacuum",
                      "full_page_writes", "wal_compression")
        }  # fmt: skip
        await conn.close()
        info = machine_info(settings.pop("server_version")) | settings
        print(" ".join(f"{k}={v}" for k, v in info.items()))
        print(
            f"rows={args.rows} users={args.users} expired={args.expired} "
            f"reminders={args.reminders} callers={args.callers} duration={args.duration}s "
            f"dump_users={args.dump_users}x{args.dump_concurrency} per mode "
            f"load_rate={args.load_rate}/s "
            f"expiry_batch={args.expiry_batch} pause={args.expiry_pause}s"
        )
        out = await run(dsn, args)
    finally:
        await _admin(args.dsn, f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
    if args.json:
        doc = {"machine": info, "args": vars(args), "results": out}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=asdict))
    ok = min(out["dump_ratio"].values()) >= 0.8 and out["store_ratio"] >= 0.8
    batched = next((e for e in out["expiry"] if e.how == "batched"), None)
    ok = ok and (batched is None or batched.during_p99_ms <= 20.0)
    print("goals met" if ok else "goals missed: ratios >= 0.8 and batched expiry p99 <= 20 ms")
    return 0 if ok or not args.strict else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--expired", type=int, default=200_000, help="oldest rows already expired")
    p.add_argument("--reminders", type=float, default=0.1, help="share with snd_time set")
    p.add_argument("--dump-users", type=int, default=2000, help="mailboxes per dump mode")
    p.add_argument("--dump-concurrency", type=int, default=32)
    p.add_argument(
        "--deliver-to",
        type=lambda s: s.split(","),
        default=["first", "all"],
        help="dump modes measured: first (OpenSIPS's row lease), all (per-device ledger)",
    )
    p.add_argument("--rounds", type=int, default=3, help="empty/full measurements, in turns")
    # bench_store.drive's knobs (the store measurement).
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0, help="store window, seconds")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--pool-size", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--max-messages", type=int, default=0, help="quota (0 = off)")
    p.add_argument("--owners", type=int, default=1, help="mailboxes per store caller")
    # The expiry step.
    p.add_argument("--load-rate", type=float, default=2000.0, help="stores/s during expiry")
    p.add_argument("--before", type=float, default=5.0, help="seconds of load before the cycle")
    p.add_argument("--after", type=float, default=1.0)
    p.add_argument("--expiry-batch", type=int, default=PostgresStore.expiry_batch)
    p.add_argument("--expiry-pause", type=float, default=EXPIRY_PAUSE)
    p.add_argument(
        "--expiry",
        type=lambda s: s.split(","),
        default=["batched", "single"],
        help="expiry runs, in order: batched (the leader's), single (one DELETE, as before)",
    )
    p.add_argument(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a session setting on every connection of the run, e.g. wal_compression=lz4",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if not ns.no_uvloop:
        import uvloop

        uvloop.install()
    raise SystemExit(asyncio.run(main(ns)))
