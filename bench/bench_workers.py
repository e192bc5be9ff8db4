#!/usr/bin/env python3
"""Store throughput of ``msilo serve`` with 1 worker against 2 workers, in one run.

For each worker count: start ``msilo serve`` (silo mode, PostgreSQL, a fresh
schema), then drive ``tools/sipp/store_uac.xml`` with sipp over one UDP socket
per call (``-t un``, so SO_REUSEPORT spreads the calls over the workers).  The
rate ramps up by ``--step`` per stage of ``--duration`` seconds while every call
gets its 202 and sipp keeps up; the best stage is the result.  CPU time of the
msilo processes, of PostgreSQL and of sipp is read from /proc for that stage.
At the end the rows in the database must equal the calls answered 202.

    python bench/bench_workers.py --dsn postgres://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
STORE_UAC = ROOT / "tools" / "sipp" / "store_uac.xml"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Stage:
    """One rate step: what sipp reported and where the CPU went."""

    rate: int
    calls: int
    ok: int
    failed: int
    seconds: float
    response_ms: float = 0.0  # sipp's mean response time (rtd 1)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per group

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def passed(self) -> bool:
        # Zero failures, and sipp kept the rate (a server that falls behind makes calls queue).
        return self.failed == 0 and self.ok == self.calls and self.throughput >= 0.9 * self.rate


@dataclass
class Run:
    workers: int
    stages: list[Stage] = field(default_factory=list)
    rows: int = 0

    @property
    def best(self) -> Stage | None:
        passed = [s for s in self.stages if s.passed]
        return max(passed, key=lambda s: s.throughput) if passed else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def postgres_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() in ("postgres", "postmaster"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def cpu_snapshot(supervisor: int) -> dict[str, float]:
    msilo = [supervisor, *children_of(supervisor)]
    return {
        "msilo": sum(cpu_seconds(p) for p in msilo),
        "postgres": sum(cpu_seconds(p) for p in postgres_pids()),
    }


def sipp_stage(port: int, users: Path, workdir: Path, rate: int, duration: float) -> Stage:
    calls = int(rate * duration)
    stats = workdir / f"sipp_{rate}.csv"
    argv = [
        "sipp", f"127.0.0.1:{port}", "-sf", str(STORE_UAC), "-inf", str(users),
        "-i", "127.0.0.1", "-p", str(free_port()), "-t", "un", "-max_socket", "5000",
        "-m", str(calls), "-r", str(rate), "-rp", "1000",
        "-nostdin", "-timeout", str(int(duration * 4 + 30)), "-timeout_error",
        "-default_behaviors", "all,-bye", "-trace_stat", "-stf", str(stats),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL, timeout=duration * 4 + 60, check=False)  # fmt: skip
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    header, *rows = stats.read_text().splitlines()
    final = dict(zip(header.split(";"), rows[-1].split(";"), strict=False))
    # sipp's own clock (first call to the end), not the process's: start-up is not load.
    elapsed = float(final["CurrentTime"].split()[-1]) - float(final["StartTime"].split()[-1])
    stage = Stage(
        rate=rate,
        calls=calls,
        ok=int(final["SuccessfulCall(C)"]),
        failed=int(final["FailedCall(C)"]),
        seconds=min(seconds, elapsed) if elapsed > 0 else seconds,
        response_ms=_ms(final.get("ResponseTime1(C)", "")),
    )
    stage.cpu["sipp"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return stage


def _ms(value: str) -> float:
    """sipp's ``HH:MM:SS:micro`` as milliseconds."""
    parts = value.split(":")
    if len(parts) != 4:
        return 0.0
    h, m, sec, micro = (int(p) for p in parts)
    return ((h * 60 + m) * 60 + sec) * 1000 + micro / 1000


def wait_ready(http_port: int, workers: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as r:
                health = json.loads(r.read())
            ready = [w for w in health["workers"] if w["state"] == "ready"]
            if len(ready) == workers:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"msilo with {workers} worker(s) did not become ready")


async def admin(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def run_workers(args: argparse.Namespace, workers: int, workdir: Path) -> Run:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(admin(args.dsn, f"CREATE SCHEMA {schema}"))
    db_url = f"{args.dsn}?search_path={schema}"
    port, http_port = free_port(), free_port()
    users = workdir / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"user{i};\n" for i in range(1, 1001)))
    argv = [
        sys.executable, "-m", "msilo", "serve",
        "--set", f'server.listen=["udp:127.0.0.1:{port}"]',
        "--set", f'server.http="127.0.0.1:{http_port}"',
        "--set", f"server.workers={workers}", "--set", "server.mode=silo",
        "--set", "server.log_level=warning", "--set", f'msilo.db_url="{db_url}"',
    ]  # fmt: skip
    log = (workdir / f"msilo_{workers}.log").open("wb")
    server = subprocess.Popen(argv, cwd=workdir, stdout=log, stderr=log, start_new_session=True)
    run = Run(workers)
    try:
        wait_ready(http_port, workers)
        sipp_stage(port, users, workdir, 200, 1.0)  # warm-up: pools, caches, JIT-free paths
        rate = args.start_rate
        while rate <= args.max_rate:
            before = cpu_snapshot(server.pid)
            stage = sipp_stage(port, users, workdir, rate, args.duration)
            after = cpu_snapshot(server.pid)
            stage.cpu.update({k: after[k] - before[k] for k in after})
            run.stages.append(stage)
            print(
                f"  workers={workers} rate={rate}/s ok={stage.ok}/{stage.calls} "
                f"failed={stage.failed} msgs/s={stage.throughput:.0f} rt={stage.response_ms:.1f}ms "
                f"cpu[s] msilo={stage.cpu['msilo']:.1f} postgres={stage.cpu['postgres']:.1f} "
                f"sipp={stage.cpu['sipp']:.1f}",
                flush=True,
            )
            if not stage.passed:
                break
            rate = int(rate * args.step)
        run.rows = int(asyncio.run(admin(db_url, "SELECT count(*) FROM silo")))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        asyncio.run(admin(args.dsn, f"DROP SCHEMA {schema} CASCADE"))
    answered = 200 + sum(s.ok for s in run.stages)  # warm-up included
    if run.rows != answered:
        raise SystemExit(f"{run.rows} rows in the database, {answered} calls answered 202")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("MSILO_BENCH_PG_DSN", "postgres://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate stage")
    parser.add_argument("--start-rate", type=int, default=500)
    parser.add_argument("--step", type=float, default=1.25)
    parser.add_argument("--max-rate", type=int, default=50000)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if shutil.which("sipp") is None:
        raise SystemExit("sipp is not installed (Debian: apt-get install sip-tester)")
    print(
        f"machine: {platform.processor() or platform.machine()} cpus={os.cpu_count()} "
        f"python={platform.python_version()} kernel={platform.release()}"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="msilo-bench-") as tmp:
        for workers in (int(w) for w in args.workers.split(",")):
            runs.append(run_workers(args, workers, Path(tmp)))
    print("\nworkers  best rate  msgs/s   CPU share of the best stage (% of one core)")
    for run in runs:
        best = run.best
        if best is None:
            print(f"{run.workers:>7}  no stage passed")
            continue
        share = " ".join(f"{k}={100 * v / best.seconds:.0f}%" for k, v in best.cpu.items())
        print(f"{run.workers:>7}  {best.rate:>9}  {best.throughput:>6.0f}   {share}")
    bests = [r.best for r in runs]
    if len(bests) == 2 and all(bests):
        ratio = bests[1].throughput / bests[0].throughput  # type: ignore[union-attr]
        print(f"ratio {runs[1].workers} vs {runs[0].workers} workers: {ratio:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), "best": asdict(r.best) if r.best else None} for r in runs])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
