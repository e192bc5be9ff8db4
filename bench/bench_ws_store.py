"""MESSAGE store rate over WebSocket vs over UDP, on one msilo in one run (issue 17).

One ``msilo serve`` (registrar mode, PostgreSQL in a database of its own, two workers)
listens on UDP and on ``ws:``. The offered rate goes up step by step, and at each rate
the same store workload runs twice, one right after the other:

* **UDP**: sipp with ``bench/e2e/store_bench_uac.xml``, exactly the ``store`` step of
  ``python -m bench.e2e`` (``bench/e2e/steps.py``: 10,000 offline users, ~100-byte
  text/plain bodies, every call must get 202, no retransmission, every 202 a row);
* **WS**: our own asyncio load generator (``bench/wsload.py``, picows client) sending
  the same MESSAGEs, open-loop at the same rate, round-robin over ``--connections``
  WebSocket connections (browsers: ``.invalid`` Via host, ``sip`` subprotocol).
  The step passes when every MESSAGE got 202 (none failed, none unanswered), none
  later than T1 = 500 ms (when the UDP client would have retransmitted, which fails
  the UDP step), every 202 is a row and no row is extra, no connection was dropped,
  and 202s in the measuring window reached 95 % of the offered rate.

Each transport's ramp stops at its first failed step; its store rate is its highest
passing step. The ratio WS / UDP is printed (goal >= 0.5) and the whole run saved as JSON.

    PYTHONPATH=$PWD python3 bench/bench_ws_store.py --rates 1000:1000:16000 \
        --dsn postgres://postgres@127.0.0.1:5432/postgres --json bench/RESULTS-ws-store.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

if __package__ in (None, ""):  # run as a script: bench/ is a package of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import steps
from bench.e2e.procs import BenchError, Proc, wait_idle
from bench.e2e.run import parse_rates
from bench.e2e.sipp import summarize
from bench.e2e.workloads import WORKLOADS, Workload
from bench.wsload import (
    SipWs,
    WsMsilo,
    connect,
    connections_per_pid,
    header,
    message,
    raise_nofile,
    status_of,
)

GOAL_RATIO = 0.5
MIN_ACHIEVED = steps.MIN_ACHIEVED  # the UDP step's rule, for both
T1 = 0.5  # RFC 3261 T1: a UDP client retransmits an unanswered request after it
GRACE = 30.0  # seconds the last MESSAGEs may take to be answered after the sending ends


async def _ws_load(
    url: str, port: int, wl: Workload, rate: int, connections: int, run: int
) -> dict[str, Any]:
    calls = round(rate * (wl.warmup + wl.duration))
    sent_at = [0.0] * calls
    answered_at = [0.0] * calls
    status = [0] * calls
    answered = 0
    prefix = f"wsl{run}-".encode()

    def on_message(data: bytes, now: float) -> None:
        nonlocal answered
        code = status_of(data)
        if code < 200:
            return
        call_id = header(data, b"Call-ID")
        if not call_id.startswith(prefix):
            return
        i = int(call_id[len(prefix) :])
        if status[i] == 0:
            status[i] = code
            answered_at[i] = now
            answered += 1

    conns: list[SipWs] = [await connect(url, on_message) for _ in range(connections)]
    spread = sorted(connections_per_pid(port).values(), reverse=True)
    users = wl.users
    t0 = time.monotonic()
    stop_sending = t0 + wl.warmup + wl.duration + 10  # bounded even when we fall behind
    i = 0
    while i < calls:
        now = time.monotonic()  # uvloop's loop.time() is cached per iteration, in ms
        if now > stop_sending:
            break
        due = min(calls, int((now - t0) * rate) + 1)
        while i < due:
            conn = conns[i % connections]
            sent_at[i] = now
            conn.send(message(conn, f"user{i % users + 1}", i, f"wsl{run}-{i}"))
            i += 1
        await asyncio.sleep(0.001)  # uvloop timers are whole ms: 0.0005 would spin
    made = i
    deadline = time.monotonic() + GRACE
    while answered < made and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    dropped = sum(1 for c in conns if c.transport is None or c.transport.is_disconnected)
    for conn in conns:
        conn.close()

    begin, end = t0 + wl.warmup, t0 + wl.warmup + wl.duration
    window = [n for n in range(made) if begin <= sent_at[n] < end]
    ok_window = [n for n in window if status[n] == 202]
    latencies = [(answered_at[n] - sent_at[n]) * 1000.0 for n in ok_window]
    late = sum(1 for n in range(made) if status[n] and answered_at[n] - sent_at[n] > T1)
    successful = sum(1 for s in status if s == 202)
    failed = sum(1 for s in status[:made] if s not in (0, 202))
    return {
        "offered_calls": calls,
        "made": made,
        "successful": successful,
        "failed": failed,
        "unanswered": made - answered,
        "answered_after_t1": late,
        "dropped_connections": dropped,
        "achieved_rate": len(ok_window) / wl.duration,
        "latency_ms": summarize(latencies),
        "connections_per_worker": spread,
    }


def run_ws_store(
    server: WsMsilo, wl: Workload, rate: int, connections: int, run: int
) -> dict[str, Any]:
    """The WS store step at ``rate``, with the same checks as the UDP one."""
    server.reset()
    out = uvloop.run(_ws_load(server.url, server.ws_port, wl, rate, connections, run))
    server.check_alive()
    rows = server.count_rows()
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    calls, ok = out["offered_calls"], out["successful"]

    def check(name: str, passed: bool, why: str) -> None:
        checks[name] = passed
        if not passed:
            reasons.append(why)

    check("all_calls_made", out["made"] == calls, f"sent {out['made']} of {calls} in time")
    check("no_failed_calls", out["failed"] == 0, f"{out['failed']} non-202 answers")
    check("all_answered", out["unanswered"] == 0, f"{out['unanswered']} unanswered")
    # The UDP step fails on any retransmission, which sipp sends when an answer takes more
    # than T1 = 500 ms (store_uac.xml's retrans="500"): the same bound here.
    check(
        "no_late_answers",
        out["answered_after_t1"] == 0,
        f"{out['answered_after_t1']} answers after {T1 * 1000:.0f} ms (UDP would retransmit)",
    )
    check("no_dropped_connections", out["dropped_connections"] == 0, "connections dropped")
    check("every_202_is_a_row", rows >= ok, f"{ok} MESSAGEs answered 202 but only {rows} rows")
    check("no_extra_rows", rows <= ok, f"{rows} rows for {ok} 202s")
    achieved = out["achieved_rate"]
    check(
        "rate_achieved",
        achieved >= MIN_ACHIEVED * rate,
        f"only {achieved:.0f}/s answered 202 in the window",
    )
    return {**out, "rows": rows, "checks": checks, "passed": not reasons, "reasons": reasons}


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _row(step: dict[str, Any]) -> str:
    lat = step.get("latency_ms", {})
    spread = "/".join(map(str, step.get("connections_per_worker", []))) or "-"
    verdict = "pass" if step["passed"] else "FAIL: " + "; ".join(step["reasons"])
    return (
        f"| {step['transport']} | {step['rate']} | {step['achieved_rate']:.0f} "
        f"| {lat.get('p50', float('nan')):.1f} | {lat.get('p99', float('nan')):.1f} "
        f"| {step['successful']} | {step['rows']} | {spread} "
        f"| {step['cpu']['msilo_workers_us_per_202']:.0f} "
        f"| {step['cpu']['load_generator_us_per_202']:.0f} | {verdict} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates", type=parse_rates, default=parse_rates("1000:1000:16000"),
        help="START:STEP:MAX offered MESSAGE/s (default 1000:1000:16000)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    parser.add_argument("--duration", type=float, default=10.0, help="measuring window, s")
    parser.add_argument("--connections", type=int, default=50, help="WS connections")
    parser.add_argument("--workers", type=int, default=2, help="msilo workers")
    parser.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--wait-idle", type=float, default=0.6, help="host idle share per step")
    args = parser.parse_args()
    if shutil.which(steps.SIPP) is None:
        parser.error("sipp is not installed (Debian: sip-tester; make test-deps installs it)")
    if not 0 < args.duration <= 60 or not 0 <= args.warmup <= 30:
        parser.error("--duration in (0, 60] and --warmup in [0, 30]")
    if not 0 < args.connections <= 5000:
        parser.error("--connections in 1..5000")
    wl = dataclasses.replace(
        WORKLOADS["store"], **args.rates, warmup=args.warmup, duration=args.duration
    )
    raise_nofile(args.connections + 1000)
    database = f"msilo_bench_ws_store_{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-ws-store-"))
    opts = steps.Options(uas_linger_ms=1000, sipp_grace=20.0)
    server = WsMsilo(args.dsn, database, workdir, args.workers, [])
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    best = {"UDP": 0, "WS": 0}
    running = {"UDP": True, "WS": True}
    print(
        "| transport | offered/s | 202/s | p50 ms | p99 ms | 202s | rows | conns/worker "
        "| msilo CPU µs/202 | generator CPU µs/202 | verdict |"
    )
    print("| --- |" + " ---: |" * 6 + " --- | ---: | ---: | --- |", flush=True)
    server.prepare()
    try:
        server.start()
        for run, rate in enumerate(wl.rates()):
            for transport in ("UDP", "WS"):
                if not running[transport]:
                    continue
                idle, _ = wait_idle(args.wait_idle, 60.0) if args.wait_idle else (None, 0.0)
                # CPU of msilo's workers, and of the load generator: sipp is our child
                # (counted once reaped), the WS generator is this process.
                workers_before = server.workers_cpu_seconds()
                who = resource.RUSAGE_CHILDREN if transport == "UDP" else resource.RUSAGE_SELF
                gen_before = _cpu(who)
                if transport == "UDP":
                    stepdir = workdir / f"udp-{rate}"
                    stepdir.mkdir()
                    outcome = steps.run_store(server, wl, rate, stepdir, opts)
                else:
                    outcome = run_ws_store(server, wl, rate, args.connections, run)
                stored = max(outcome["successful"], 1)
                cpu = {
                    "msilo_workers_us_per_202": round(
                        (server.workers_cpu_seconds() - workers_before) / stored * 1e6, 1
                    ),
                    "load_generator_us_per_202": round((_cpu(who) - gen_before) / stored * 1e6, 1),
                }
                step = {
                    "transport": transport, "rate": rate, "idle_before": idle, **outcome,
                    "cpu": cpu,
                }  # fmt: skip
                results.append(step)
                print(_row(step), flush=True)
                if step["passed"]:
                    best[transport] = rate
                else:
                    running[transport] = False
            if not any(running.values()):
                break
    except BenchError as exc:
        print(f"bench_ws_store: error: {exc}", file=sys.stderr)
        return 2
    finally:
        server.stop()
        Proc.stop_all()
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = best["WS"] / best["UDP"] if best["UDP"] else 0.0
    topped = [t for t, r in running.items() if r]
    summary = {
        "udp_store_rate": best["UDP"],
        "ws_store_rate": best["WS"],
        "ws_over_udp": round(ratio, 3),
        "goal_ws_over_udp_at_least": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
        "ramp_top_passed": topped,  # these never failed: their rate is at least the top
    }
    top = f"; top of the ramp passed: {', '.join(topped)}" if topped else ""
    print(
        f"\nstore rate: UDP {best['UDP']}/s, WS {best['WS']}/s, WS/UDP = {ratio:.2f} "
        f"(goal >= {GOAL_RATIO}){top}"
    )
    out = {
        "summary": summary,
        "steps": results,
        "setup": {
            "msilo": server.info,
            "workload": dataclasses.asdict(wl),
            "ws_connections": args.connections,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv,
        },
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if summary["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
