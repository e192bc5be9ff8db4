"""10,000 idle SIP-over-WebSocket connections to one msilo (issue 17's benchmark).

One ``msilo serve`` (registrar mode, PostgreSQL in a database of its own, the default
two workers on this 2-CPU machine, ``ws:`` listener, ``limits.ws_ping`` at its default
30 s so the keep-alive timer runs as in production) and, from this process, N WebSocket
clients that each open a connection, REGISTER like JsSIP (``.invalid`` contact, reg-id,
+sip.instance) and then stay idle. Measured:

* the RSS growth of msilo's workers per connection: after the connections are open
  (handshake only) and after each has registered, against a warmed-up server
  (goal: <= 10 kB per connection);
* while they are all open: a new client connecting and registering, one after the
  other, ``--probes`` times: the REGISTER's round trip and connect + handshake +
  REGISTER, p50/p90/p99/max (goal: p99 <= 100 ms).

The open-file limit of this process and of the msilo it starts is raised first.

    PYTHONPATH=$PWD python3 bench/bench_ws_idle.py --connections 10000 \
        --dsn postgres://postgres@127.0.0.1:5432/postgres --json bench/RESULTS-ws-idle.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

if __package__ in (None, ""):  # run as a script: bench/ is a package of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e.procs import BenchError, Proc, wait_idle
from bench.e2e.servers import run_pg
from bench.e2e.sipp import summarize
from bench.wsload import SipWs, WsMsilo, connect, raise_nofile, register, status_of

GOAL_BYTES_PER_CONN = 10_000
GOAL_P99_MS = 100.0


async def _open(url: str, count: int, parallel: int) -> list[SipWs]:
    """``count`` connections, ``parallel`` handshakes at a time (a bounded burst)."""
    conns: list[SipWs] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            conns.append(await connect(url))

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 600)
    return conns


async def _register_all(conns: list[SipWs], parallel: int) -> int:
    """REGISTER every connection (user i on connection i); returns how many got 200."""
    gate = asyncio.Semaphore(parallel)
    ok = 0

    async def one(i: int, conn: SipWs) -> None:
        nonlocal ok
        async with gate:
            reply = await conn.request(register(conn, f"idle{i}", 1), timeout=30)
            ok += status_of(reply) == 200

    await asyncio.wait_for(asyncio.gather(*(one(i, c) for i, c in enumerate(conns))), 600)
    return ok


async def _probe(url: str, n: int) -> tuple[float, float]:
    """A new client: (REGISTER round trip ms, connect + handshake + REGISTER ms)."""
    started = time.monotonic()
    conn = await connect(url)
    sent = time.monotonic()
    reply = await conn.request(register(conn, f"probe{n}", 1), timeout=10)
    done = time.monotonic()
    conn.close()
    if status_of(reply) != 200:
        raise BenchError(f"probe {n}: {reply[:60]!r}")
    return (done - sent) * 1000, (done - started) * 1000


async def _settle(server: WsMsilo, seconds: float) -> int:
    """RSS after ``seconds`` of quiet (the allocator and the workers' timers settle)."""
    await asyncio.sleep(seconds)
    return server.workers_rss_kib()


async def measure(server: WsMsilo, args: argparse.Namespace) -> dict[str, Any]:
    url = server.url
    # Warm-up: every code path a connection and a REGISTER take, then closed again, so the
    # baseline is a server that has served (imports, caches, pools), not a cold one.
    warm = await _open(url, 200, 50)
    await _register_all(warm, 50)
    for conn in warm:
        conn.close()
    base = await _settle(server, 3.0)
    t0 = time.monotonic()
    conns = await _open(url, args.connections, args.parallel)
    opened_s = time.monotonic() - t0
    after_open = await _settle(server, 3.0)
    t0 = time.monotonic()
    registered = await _register_all(conns, args.parallel)
    register_s = time.monotonic() - t0
    after_register = await _settle(server, 3.0)
    rounds, totals = [], []
    for n in range(args.probes):
        rt, total = await _probe(url, n)
        rounds.append(rt)
        totals.append(total)
        await asyncio.sleep(args.probe_gap)
    # Still open at the end: none was dropped by the server meanwhile.
    still_open = sum(
        1 for c in conns if c.transport is not None and not c.transport.is_disconnected
    )
    rss_end = server.workers_rss_kib()
    for conn in conns:
        conn.close()
    n = args.connections
    per_open = (after_open - base) * 1024 / n
    per_registered = (after_register - base) * 1024 / n
    return {
        "connections": n,
        "opened_in_s": round(opened_s, 2),
        "registered": registered,
        "registered_in_s": round(register_s, 2),
        "still_open_after_probes": still_open,
        "workers_rss_kib": {
            "warm_baseline": base,
            "after_open": after_open,
            "after_register": after_register,
            "after_probes": rss_end,
        },
        "rss_bytes_per_conn_open": round(per_open),
        "rss_bytes_per_conn_registered": round(per_registered),
        "new_client_register_rtt_ms": summarize(rounds),
        "new_client_connect_and_register_ms": summarize(totals),
        "goals": {
            "rss_bytes_per_conn <= 10 kB": per_registered <= GOAL_BYTES_PER_CONN,
            "p99 connect+REGISTER <= 100 ms": summarize(totals)["p99"] <= GOAL_P99_MS,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=300, help="new clients registering")
    parser.add_argument("--probe-gap", type=float, default=0.05, help="seconds between probes")
    parser.add_argument("--parallel", type=int, default=200, help="handshakes/REGISTERs at once")
    parser.add_argument("--workers", type=int, default=0, help="msilo workers (0 = per CPU)")
    parser.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--wait-idle", type=float, default=0.6, help="host idle share first")
    args = parser.parse_args()
    if not 0 < args.connections <= 50_000 or not 0 < args.probes <= 10_000:
        parser.error("--connections in 1..50000 and --probes in 1..10000")

    # Ours: a socket per connection and per probe; msilo's workers: their share + slack.
    limit = raise_nofile(args.connections + 2_000)
    database = f"msilo_bench_ws_idle_{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-ws-idle-"))
    workers = args.workers or (os.cpu_count() or 1)
    # No per-connection cap below the count (the default is 10,000 per worker).
    server = WsMsilo(
        args.dsn, database, workdir, workers,
        [f"limits.max_connections={args.connections + 1000}"],
    )  # fmt: skip
    idle, waited = wait_idle(args.wait_idle, 120.0)
    server.prepare()
    try:
        server.start()
        result = uvloop.run(measure(server, args))
        server.check_alive()

        async def bindings(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM location"))

        result["bindings_in_db"] = run_pg(server.dsn, bindings)
    finally:
        server.stop()
        Proc.stop_all()
        server.cleanup()
    result["setup"] = {
        "msilo": server.info,
        "nofile_limit": limit,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "idle_share_before": idle,
        "waited_for_idle_s": round(waited, 1),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
