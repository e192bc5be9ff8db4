"""End-to-end benchmark: msilo vs Kamailio's msilo module, driven by sipp, side by side.

    python -m bench.e2e --quick                 # smoke run: a few short steps per workload
    python -m bench.e2e                         # full ramp, >= 20 s per step
    python -m bench.e2e --servers msilo --workers 4 --workloads store --store-rates 4000:500:9000
    python -m bench.e2e --workloads register --register-rates 1000:1000:8000 --duration 10

For each server (one at a time, so they never share the 2 CPUs during a step) and each
workload, the offered rate goes up step by step until a step fails: a failed call, a
retransmission, a row that is not where it should be, or a rate that was not achieved. The
highest passing step is the server's rate. Results: a table on stdout, JSON and a PNG plot
in bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.e2e import overload, report, steps
from bench.e2e.procs import BenchError, Proc, wait_idle
from bench.e2e.servers import (
    MAIN,
    KamailioServer,
    MsiloBaselineServer,
    MsiloMySQLServer,
    MsiloServer,
    MsiloWriteBehindServer,
    Server,
    run_pg,
)
from bench.e2e.workloads import GROUPS, Workload, expand, select

DEFAULT_DSN = "postgres://postgres@127.0.0.1:5432/postgres"
SERVERS = (
    "msilo", "kamailio", "kamailio-db1", "msilo-mysql", "msilo-wb", "msilo-baseline",
)  # fmt: skip


def parse_rates(text: str) -> dict[str, int]:
    """``START:STEP:MAX`` → workload overrides."""
    try:
        start, step, top = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STEP:MAX, got {text!r}") from None
    if start <= 0 or step <= 0 or top < start:
        raise argparse.ArgumentTypeError(f"need 0 < START <= MAX and STEP > 0, got {text!r}")
    return {"start_rate": start, "step": step, "max_rate": top}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds per step")
    p.add_argument(
        "--servers",
        help="comma list of msilo, kamailio (usrloc db_mode 0), kamailio-db1 (db_mode 1), "
        "msilo-mysql (msilo on a throwaway MariaDB), msilo-wb (registrar.write_behind = 5), "
        "msilo-baseline (the checkout given by --baseline); "
        "default msilo,kamailio, plus "
        "kamailio-db1 when a register workload runs",
    )
    p.add_argument(
        "--workloads",
        default="store,dump",
        help="comma list of store, dump, register (= register-{first,refresh}-{empty,pending}) "
        "or one register-KIND-MAILBOXES (default: store,dump)",
    )
    p.add_argument("--workers", type=int, default=2, help="msilo server.workers (default 2)")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of msilo (its C extension built in place) run as msilo-baseline",
    )
    p.add_argument(
        "--msilo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra msilo --set, e.g. limits.max_queue_delay=0.25 (repeatable)",
    )
    p.add_argument("--kamailio-children", type=int, default=8, help="Kamailio children (8)")
    p.add_argument(
        "--kamailio-check-time",
        type=int,
        default=10,
        help="Kamailio msilo check_time, s: how soon delivered rows are deleted (10)",
    )
    p.add_argument("--dsn", default=DEFAULT_DSN, help=f"admin DSN of PostgreSQL ({DEFAULT_DSN})")
    p.add_argument("--store-rates", type=parse_rates, help="START:STEP:MAX MESSAGE/s")
    p.add_argument("--dump-rates", type=parse_rates, help="START:STEP:MAX messages delivered/s")
    p.add_argument("--register-rates", type=parse_rates, help="START:STEP:MAX REGISTER/s")
    p.add_argument(
        "--register-users",
        type=int,
        help="users refreshed in rounds by register-refresh-* (20000; first registrations "
        "use one fresh AoR per REGISTER)",
    )
    p.add_argument(
        "--register-pending-share",
        type=float,
        help="register-*-pending: share of the users with a stored message (0.1)",
    )
    p.add_argument(
        "--register-prime-rate",
        type=int,
        help="register-refresh-*: REGISTER/s of the untimed first registration (1000)",
    )
    p.add_argument(
        "--overload-factors",
        "--overload-factor",
        dest="overload_factors",
        type=parse_factors,
        default=(1.5, 2.0),
        help="after a ramp that failed, one overload step at each of these x the highest "
        "passing rate (store and register; 0 = none; default 1.5,2)",
    )
    p.add_argument(
        "--overload-duration",
        type=float,
        default=30.0,
        help="store: seconds of each overload step (default 30)",
    )
    p.add_argument(
        "--recovery-duration",
        type=float,
        default=10.0,
        help="store: seconds at the highest passing rate right after each overload step, "
        "to see how soon the server is back to normal (default 10)",
    )
    p.add_argument(
        "--recovery-p99-ms",
        type=float,
        default=50.0,
        help="store: a second of the recovery step is normal when all its MESSAGEs got 202 "
        "with a p99 under this (default 50)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each step wait until the host is this share idle over 2 s, e.g. 0.6 "
        "(the machine is shared; default 0 = do not wait)",
    )
    p.add_argument(
        "--wait-idle-max", type=float, default=120.0, help="longest wait per step, s (120)"
    )
    p.add_argument("--duration", type=float, help="measuring window per step, s")
    p.add_argument("--warmup", type=float, help="warm-up per step, s")
    p.add_argument(
        "--dump-users",
        type=int,
        help="users preloaded per dump step (default: REGISTER rate x step length)",
    )
    p.add_argument(
        "--uas-linger-ms",
        type=int,
        help="sipp UAS -d: answers retransmissions this long (8000; --quick 4000)",
    )
    p.add_argument(
        "--failures", type=int, default=1, help="failed steps after which a ramp stops (default 1)"
    )
    p.add_argument("--sipp", default="sipp", help="sipp binary (default: sipp on PATH)")
    p.add_argument("--out", type=Path, default=MAIN / "bench" / "results", help="results folder")
    p.add_argument("--keep-work", action="store_true", help="keep sipp traces and server logs")
    return p


def preflight(servers: list[str]) -> None:
    """Every tool is there before anything starts, or a clear message says what is missing."""
    if shutil.which(steps.SIPP) is None:
        raise BenchError(
            f"{steps.SIPP} not found: install sipp (Debian: apt-get install sip-tester)"
        )
    if importlib.util.find_spec("matplotlib") is None:
        print("installing matplotlib with pip ...", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise BenchError(f"pip install matplotlib failed:\n{result.stderr[-2000:]}")
    if "kamailio" in servers:
        KamailioServer.ensure_installed()


def ramp(
    server: Server,
    wl: Workload,
    workdir: Path,
    opts: steps.Options,
    failures: int,
    results: list[dict[str, Any]],
) -> None:
    """Run ``wl``'s steps against ``server`` until ``failures`` steps failed; then one
    overload step at each of ``opts.overload_factors`` x the best passing rate (store: each
    followed at once by a recovery step at that rate)."""

    def record(rate: int, outcome: dict[str, Any], started: float, **flags: Any) -> None:
        step = {
            "server": server.name,
            "workload": wl.name,
            "rate": rate,
            "started": started,
            "overload": False,
            **flags,
            **outcome,
        }
        results.append(step)
        print(report.step_row(step), flush=True)

    def idle() -> dict[str, Any]:
        idle_before, waited = (None, 0.0)
        if opts.wait_idle > 0:
            idle_before, waited = wait_idle(opts.wait_idle, opts.wait_idle_max)
        return {"idle_before": idle_before, "waited_for_idle_s": waited}

    def run(rate: int, **flags: Any) -> bool:
        suffix = f"-overload{flags['factor']:g}" if flags.get("overload") else ""
        stepdir = workdir / f"{server.name}-{wl.name}-{rate}{suffix}"
        stepdir.mkdir(parents=True)
        waited = idle()
        started = time.time()
        outcome = steps.RUNNERS[wl.runner](server, wl, rate, stepdir, opts)
        record(rate, outcome, started, **waited, **flags)
        return bool(outcome["passed"])

    blocked = steps.prepare_ramp(server, wl, workdir, opts)
    if blocked:
        print(f"| {server.name} | {wl.name} | - | - | ramp not run: {'; '.join(blocked)} |")
        results.append(
            {
                "server": server.name,
                "workload": wl.name,
                "rate": 0,
                "passed": False,
                "reasons": blocked,
                "not_run": True,
            }
        )
        return
    failed = 0
    rates_run: list[int] = []
    for rate in wl.rates():
        rates_run.append(rate)
        if not run(rate):
            failed += 1
            if failed >= failures:
                break
    else:
        if opts.overload_factors:
            print(f"| {server.name} | {wl.name} | - | - | no overload steps: the top of the "
                  "ramp passed, so the zero-failure rate is not known (raise MAX) |")  # fmt: skip
        return
    passed = [
        s["rate"]
        for s in results
        if s["workload"] == wl.name and s["server"] == server.name and s["passed"]
    ]
    if not passed:
        return
    best_rate = max(passed)
    for factor in opts.overload_factors:
        rate = round(best_rate * factor)
        if wl.runner == "store":
            stepdir = workdir / f"{server.name}-{wl.name}-{rate}-overload{factor:g}"
            stepdir.mkdir(parents=True)
            waited = idle()
            started = time.time()
            try:
                over, rec = overload.run_store_overload(
                    server, wl, best_rate, factor, stepdir, opts
                )
            except BenchError as exc:
                # The load generator gave up (sipp at its call limit): the step failed; the
                # run goes on to the next server, and what was measured is kept.
                print(f"| {server.name} | {wl.name} | {rate} | overload step aborted: {exc} |")
                results.append(
                    {
                        "server": server.name, "workload": wl.name, "rate": rate,
                        "started": started, "overload": True, "factor": factor, **waited,
                        **_aborted(exc),
                    }
                )  # fmt: skip
                continue
            flags = {"overload": True, "factor": factor, **waited}
            record(rate, over, started, **flags)
            record(best_rate, rec, started + opts.overload_duration, recovery=True)
        elif wl.runner == "register" and rate not in rates_run:
            run(rate, overload=True, factor=factor)


def _aborted(exc: BenchError) -> dict[str, Any]:
    """The outcome of a step whose load generator stopped with ``exc``."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {
        "passed": False,
        "reasons": [f"aborted: {reason}"],
        "aborted": True,
        "achieved_rate": 0.0,
        "failed": None,
        "retransmissions": None,
    }


def parse_factors(text: str) -> tuple[float, ...]:
    """``1.5,2`` → (1.5, 2.0); ``0`` or empty → () (no overload steps)."""
    try:
        factors = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected factors like 1.5,2, got {text!r}") from None
    if any(f < 0 for f in factors):
        raise argparse.ArgumentTypeError(f"factors must be >= 0, got {text!r}")
    return tuple(f for f in factors if f > 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = expand([w.strip() for w in args.workloads.split(",") if w.strip()])
    if args.servers is None:
        with_register = any(n.startswith("register") for n in names)
        servers = list(SERVERS[:3] if with_register else SERVERS[:2])
    else:
        servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown or not servers:
        print(f"bench-e2e: error: unknown server(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    overrides: dict[str, dict[str, Any]] = {"store": {}, "dump": {}}
    overrides.update({name: {} for name in GROUPS["register"]})
    for name, values in overrides.items():
        kind = name.split("-", 1)[0]
        values.update(getattr(args, f"{kind}_rates") or {})
        values.update({"duration": args.duration, "warmup": args.warmup})
        if kind == "register":
            values.update(
                {
                    "users": args.register_users,
                    "prime_rate": args.register_prime_rate,
                    "pending_share": args.register_pending_share
                    if name.endswith("-pending")
                    else None,
                }
            )
    if args.dump_users:
        overrides["dump"]["users"] = args.dump_users
    try:
        workloads = [
            select([n], quick=args.quick, overrides=overrides.get(n, {}))[0] for n in names
        ]
    except ValueError as exc:
        print(f"bench-e2e: error: {exc}", file=sys.stderr)
        return 2
    steps.SIPP = args.sipp
    opts = steps.Options(
        uas_linger_ms=args.uas_linger_ms or (4000 if args.quick else 8000),
        sipp_grace=10.0,
        overload_factors=args.overload_factors,
        overload_duration=args.overload_duration,
        recovery_duration=args.recovery_duration,
        recovery_p99_ms=args.recovery_p99_ms,
        wait_idle=args.wait_idle,
        wait_idle_max=args.wait_idle_max,
    )

    # SIGTERM must unwind through the finally below, so no server or sipp outlives us.
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"msilo-e2e-{stamp}-"))
    created: list[Server] = []
    results: list[dict[str, Any]] = []
    ok = False
    try:
        preflight(servers)
        run_pg(args.dsn, lambda conn: conn.fetchval("SELECT 1"))
        result: dict[str, Any] = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": report.machine_info(args.dsn),
            "config": {
                "quick": args.quick,
                "workloads": [dataclasses.asdict(w) for w in workloads],
                "options": dataclasses.asdict(opts),
                "argv": sys.argv[1:] if argv is None else argv,
            },
            "servers": servers,
        }
        print(report.STEP_HEADER)
        print("| " + " | ".join(["---"] * 12) + " |", flush=True)
        for name in servers:
            sdir = workdir / name
            sdir.mkdir()
            server: Server
            if name == "msilo":
                server = MsiloServer(
                    args.dsn, "msilo_bench", sdir, args.workers, extra=args.msilo_set
                )
            elif name == "msilo-baseline":
                if args.baseline is None:
                    raise SystemExit("msilo-baseline needs --baseline DIR (a checkout)")
                server = MsiloBaselineServer(
                    args.dsn, "msilo_bench", sdir, args.workers, extra=args.msilo_set
                )
                server.root = args.baseline
            elif name == "msilo-wb":
                server = MsiloWriteBehindServer(
                    args.dsn, "msilo_bench", sdir, args.workers, extra=args.msilo_set
                )
            elif name == "msilo-mysql":
                server = MsiloMySQLServer(
                    args.dsn, "msilo_bench", sdir, args.workers, extra=args.msilo_set
                )
            else:
                db_mode = 1 if name == "kamailio-db1" else 0
                server = KamailioServer(
                    args.dsn,
                    "kamailio_bench" if db_mode == 0 else "kamailio_bench_db1",
                    sdir,
                    args.kamailio_children,
                    args.kamailio_check_time,
                    db_mode=db_mode,
                )
            created.append(server)
            server.prepare()
            server.start()
            result.setdefault("server_info", {})[name] = server.info
            try:
                for wl in workloads:
                    ramp(server, wl, sdir, opts, args.failures, results)
            finally:
                server.stop()
        result["steps"] = results
        result["summary"] = report.summary(results, servers, [w.name for w in workloads])
        args.out.mkdir(parents=True, exist_ok=True)
        json_path = args.out / f"e2e-{stamp}.json"
        png_path = args.out / f"e2e-{stamp}.png"
        report.write_json(result, json_path)
        report.plot(result, png_path)
        print()
        if args.quick:
            print("SMOKE RUN (--quick): short steps; the numbers are not results.")
        print("\n".join(report.summary_lines(result)))
        print(f"\n(+ = the top of the ramp passed: raise MAX)\nJSON: {json_path}\nplot: {png_path}")
        ok = True
        return 0
    except BenchError as exc:
        print(f"\nbench-e2e: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench-e2e: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        print("\nbench-e2e: terminated, stopping everything it started", file=sys.stderr)
        raise
    finally:
        Proc.stop_all()
        for server in created:
            server.stop()
            try:
                server.cleanup()
            except BenchError as exc:
                print(f"bench-e2e: warning: {exc}", file=sys.stderr)
        if ok and not args.keep_work:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder (logs, sipp traces): {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
