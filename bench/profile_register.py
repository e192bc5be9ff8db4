"""Where a REGISTER's time goes in msilo: py-spy on the workers + pg_stat_statements.

    python -m bench.profile_register --dsn postgres://postgres@127.0.0.1:5433/postgres \
        --rate 2000 --kind refresh --duration 20

Runs one step of bench/e2e's register workload (msilo only, registrar mode, PostgreSQL)
and, during its measuring window, samples each worker with ``py-spy record`` (raw folded
stacks, plus a speedscope file per worker) and reads ``pg_stat_statements`` (reset at the
start of the window) and the CPU time of the workers and of PostgreSQL from /proc. The
PostgreSQL of ``--dsn`` must preload pg_stat_statements: use a throwaway cluster, e.g.

    initdb -D /tmp/pg -U postgres --auth=trust   (as user postgres, PostgreSQL 15 bin dir)
    echo "port = 5433" >> /tmp/pg/postgresql.conf
    echo "shared_preload_libraries = 'pg_stat_statements'" >> /tmp/pg/postgresql.conf
    pg_ctl -D /tmp/pg -l /tmp/pg/log start

Output: the step's row, the worker CPU split by layer (see OPERATIONS and LAYERS), the top
self-time frames, the statements with calls and mean time, and CPU µs per REGISTER of the
workers and of PostgreSQL; ``--json`` keeps it all. ``--analyse FILES`` re-reads raw files.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.e2e import report, steps
from bench.e2e.procs import BenchError, Proc
from bench.e2e.servers import MsiloServer, database_dsn, run_pg
from bench.e2e.workloads import WORKLOADS, Workload

# A sample's layer. First the database operation it is part of, wherever in the stack
# (asyncpg's encode, the write(2) to PostgreSQL's socket and the decode are the round
# trip's cost in the worker; a coroutine's stack starts at the task, here PostgresStore._run,
# so the caller is seen by the closure's name); then the innermost msilo frame.
OPERATIONS: list[tuple[str, re.Pattern[str]]] = [
    (
        "DB round trip 1: binding read (SELECT ... xmin)",
        re.compile(r"update_bindings\.<locals>\.read"),
    ),
    (
        "DB round trip 2: msilo_location_apply() call",
        re.compile(r"^_fetchval |_update_bindings_locked"),
    ),
    (
        "dump: silo claim query + delivery",
        re.compile(r"_fetch\.<locals>\.run|claim_for_dump|m_dump|msilo/routing/delivery\.py"),
    ),
    ("DB: pool acquire / release", re.compile(r"asyncpg/pool\.py")),
    # A coroutine resumed by the loop shows only asyncpg's frames: a round trip, but which
    # of the above py-spy cannot see.
    ("DB round trip, statement not in the stack", re.compile(r"asyncpg/connection\.py")),
    ("send (UDP sendto)", re.compile(r"UdpEndpoint\.sendto")),
]
LAYERS: list[tuple[str, re.Pattern[str]]] = [
    (
        "parse + header access (C parser, SipMessage)",
        re.compile(r"msilo/sip/(parser|message|headers|_parse_py)\.py|_fastparse"),
    ),
    ("response build", re.compile(r"msilo/sip/build\.py")),
    ("logging", re.compile(r"/logging/|msilo/log\.py")),
    (
        "registrar plan + binding objects (RFC 3261 10.3)",
        re.compile(r"msilo/routing/registrar\.py|msilo/storage/location(_pg)?\.py"),
    ),
    ("storage wrapper (PostgresStore)", re.compile(r"msilo/storage/")),
    ("routing (service, policy checks)", re.compile(r"msilo/routing/")),
    ("transaction layer", re.compile(r"msilo/transaction/")),
    ("transport receive (datagram_received, spread)", re.compile(r"msilo/transport/")),
    ("worker dispatch", re.compile(r"msilo/server/")),
]
# Only the loop's frames: uvloop's C code (epoll, socket reads including PostgreSQL's
# replies, asyncpg's Cython protocol callbacks) with no Python frame of its own.
LOOP_LAYER = "event loop (uvloop C: epoll, socket reads incl. PostgreSQL replies)"
LOOP = re.compile(r"asyncio/|uvloop|multiprocessing/|<frozen runpy>|^_main |^run \(|child_main")


def layer_of(frames: list[str]) -> str:
    """The layer of one sample (frames outermost first)."""
    for name, pattern in OPERATIONS:
        if any(pattern.search(frame) for frame in frames):
            return name
    if frames and frames[-1].startswith(("Runner.run ", "run_until_complete")):
        return LOOP_LAYER
    for frame in reversed(frames):
        for name, pattern in LAYERS:
            if pattern.search(frame):
                return name
    if all(LOOP.search(frame) for frame in frames):
        return LOOP_LAYER
    return "other (asyncio / asyncpg outside the above)"


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    """py-spy --format raw: 'frame;frame;... count' per line (outermost first)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def tally(
    samples: list[tuple[list[str], int]],
) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(samples, samples per layer, samples per leaf frame)."""
    layers: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for frames, n in samples:
        layers[layer_of(frames)] += n
        leaves[frames[-1]] += n
    return sum(n for _, n in samples) or 1, layers, leaves


def print_layers(samples: list[tuple[list[str], int]]) -> None:
    """The layer table and the top leaf frames, in Markdown."""
    total, layers, leaves = tally(samples)
    print(f"\n| layer | share of worker samples ({total}) |\n| --- | ---: |")
    for name, n in layers.most_common():
        print(f"| {name} | {n / total * 100:.1f} % |")
    print("\n| leaf frame (self time) | share |\n| --- | ---: |")
    for name, n in leaves.most_common(20):
        print(f"| `{name}` | {n / total * 100:.1f} % |")


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def postgres_pids(admin_dsn: str) -> list[int]:
    """The postmaster of ``admin_dsn`` and its children (backends and helpers)."""

    async def parent(conn: asyncpg.Connection) -> int:
        # Read while the backend is alive: its parent is the postmaster.
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])

    master = run_pg(admin_dsn, parent)
    return [master, *children(master)]


STATEMENTS = """
SELECT calls, total_exec_time, mean_exec_time, rows, query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)
ORDER BY total_exec_time DESC LIMIT 25
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile_register", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--dsn", required=True, help="admin DSN of a PostgreSQL preloading pg_stat_statements"
    )
    p.add_argument("--rate", type=int, default=2000, help="REGISTER/s (2000)")
    p.add_argument("--kind", choices=("first", "refresh"), default="refresh")
    p.add_argument("--mailboxes", choices=("empty", "pending"), default="empty")
    p.add_argument("--duration", type=float, default=20.0, help="sampled window, s (20)")
    p.add_argument("--warmup", type=float, default=3.0, help="s before sampling starts (3)")
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--py-spy-rate", type=int, default=100, help="samples/s per worker (100)")
    p.add_argument(
        "--py-spy-flags",
        default="--gil --native",
        help="extra py-spy record flags (default '--gil --native': only samples holding the "
        "GIL, i.e. the worker running Python, not waiting in epoll; Cython/C frames of "
        "asyncpg and uvloop shown; '--nonblocking' samples without pausing the worker)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the files")
    p.add_argument("--json", type=Path, help="write everything here too")
    p.add_argument(
        "--analyse",
        nargs="+",
        type=Path,
        help="only print the layers of these py-spy raw files (no run)",
    )
    args = p.parse_args(argv)
    if args.analyse:
        samples = [s for path in args.analyse for s in read_folded(path)]
        print_layers(samples)
        return 0
    if shutil.which("py-spy") is None:
        print("py-spy not found: python3 -m pip install py-spy", file=sys.stderr)
        return 1

    async def preload(conn: asyncpg.Connection) -> str:
        return str(await conn.fetchval("SHOW shared_preload_libraries"))

    if "pg_stat_statements" not in run_pg(args.dsn, preload):
        print(f"{args.dsn} does not preload pg_stat_statements (see --help)", file=sys.stderr)
        return 1
    base = WORKLOADS[f"register-{args.kind}-{args.mailboxes}"]
    wl = Workload(
        **{
            **base.__dict__,
            "warmup": args.warmup,
            "duration": args.duration + 2.0,  # the sampled window sits inside the step
            "users": args.users,
        }
    )
    opts = steps.Options(uas_linger_ms=8000, sipp_grace=10.0, overload_factors=())
    workdir = Path(tempfile.mkdtemp(prefix="msilo-profile-register-"))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    server = MsiloServer(args.dsn, "msilo_profile", workdir, args.workers)
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        server.prepare()
        server.start()
        db_dsn = database_dsn(args.dsn, "msilo_profile")

        async def ext(conn: asyncpg.Connection) -> None:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

        run_pg(db_dsn, ext)
        assert server.proc is not None
        workers = children(server.proc.pid)
        blocked = steps.prepare_ramp(server, wl, workdir, opts)
        if blocked:
            raise BenchError("; ".join(blocked))
        stepdir = workdir / "step"
        stepdir.mkdir()
        outcome: dict[str, Any] = {}

        def step() -> None:
            outcome.update(steps.run_register(server, wl, args.rate, stepdir, opts))

        thread = threading.Thread(target=step, daemon=True)
        thread.start()
        # The rounds start after the silo reset and the UAS is up (about a second).
        time.sleep(args.warmup + 1.0)

        async def reset(conn: asyncpg.Connection) -> None:
            await conn.execute("SELECT pg_stat_statements_reset()")

        run_pg(db_dsn, reset)
        pg = postgres_pids(args.dsn)
        ticks0 = {pid: cpu_ticks(pid) for pid in [*workers, server.proc.pid, *pg]}
        spies = []
        for pid in workers:
            for fmt in ("raw", "speedscope"):
                ext = "txt" if fmt == "raw" else "speedscope.json"
                path = args.out / f"profile-register-{stamp}-w{pid}.{ext}"
                spies.append(
                    Proc(
                        f"py-spy {fmt} {pid}",
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            str(pid),
                            "--duration",
                            str(int(args.duration)),
                            "--rate",
                            str(args.py_spy_rate),
                            "--format",
                            fmt,
                            "--output",
                            str(path),
                            *args.py_spy_flags.split(),
                        ],
                        workdir / f"py-spy-{fmt}-{pid}.log",
                    )
                )
        t0 = time.monotonic()
        for spy in spies:
            if spy.wait(args.duration + 30) is None:
                spy.stop()
        elapsed = time.monotonic() - t0
        ticks1 = {pid: cpu_ticks(pid) for pid in ticks0}

        async def statements(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            return [dict(r) for r in await conn.fetch(STATEMENTS, "msilo_profile")]

        stmts = run_pg(db_dsn, statements)
        thread.join(timeout=300)
        hz = os.sysconf("SC_CLK_TCK")
        registers = args.rate * elapsed
        cpu = {
            "workers_s": sum(ticks1[p] - ticks0[p] for p in workers) / hz,
            "supervisor_s": (ticks1[server.proc.pid] - ticks0[server.proc.pid]) / hz,
            "postgres_s": sum(ticks1[p] - ticks0[p] for p in pg) / hz,
            "window_s": elapsed,
        }
        cpu["workers_us_per_register"] = cpu["workers_s"] / registers * 1e6
        cpu["postgres_us_per_register"] = cpu["postgres_s"] / registers * 1e6
        samples: list[tuple[list[str], int]] = []
        for pid in workers:
            samples += read_folded(args.out / f"profile-register-{stamp}-w{pid}.txt")
        total, layers, leaves = tally(samples)
        result.update(
            {
                "step": outcome,
                "cpu": cpu,
                "samples": total,
                "layers": {k: v / total for k, v in layers.most_common()},
                "leaves": {k: v / total for k, v in leaves.most_common(30)},
                "statements": stmts,
            }
        )
        if outcome:
            print(report.STEP_HEADER)
            print(
                report.step_row(
                    {"server": "msilo", "workload": wl.name, "rate": args.rate, **outcome}
                )
            )
        print(
            f"\nCPU in the {elapsed:.1f} s window: workers {cpu['workers_s']:.2f} s "
            f"({cpu['workers_us_per_register']:.0f} µs/REGISTER), "
            f"PostgreSQL {cpu['postgres_s']:.2f} s "
            f"({cpu['postgres_us_per_register']:.0f} µs/REGISTER), "
            f"supervisor {cpu['supervisor_s']:.2f} s"
        )
        print_layers(samples)
        print(
            "\n| calls | calls/REGISTER | mean ms | total ms | statement |\n"
            "| ---: | ---: | ---: | ---: | --- |"
        )
        for s in stmts:
            query = " ".join(s["query"].split())[:160].replace("|", "\\|")
            print(
                f"| {s['calls']} | {s['calls'] / registers:.2f} | {s['mean_exec_time']:.3f} "
                f"| {s['total_exec_time']:.0f} | `{query}` |"
            )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0
    except BenchError as exc:
        print(f"profile: error: {exc}", file=sys.stderr)
        return 1
    finally:
        Proc.stop_all()
        server.stop()
        with contextlib.suppress(BenchError):
            server.cleanup()
        print(f"work folder: {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
