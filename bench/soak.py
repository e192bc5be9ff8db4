"""Soak: a million stored messages at a steady rate; worker memory must stay flat.

    python -m bench.soak                          # 1,000,000 MESSAGEs at 2,000/s, 2 workers
    python -m bench.soak --messages 100000 --rate 1500 --json out.json

msilo runs as in bench/e2e (``msilo serve``, registrar mode, PostgreSQL, N workers) and
sipp sends ``tools/sipp/store_uac.xml`` to 10,000 offline users from one socket (the
front proxy of a real deployment).  Every ``--sample`` seconds the resident set size
(``VmRSS``) of each worker is read from /proc.  At the end: sipp's counters (every call
answered 202, no failed call), the rows in the table (= the 202s, nothing lost or
doubled), the server's own error counters, and each worker's RSS at the start of the
load, at its end, and the largest seen.  The run fails (exit 1) when a call failed, a
row is missing, or a worker ended above ``--max-rss-mb`` (80) or grew by more than
``--max-growth-mb`` (10) after the first tenth of the load (at least a minute: the
warm-up of caches and the transaction table).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e import sipp
from bench.e2e.procs import BenchError, Proc, free_port
from bench.e2e.run import DEFAULT_DSN
from bench.e2e.servers import HOST, MsiloServer


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def server_stats(server: MsiloServer) -> dict[str, Any]:
    url = f"http://{HOST}:{server.http_port}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def worker_pids(server: MsiloServer) -> list[int]:
    return [int(w["pid"]) for w in server_stats(server)["workers"] if w["role"] == "worker"]


class Sampler(threading.Thread):
    """Reads each worker's RSS every ``every`` seconds until stopped."""

    def __init__(self, pids: list[int], every: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.every = every
        self.samples: list[tuple[float, list[float]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - start, [rss_mb(p) for p in self.pids]))
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--rate", type=int, default=2000, help="MESSAGE/s (default 2000)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dsn", default=DEFAULT_DSN)
    p.add_argument("--sample", type=float, default=10.0, help="RSS sampling period, s")
    p.add_argument("--max-rss-mb", type=float, default=80.0)
    p.add_argument("--max-growth-mb", type=float, default=10.0)
    p.add_argument("--json", type=Path, help="write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="msilo-soak-"))
    server = MsiloServer(args.dsn, "msilo_soak", work, args.workers)
    try:
        server.prepare()
        server.start()
        time.sleep(2)  # every worker bound and ready
        pids = worker_pids(server)
        users = sipp.users_csv(work / "users.csv", 10_000)
        stat = work / "stat.csv"
        duration = args.messages / args.rate
        argv_sipp = [
            "sipp", f"{HOST}:{server.port}", "-sf", str(sipp.scenario("store_uac.xml")),
            "-inf", str(users), "-i", HOST, "-p", str(free_port()),
            "-m", str(args.messages), "-r", str(args.rate), "-rp", "1000",
            "-l", str(args.rate * 40), "-default_behaviors", "all,-bye",
            "-timeout", str(math.ceil(duration + 120)), "-timeout_error", "-nostdin",
            "-trace_stat", "-stf", str(stat), "-fd", "10",
        ]  # fmt: skip
        sampler = Sampler(pids, args.sample)
        started = time.monotonic()
        sampler.start()
        uac = Proc("sipp soak", argv_sipp, work / "sipp.log", cwd=work)
        code = uac.wait(duration + 180)
        elapsed = time.monotonic() - started
        sampler.stop()
        if code is None:
            uac.stop()
            raise BenchError(f"sipp did not finish within {duration + 180:.0f} s")
        server.check_alive()
        counters = sipp.read_stat(stat)
        ok_calls = sipp.stat_int(counters, "SuccessfulCall(C)")
        failed = sipp.stat_int(counters, "FailedCall(C)")
        retrans = sipp.stat_int(counters, "Retransmissions(C)")
        rows = server.count_rows()
        stats = server_stats(server)
        errors = {k: stats.get(k, 0) for k in ("store_failures", "parse_errors", "replies_5xx")}
        samples = sampler.samples
        # The first tenth of the load (at least a minute) warms caches and fills the
        # transaction table (Timer J keeps completed transactions 32 s); from then on
        # memory must be flat.
        warm_at = max(duration / 10, 60.0)
        warm = next((s for s in samples if s[0] >= warm_at), samples[-1])
        per_worker = []
        for i, pid in enumerate(pids):
            values = [s[1][i] for s in samples if s[1][i] > 0]
            per_worker.append(
                {
                    "pid": pid,
                    "start_mb": round(values[0], 1) if values else 0.0,
                    "warm_mb": round(warm[1][i], 1),
                    "end_mb": round(values[-1], 1) if values else 0.0,
                    "max_mb": round(max(values), 1) if values else 0.0,
                }
            )
        checks = {
            "every call answered 202": ok_calls == args.messages and failed == 0,
            "rows = 202 answers": rows == ok_calls,
            "no server errors": not any(errors.values()),
            f"RSS < {args.max_rss_mb:g} MB": all(w["max_mb"] < args.max_rss_mb for w in per_worker),
            f"RSS growth after warm-up <= {args.max_growth_mb:g} MB": all(
                w["end_mb"] - w["warm_mb"] <= args.max_growth_mb for w in per_worker
            ),
        }
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "messages": args.messages,
            "rate": args.rate,
            "workers": args.workers,
            "elapsed_s": round(elapsed, 1),
            "achieved_rate": round(ok_calls / elapsed, 1) if elapsed else 0,
            "sipp": {"successful": ok_calls, "failed": failed, "retransmissions": retrans},
            "rows": rows,
            "server_errors": errors,
            "rss_mb": per_worker,
            "rss_samples": [(round(t, 1), [round(v, 1) for v in vals]) for t, vals in samples],
            "checks": checks,
            "passed": all(checks.values()),
        }
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(f"{ok_calls} of {args.messages} MESSAGEs answered 202 in {elapsed:.0f} s "
              f"({result['achieved_rate']}/s), {failed} failed, {retrans} retransmissions; "
              f"{rows} rows")  # fmt: skip
        for w in per_worker:
            print(
                f"worker {w['pid']}: RSS start {w['start_mb']} MB, after warm-up "
                f"{w['warm_mb']} MB, end {w['end_mb']} MB, max {w['max_mb']} MB"
            )
        for name, ok in checks.items():
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
        return 0 if result["passed"] else 1
    except BenchError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 1
    finally:
        Proc.stop_all()
        server.stop()
        try:
            server.cleanup()
        except BenchError as exc:
            print(f"soak: warning: {exc}", file=sys.stderr)
        print(f"work folder: {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
