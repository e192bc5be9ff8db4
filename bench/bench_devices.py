"""Several devices per user, end to end: the dump with two devices against one, and the
store path A/B against the commit before per-device delivery.

    python -m bench.bench_devices dump                       # 1 vs 2 devices, same server
    python -m bench.bench_devices store --base /work/wt-base  # A/B store ladder (sipp)
    python -m bench.bench_devices all --base /work/wt-base --json out.json

**dump** runs one ``msilo serve`` (registrar mode, 2 workers, ``msilo.add_date=false``,
PostgreSQL, ``deliver_to`` at its default ``all``) and, in alternating rounds on that same
server, a group of users with one device each and a group with two devices each. Both
groups get the same number of deliveries (the two-device group has half the users), so
the only difference is the ledger's work per (message, device). Per group:

1. every device (its own UDP socket, its own ``+sip.instance``) REGISTERs once with
   ``Expires: 60``, so msilo remembers it; then its location rows are deleted directly in
   the database (the binding lapses; ``Expires: 0`` would forget the device);
2. M MESSAGEs per user are sent over SIP (every one must be answered 202);
3. the clock starts and every device REGISTERs again (shuffled order) at the offered
   rate; each answers every MESSAGE it gets with 200. The clock stops when the group's
   rows are gone from the silo (polled every 50 ms). Deliveries/s = MESSAGEs answered
   200 (distinct transactions) / that time. The run fails unless every message reached
   every device of its user exactly once, no row and no ledger row is left, and every
   REGISTER and MESSAGE got its expected answer.

**store** reuses ``bench.e2e``'s sipp store step (``bench/e2e/store_bench_uac.xml`` to 10,000
offline users; a step passes with zero failed calls, zero retransmissions, rows = 202s and
>= 95 % of the rate answered in the window) against ``msilo serve`` run from the baseline
checkout (A: ``PYTHONPATH=<base> python -m msilo serve`` from that directory) and from
this one (B), alternating A, B / B, A at each rate of the ladder, each step on a freshly
started server and an emptied table.

Every loop is bounded in count and time; every process started is stopped at the end,
also on failure; each database is created for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_devices.py` as well as `-m`
    sys.path.insert(0, str(ROOT))

from bench.e2e import sipp, steps  # noqa: E402
from bench.e2e.procs import BenchError, Proc, free_port, wait_for_sip  # noqa: E402
from bench.e2e.report import machine_info  # noqa: E402
from bench.e2e.servers import (  # noqa: E402
    HOST,
    MsiloServer,
    database_dsn,
    drop_database,
)
from bench.e2e.workloads import WORKLOADS, Workload  # noqa: E402

T1, T2 = 0.5, 4.0  # RFC 3261 Timer E: retransmit at T1, doubling, capped at T2
GIVE_UP = 16.0  # seconds a request is retransmitted before it counts as unanswered
TICKS = os.sysconf("SC_CLK_TCK")


# --- servers ---------------------------------------------------------------------------------


class CheckoutServer(MsiloServer):
    """``msilo serve`` from a given checkout: ``PYTHONPATH=<root> python -m msilo``, run
    from that directory so it imports its own code (and its own C parser)."""

    def __init__(
        self,
        admin_dsn: str,
        database: str,
        workdir: Path,
        workers: int,
        root: Path,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(admin_dsn, database, workdir, workers)
        self.root = root
        self.extra = extra or {}
        self.name = f"msilo@{root.name}"

    def _msilo(self) -> list[str]:
        # env(1) execs python: the server is still the process-group leader we signal.
        return ["env", f"PYTHONPATH={self.root}", sys.executable, "-m", "msilo"]

    def settings(self) -> list[str]:
        sets = super().settings()
        for key, value in self.extra.items():
            sets += ["--set", f"{key}={value}"]
        return sets

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        argv = [*self._msilo(), "serve", *self.settings()]
        self.info["command"] = " ".join(argv)
        self.info["commit"] = _git_head(self.root)
        log = self.workdir / f"{self.name.replace('@', '-')}.log"
        self.proc = Proc(self.name, argv, log, cwd=self.root)
        wait_for_sip(self.proc, HOST, self.port, timeout=60)

    def worker_pids(self) -> list[int]:
        """The supervisor and its children (the workers)."""
        if self.proc is None:
            return []
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *(int(c) for c in children)]


def _git_head(root: Path) -> str:
    """The short commit of the checkout at ``root`` (what A and B really ran)."""
    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip() or "?"


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (0 for any that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


# --- a minimal SIP UA pool over asyncio UDP ----------------------------------------------------

_KEY = re.compile(rb"k=([\w-]+\.\d+)")
_ECHO = (b"via:", b"v:", b"from:", b"f:", b"call-id:", b"i:", b"cseq:")
_TO = (b"to:", b"t:")


def _status(data: bytes) -> int | None:
    if data.startswith(b"SIP/2.0 ") and data[8:11].isdigit():
        return int(data[8:11])
    return None


def _header(head: list[bytes], names: tuple[bytes, ...]) -> bytes | None:
    for line in head:
        low = line[:10].lower()
        if low.startswith(names):
            return line.split(b":", 1)[1].strip()
    return None


class Agent(asyncio.DatagramProtocol):
    """One UDP socket: sends requests (retransmitted on Timer E until answered) and
    answers every MESSAGE it receives with 200, counting distinct transactions by key.

    Parsing is kept to splitting lines: the agent must not be what limits the dump.
    """

    def __init__(self, user: str, instance: str | None) -> None:
        self.user = user
        self.instance = instance
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[int]] = {}
        self.seen: set[tuple[bytes, bytes]] = set()  # (Call-ID, CSeq) of MESSAGEs
        self.keys: Counter[str] = Counter()  # key -> distinct transactions carrying it
        self.call_ids: dict[str, set[bytes]] = {}  # key -> Call-IDs it arrived with
        self.received = 0  # MESSAGE datagrams, retransmissions included
        self.unkeyed = 0
        self.last_arrival = 0.0
        self.cseq = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not an asyncio.DatagramTransport subclass.
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        code = _status(data)
        if code is not None:
            if code < 200:
                return
            head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            via = _header(head, (b"via:", b"v:")) or b""
            m = re.search(rb"branch=([^;,\s]+)", via)
            future = self.waiting.get(m.group(1) if m else b"")
            if future is not None and not future.done():
                future.set_result(code)
            return
        if not data.startswith(b"MESSAGE "):
            return  # nothing else is expected here; no answer is as good as any
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        head = head_bytes.split(b"\r\n")
        out = [b"SIP/2.0 200 OK"]
        call_id = cseq = b""
        for line in head[1:]:
            low = line[:10].lower()
            if low.startswith(_ECHO):
                out.append(line)
                if low.startswith((b"call-id:", b"i:")):
                    call_id = line.split(b":", 1)[1].strip()
                elif low.startswith(b"cseq:"):
                    cseq = line.split(b":", 1)[1].strip()
            elif low.startswith(_TO):
                out.append(
                    line if b"tag=" in line else line + b";tag=dev" + str(self.port).encode()
                )
        out.append(b"Content-Length: 0\r\n\r\n")
        assert self.transport is not None
        self.transport.sendto(b"\r\n".join(out), addr)
        self.received += 1
        if (call_id, cseq) in self.seen:
            return  # a retransmission (our 200 was lost or late): answered, not counted
        self.seen.add((call_id, cseq))
        self.last_arrival = time.monotonic()
        match = _KEY.search(body)
        if match is None:
            self.unkeyed += 1
            return
        key = match.group(1).decode()
        self.keys[key] += 1
        self.call_ids.setdefault(key, set()).add(call_id)

    def build(
        self, method: str, ruri: str, headers: list[str], body: bytes = b""
    ) -> tuple[bytes, bytes]:
        self.cseq += 1
        branch = f"z9hG4bK{self.port}x{self.cseq}x{random.getrandbits(32):x}"
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            *headers,
            f"CSeq: {self.cseq} {method}",
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, branch.encode()

    async def send(self, data: bytes, branch: bytes, server: tuple[str, int]) -> int | None:
        """Send, retransmit on Timer E; the final status, or None after ``GIVE_UP`` s."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self.waiting[branch] = future
        deadline = loop.time() + GIVE_UP
        interval = T1
        try:
            for _ in range(64):  # bounded: GIVE_UP / T1 sends at most
                assert self.transport is not None
                self.transport.sendto(data, server)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), min(interval, remaining))
                interval = min(interval * 2, T2)
            return None
        finally:
            self.waiting.pop(branch, None)

    async def register(self, server: tuple[str, int], expires: int) -> int | None:
        contact = f"<sip:{self.user}@{HOST}:{self.port}>"
        if self.instance:
            contact += f';+sip.instance="<urn:uuid:{self.instance}>"'
        headers = [
            f"From: <sip:{self.user}@{HOST}>;tag=r{self.port}",
            f"To: <sip:{self.user}@{HOST}>",
            f"Call-ID: reg-{self.user}-{self.port}@{HOST}",
            f"Contact: {contact}",
            f"Expires: {expires}",
        ]
        data, branch = self.build("REGISTER", f"sip:{HOST}:{server[1]}", headers)
        return await self.send(data, branch, server)

    async def message(self, server: tuple[str, int], to_user: str, body: bytes) -> int | None:
        n = self.cseq + 1
        headers = [
            f"From: <sip:{self.user}@{HOST}>;tag=s{self.port}x{n}",
            f"To: <sip:{to_user}@{HOST}:{server[1]}>",
            f"Call-ID: m{n}-{self.port}-{random.getrandbits(40):x}@{HOST}",
            "Content-Type: text/plain",
        ]
        data, branch = self.build("MESSAGE", f"sip:{to_user}@{HOST}:{server[1]}", headers, body)
        return await self.send(data, branch, server)


async def open_agent(
    user: str, instance: str | None, factory: Callable[[], Agent] | None = None
) -> Agent:
    """An agent (``factory()``, default ``Agent(user, instance)``) on its own UDP socket."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        factory or (lambda: Agent(user, instance)), local_addr=(HOST, 0)
    )
    # uvloop may call connection_made after this returns: set both here.
    protocol.transport = transport
    protocol.port = transport.get_extra_info("sockname")[1]
    return protocol


async def paced(
    jobs: list[Any], rate: float, run: Any, limit: float
) -> tuple[list[Any], list[float]]:
    """``run(job)`` for every job, started at ``rate``/s; (results, seconds each took).
    Bounded: the whole batch gives up after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    took: list[float] = [math.nan] * len(jobs)

    async def one(i: int, job: Any) -> Any:
        t0 = loop.time()
        result = await run(job)
        took[i] = loop.time() - t0
        return result

    tasks = []
    for i, job in enumerate(jobs):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, job)))
    done = await asyncio.wait_for(asyncio.gather(*tasks), limit)
    return list(done), took


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN when empty)."""
    clean = sorted(v for v in values if not math.isnan(v))
    return sipp.percentile(clean, p)


# --- workload 1: dump, one device vs two ------------------------------------------------------


@dataclass
class GroupResult:
    """One group's drain."""

    name: str
    devices_per_user: int
    users: int
    messages_per_user: int
    deliveries: int = 0  # distinct MESSAGE transactions answered 200 by the devices
    expected: int = 0
    seconds_to_empty: float = math.nan
    seconds_to_last_delivery: float = math.nan
    register_p50_ms: float = math.nan
    register_p99_ms: float = math.nan
    server_retransmissions: int = 0
    msilo_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0
    db: dict[str, int] = field(default_factory=dict)  # pg_stat_database deltas
    reasons: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds_to_empty if self.seconds_to_empty > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["deliveries_per_s"] = self.rate
        out["passed"] = not self.reasons
        return out


DB_COUNTERS = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "tup_fetched")


class DumpBench:
    """One server, groups of users drained one after another."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.database = f"msilo_devbench_{os.getpid()}"
        self.server = CheckoutServer(
            args.dsn,
            self.database,
            workdir,
            args.workers,
            ROOT,
            extra={"msilo.add_date": "false"},
        )
        self.dsn = database_dsn(args.dsn, self.database)
        self.rng = random.Random(args.seed)

    async def _pg(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=10)

    async def _backend_pids(self, conn: asyncpg.Connection) -> list[int]:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.database,
        )
        return [int(r[0]) for r in rows]

    async def _db_counters(self, conn: asyncpg.Connection) -> dict[str, int]:
        # Cumulative statistics are flushed by backends at most once a second (PG 15).
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await conn.fetchrow(
            f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database WHERE datname = $1",
            self.database,
        )
        return {k: int(row[k]) for k in DB_COUNTERS}

    async def run_group(self, name: str, devices: int, users: int) -> GroupResult:
        args = self.args
        per_user = args.messages
        server = (HOST, self.server.port)
        res = GroupResult(name, devices, users, per_user, expected=users * devices * per_user)
        prefix = f"{name}-"
        names = [f"{prefix}u{i}" for i in range(users)]
        agents = {
            u: [
                await open_agent(u, str(uuid.UUID(int=self.rng.getrandbits(128))))
                for _ in range(devices)
            ]
            for u in names
        }
        everyone = [a for u in names for a in agents[u]]
        senders = [await open_agent(f"sender{i}", None) for i in range(args.senders)]
        conn = await self._pg()
        try:
            # 1. Remember every device, then let its binding lapse.
            codes, _ = await paced(
                everyone, args.setup_rate, lambda a: a.register(server, 60), limit=600
            )
            if any(c != 200 for c in codes):
                raise BenchError(f"{name}: remembering REGISTERs answered {Counter(codes)}")
            await conn.execute("DELETE FROM location WHERE username LIKE $1", prefix + "%")
            known = await conn.fetchval(
                "SELECT count(*) FROM msilo_device WHERE username LIKE $1", prefix + "%"
            )
            if known != len(everyone):
                raise BenchError(f"{name}: {known} devices remembered, {len(everyone)} registered")

            # 2. Store M messages per user over SIP; every one must be stored (202).
            jobs = [(u, n) for n in range(1, per_user + 1) for u in names]

            def store(job: tuple[str, int], _i: list[int] = [0]) -> Any:  # noqa: B006
                _i[0] += 1
                user, n = job
                body = f"k={user}.{n} stored while away: lorem ipsum dolor sit amet".encode()
                return senders[_i[0] % len(senders)].message(server, user, body)

            codes, _ = await paced(jobs, args.store_rate, store, limit=900)
            if any(c != 202 for c in codes):
                raise BenchError(f"{name}: storing MESSAGEs answered {Counter(codes)}")
            rows = await conn.fetchval(
                "SELECT count(*) FROM silo WHERE username LIKE $1", prefix + "%"
            )
            if rows != len(jobs):
                raise BenchError(f"{name}: {rows} rows stored for {len(jobs)} 202s")
            await asyncio.sleep(args.settle)

            # 3. Drain: every device registers at the offered rate.
            order = list(everyone)
            self.rng.shuffle(order)
            reg_rate = args.rate / per_user
            backends = await self._backend_pids(conn)
            # Backends flush their statistics when idle, at most every second and else
            # within PGSTAT_IDLE_INTERVAL (10 s): wait that long around the drain.
            await asyncio.sleep(args.stats_wait)
            before_db = await self._db_counters(conn)
            cpu0 = (
                cpu_seconds(self.server.worker_pids()),
                cpu_seconds(backends),
                _self_cpu(),
            )
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            registering = asyncio.ensure_future(
                paced(order, reg_rate, lambda a: a.register(server, 600), limit=600)
            )
            left = -1
            deadline = t0 + args.drain_timeout
            for _ in range(int(args.drain_timeout / 0.05) + 1):
                await asyncio.sleep(0.05)
                left = await conn.fetchval(
                    "SELECT count(*) FROM silo WHERE username LIKE $1", prefix + "%"
                )
                if left == 0 or loop.time() > deadline:
                    break
            t_empty = loop.time()
            cpu1 = (
                cpu_seconds(self.server.worker_pids()),
                cpu_seconds(backends),
                _self_cpu(),
            )
            codes, took = await registering
            await asyncio.sleep(args.stats_wait)  # also: late retransmissions are seen
            after_db = await self._db_counters(conn)
            ledger_left = await conn.fetchval(
                "SELECT count(*) FROM msilo_silo_delivery l WHERE NOT EXISTS "
                "(SELECT 1 FROM silo m WHERE m.mid = l.mid)"
            )
            ledger_rows = await conn.fetchval("SELECT count(*) FROM msilo_silo_delivery")
        finally:
            await conn.close()
            for a in everyone + senders:
                if a.transport is not None:
                    a.transport.close()

        res.msilo_cpu_s = cpu1[0] - cpu0[0]
        res.postgres_cpu_s = cpu1[1] - cpu0[1]
        res.bench_cpu_s = cpu1[2] - cpu0[2]
        res.db = {k: after_db[k] - before_db[k] for k in DB_COUNTERS}
        res.seconds_to_empty = t_empty - t0 if left == 0 else math.nan
        last = max(a.last_arrival for a in everyone)
        res.seconds_to_last_delivery = last - t0 if last else math.nan
        ms = [t * 1000 for t in took]
        res.register_p50_ms, res.register_p99_ms = pct(ms, 50), pct(ms, 99)
        res.deliveries = sum(sum(a.keys.values()) for a in everyone)
        res.server_retransmissions = sum(a.received - len(a.seen) for a in everyone)

        # Every message to every device of its user, exactly once.
        missing = duplicated = foreign = 0
        multi_callid = 0
        for user in names:
            want = {f"{user}.{n}" for n in range(1, per_user + 1)}
            for agent in agents[user]:
                got = agent.keys
                missing += len(want - set(got))
                duplicated += sum(c - 1 for k, c in got.items() if k in want and c > 1)
                foreign += sum(c for k, c in got.items() if k not in want) + agent.unkeyed
            # One identity per message: both devices saw it under one Call-ID.
            for key in want:
                ids: set[bytes] = set()
                for agent in agents[user]:
                    ids |= agent.call_ids.get(key, set())
                multi_callid += len(ids) > 1
        checks = [
            (left == 0, f"{left} rows left in the silo after {args.drain_timeout:.0f} s"),
            (all(c == 200 for c in codes), f"drain REGISTERs answered {Counter(codes)}"),
            (missing == 0, f"{missing} (message, device) deliveries missing"),
            (duplicated == 0, f"{duplicated} messages delivered twice to one device"),
            (foreign == 0, f"{foreign} MESSAGEs to a device that should not get them"),
            (res.deliveries == res.expected, f"{res.deliveries} deliveries of {res.expected}"),
            (ledger_left == 0, f"{ledger_left} ledger rows of deleted messages left"),
            (ledger_rows == 0, f"{ledger_rows} ledger rows left"),
            (multi_callid == 0, f"{multi_callid} messages reached devices under two Call-IDs"),
        ]
        res.reasons = [why for ok, why in checks if not ok]
        return res

    async def run(self) -> list[GroupResult]:
        args = self.args
        results: list[GroupResult] = []
        users_one = args.users
        users_two = max(1, args.users // 2)
        plan: list[tuple[str, int, int]] = []
        for r in range(args.rounds):
            one = (f"r{r}d1", 1, users_one)
            two = (f"r{r}d2", 2, users_two)
            plan += [one, two] if r % 2 == 0 else [two, one]
        for name, devices, users in plan:
            res = await self.run_group(name, devices, users)
            results.append(res)
            print(group_row(res), flush=True)
        return results


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


GROUP_HEADER = (
    "| group | devices/user | users | deliveries | s to empty | deliveries/s "
    "| REGISTER p50 / p99 ms | msilo CPU ms/delivery | PG backend CPU ms/delivery "
    "| commits/delivery | rows ins+upd+del/delivery | result |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


def group_row(r: GroupResult) -> str:
    n = max(1, r.deliveries)
    writes = r.db.get("tup_inserted", 0) + r.db.get("tup_updated", 0) + r.db.get("tup_deleted", 0)
    return (
        f"| {r.name} | {r.devices_per_user} | {r.users} | {r.deliveries}/{r.expected} "
        f"| {r.seconds_to_empty:.2f} | {r.rate:.0f} "
        f"| {r.register_p50_ms:.1f} / {r.register_p99_ms:.1f} "
        f"| {1000 * r.msilo_cpu_s / n:.3f} | {1000 * r.postgres_cpu_s / n:.3f} "
        f"| {r.db.get('xact_commit', 0) / n:.2f} | {writes / n:.2f} "
        f"| {'ok' if not r.reasons else 'FAIL: ' + '; '.join(r.reasons)} |"
    )


def dump_summary(results: list[GroupResult], target: float) -> dict[str, Any]:
    """Total deliveries / total seconds per device count, and the two/one ratio."""
    out: dict[str, Any] = {}
    for d in (1, 2):
        groups = [r for r in results if r.devices_per_user == d]
        secs = sum(r.seconds_to_empty for r in groups)
        out[f"devices{d}_deliveries_per_s"] = (
            sum(r.deliveries for r in groups) / secs if secs else 0
        )
        out[f"devices{d}_per_round"] = [round(r.rate) for r in groups]
    one = out["devices1_deliveries_per_s"]
    out["ratio"] = out["devices2_deliveries_per_s"] / one if one else 0.0
    out["target"] = target
    out["passed"] = out["ratio"] >= target and all(not r.reasons for r in results)
    return out


def run_dump(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = DumpBench(args, workdir)
    bench.server.prepare()
    try:
        bench.server.start()
        try:
            print(GROUP_HEADER, flush=True)
            results = asyncio.run(bench.run())
        finally:
            bench.server.stop()
    finally:
        drop_database(args.dsn, bench.database)
    summary = dump_summary(results, args.dump_target)
    print(
        f"\ndump: one device {summary['devices1_deliveries_per_s']:.0f}/s "
        f"{summary['devices1_per_round']}, "
        f"two devices {summary['devices2_deliveries_per_s']:.0f}/s "
        f"{summary['devices2_per_round']}, ratio {summary['ratio']:.2f} "
        f"(goal >= {args.dump_target}): {'PASS' if summary['passed'] else 'FAIL'}",
        flush=True,
    )
    return {
        "server": bench.server.info,
        "groups": [r.as_dict() for r in results],
        "summary": summary,
    }


# --- workload 2: store A/B ---------------------------------------------------------------------


def parse_ladder(text: str) -> list[int]:
    start, step, top = (int(x) for x in text.split(":"))
    if start <= 0 or step <= 0 or top < start:
        raise argparse.ArgumentTypeError("START:STEP:MAX with 0 < START <= MAX, STEP > 0")
    return list(range(start, top + 1, step))


def run_store(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import dataclasses

    wl: Workload = dataclasses.replace(
        WORKLOADS["store"], warmup=args.warmup, duration=args.duration
    )
    opts = steps.Options(uas_linger_ms=4000, sipp_grace=10.0)
    servers = {
        "A": CheckoutServer(
            args.dsn, f"msilo_devbench_a_{os.getpid()}", workdir, args.workers, args.base
        ),
        "B": CheckoutServer(
            args.dsn, f"msilo_devbench_b_{os.getpid()}", workdir, args.workers, ROOT
        ),
    }
    steps_out: list[dict[str, Any]] = []
    try:
        for s in servers.values():
            s.prepare()
        print(
            "| rate/s | order | server | commit | achieved/s | p50 ms | p90 ms | p99 ms "
            "| failed | retrans | rows/202s | result |\n"
            "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            flush=True,
        )
        plan = [(p, i, rate) for p in range(args.repeat) for i, rate in enumerate(args.rates)]
        failed: dict[str, int] = {}
        for p, i, rate in plan:
            if i == 0:
                failed = {"A": 0, "B": 0}  # each pass climbs the whole ladder again
            elif all(n >= args.failures for n in failed.values()):
                continue
            order = ["A", "B"] if (i + p) % 2 == 0 else ["B", "A"]
            for label in order:
                if failed[label] >= args.failures:
                    continue
                server = servers[label]
                stepdir = workdir / f"store-{p}-{label}-{rate}"
                stepdir.mkdir()
                server.start()
                try:
                    out = steps.run_store(server, wl, rate, stepdir, opts)
                finally:
                    server.stop()
                out.update(rate=rate, server=label, commit=server.info.get("commit"), repeat=p)
                steps_out.append(out)
                lat = out["latency_ms"]
                print(
                    f"| {rate} | {''.join(order)} | {label} | {server.info.get('commit')} "
                    f"| {out['achieved_rate']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} "
                    f"| {lat['p99']:.2f} | {out['failed']} | {out['retransmissions']} "
                    f"| {out['rows']}/{out['successful']} "
                    f"| {'ok' if out['passed'] else 'FAIL: ' + '; '.join(out['reasons'])} |",
                    flush=True,
                )
                if not out["passed"]:
                    failed[label] += 1
    finally:
        for s in servers.values():
            s.stop()
            with contextlib.suppress(BenchError):
                s.cleanup()
    summary = store_summary(steps_out, args.store_target)
    best = summary["best"]
    print(
        f"\nstore: highest passing rate A {best['A']}/s, B {best['B']}/s "
        f"(ratio {summary['rate_ratio']:.2f}); at the common rates p99 B/A median "
        f"{summary['p99_ratio_median']:.2f}, p50 B/A median {summary['p50_ratio_median']:.2f} "
        f"(goal within {args.store_target:.0%}): {'PASS' if summary['passed'] else 'FAIL'}",
        flush=True,
    )
    return {
        "servers": {k: s.info for k, s in servers.items()},
        "steps": steps_out,
        "summary": summary,
    }


def _best(steps_out: list[dict[str, Any]], label: str) -> float:
    """The median over passes of the highest rate ``label`` passed in the pass."""
    passes = sorted({s["repeat"] for s in steps_out})
    tops = [
        max(
            (
                s["rate"]
                for s in steps_out
                if s["server"] == label and s["passed"] and s["repeat"] == p
            ),
            default=0,
        )
        for p in passes
    ]
    return float(sipp.percentile(sorted(tops), 50)) if tops else 0.0


def store_summary(steps_out: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Highest passing rate of each and the B/A latency ratios at rates both passed."""
    best = {label: _best(steps_out, label) for label in ("A", "B")}
    by_rate: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for s in steps_out:
        if s["passed"]:
            by_rate.setdefault((s["repeat"], s["rate"]), {})[s["server"]] = s
    p99, p50 = [], []
    for pair in by_rate.values():
        if "A" in pair and "B" in pair:
            p99.append(pair["B"]["latency_ms"]["p99"] / pair["A"]["latency_ms"]["p99"])
            p50.append(pair["B"]["latency_ms"]["p50"] / pair["A"]["latency_ms"]["p50"])
    rate_ratio = best["B"] / best["A"] if best["A"] else 0.0
    p99_median = sipp.percentile(sorted(p99), 50) if p99 else math.nan
    p50_median = sipp.percentile(sorted(p50), 50) if p50 else math.nan
    return {
        "best": best,
        "rate_ratio": rate_ratio,
        "p99_ratios": p99,
        "p50_ratios": p50,
        "p99_ratio_median": p99_median,
        "p50_ratio_median": p50_median,
        "target": target,
        "passed": rate_ratio >= 1 - target and (math.isnan(p99_median) or p99_median <= 1 + target),
    }


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_devices",
        description="Several devices: dump 1 vs 2 devices/user; store A/B vs a baseline.",
    )
    p.add_argument("what", choices=("dump", "store", "all"))
    p.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--keep-work", action="store_true", help="keep logs and sipp traces")
    d = p.add_argument_group("dump")
    d.add_argument("--users", type=int, default=600, help="users of a one-device group (600)")
    d.add_argument("--messages", type=int, default=10, help="messages per user (10)")
    d.add_argument(
        "--rate",
        type=float,
        default=20000,
        help="offered deliveries/s while draining (REGISTER/s = rate / messages); "
        "above what the server does, so the drain time measures the server (20000)",
    )
    d.add_argument("--rounds", type=int, default=2, help="rounds of (1-device, 2-device) groups")
    d.add_argument("--store-rate", type=float, default=1500, help="MESSAGE/s while filling")
    d.add_argument("--setup-rate", type=float, default=500, help="REGISTER/s remembering devices")
    d.add_argument("--senders", type=int, default=8, help="sockets sending the stored MESSAGEs")
    d.add_argument("--settle", type=float, default=2.0, help="s of rest before each drain")
    d.add_argument(
        "--stats-wait", type=float, default=11.0, help="s for PostgreSQL's statistics to settle"
    )
    d.add_argument("--drain-timeout", type=float, default=120.0)
    d.add_argument("--seed", type=int, default=13)
    d.add_argument("--dump-target", type=float, default=0.8)
    s = p.add_argument_group("store")
    s.add_argument("--base", type=Path, default=Path("/work/wt-base"), help="baseline checkout")
    s.add_argument("--rates", type=parse_ladder, default=parse_ladder("1000:1000:6000"))
    s.add_argument("--duration", type=float, default=10.0, help="measuring window per step, s")
    s.add_argument("--warmup", type=float, default=2.0)
    s.add_argument("--repeat", type=int, default=2, help="passes over the ladder (2)")
    s.add_argument("--failures", type=int, default=1, help="failed steps that end a ladder")
    s.add_argument("--store-target", type=float, default=0.10)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    workdir = Path(tempfile.mkdtemp(prefix="msilo-devbench-"))
    result: dict[str, Any] = {"machine": machine_info(args.dsn), "args": vars(args)}
    ok = True
    try:
        if args.what in ("dump", "all"):
            result["dump"] = run_dump(args, workdir)
            ok &= result["dump"]["summary"]["passed"]
        if args.what in ("store", "all"):
            result["store"] = run_store(args, workdir)
            ok &= result["store"]["summary"]["passed"]
    except BenchError as exc:
        print(f"error: {exc}\n(work folder kept: {workdir})", file=sys.stderr)
        return 1
    finally:
        Proc.stop_all()
        result["load_average_at_end"] = os.getloadavg()
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
    if not args.keep_work and ok:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work folder: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
