"""The store workload's overload steps (issue 19, workload 6 "Overload").

After the ramp found the zero-failure rate R, each overload step offers ``factor`` x R for
``overload_duration`` s and then, at once, R again for ``recovery_duration`` s. It reports
how much was still stored (goodput: 202/s, as a share of R), how fast the excess was
refused (503 + Retry-After latency) and how soon after the overload the server answered
every MESSAGE 202 at normal latency again.

The recovery load starts when the overload's last MESSAGE is sent, not when its last answer
is in: a server that queued the excess instead of refusing it would otherwise get the time
its own backlog takes to drain as idle time to recover in.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.e2e import sipp, steps
from bench.e2e.procs import BenchError, Proc
from bench.e2e.servers import Server
from bench.e2e.workloads import Workload

# The goals, checked per step (the numbers are reported either way).
GOODPUT_GOAL = 0.9  # 202/s during the overload, as a share of the zero-failure rate
SHED_P99_GOAL_MS = 10.0  # 503 + Retry-After latency, p99 over the overload
RECOVERY_GOAL_S = 5.0  # seconds after the overload ended until every second is normal
# A second of the recovery load is normal when every MESSAGE sent in it got 202 at its
# first send and the p99 of those 202s is under this (a p99, not a max: one slow answer in
# 3,000 is the server's normal tail, not overload). Options.recovery_p99_ms sets it per run.
RECOVERY_P99_MS = 50.0


@dataclass
class Second:
    """The MESSAGEs sent in one second of the recovery load (``at`` s after the overload)."""

    at: int
    calls: int = 0
    answered_202: int = 0  # at the first send: a retransmitted request is not normal
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def p99_ms(self) -> float:
        return sipp.percentile(sorted(self.latencies_ms), 99.0)

    def normal(self, max_p99_ms: float) -> bool:
        """Every MESSAGE 202, and their p99 under ``max_p99_ms``."""
        return self.answered_202 == self.calls and self.p99_ms < max_p99_ms


def seconds_after(
    txs: Iterable[sipp.Transaction], ended: float, span: float | None = None
) -> list[Second]:
    """The transactions by second of sending after ``ended``. One sent just before it (the
    two sipp processes overlap by their start-up time) counts to second 0; with ``span``
    (the load's length, s) one sent after it counts to the last whole second, so the few
    calls of a sipp that started late do not make a second of their own."""
    last = max(0, math.ceil(span) - 1) if span is not None else None
    by_second: dict[int, Second] = {}
    for t in txs:
        at = max(0, math.floor(t.sent - ended))
        if last is not None:
            at = min(at, last)
        sec = by_second.setdefault(at, Second(at))
        sec.calls += 1
        if t.status == 202 and t.answered is not None and t.sends == 1:
            sec.answered_202 += 1
            sec.latencies_ms.append((t.answered - t.sent) * 1000.0)
    return [by_second[k] for k in sorted(by_second)]


def recovery_seconds(
    txs: Iterable[sipp.Transaction],
    ended: float,
    span: float | None = None,
    *,
    max_p99_ms: float = RECOVERY_P99_MS,
) -> float | None:
    """Seconds after ``ended`` (the overload's last MESSAGE) from which every second of
    the recovery load is normal (see ``Second.normal``) to the end of the load: the start
    of the first second after the last abnormal one; 0 = normal from the start. None when
    the last second is still abnormal, or nothing was sent. ``span``: see ``seconds_after``."""
    seconds = seconds_after(txs, ended, span)
    if not seconds or not seconds[-1].normal(max_p99_ms):
        return None
    bad = [s.at for s in seconds if not s.normal(max_p99_ms)]
    return float(bad[-1] + 1) if bad else 0.0


def _wait(procs: list[tuple[Proc, float]], server: Server, until: float | None = None) -> None:
    """Until every sipp exited (or, with ``until``, until that monotonic time), stopping all
    of them when the server died or one outlived its deadline."""
    while True:
        now = time.monotonic()
        if until is not None and now >= until:
            return
        live = []
        for proc, deadline in procs:
            code = proc.wait(0)
            if code is None:
                if now > deadline:
                    proc.stop(grace=5.0, sig=signal.SIGUSR1)
                    raise BenchError(f"{proc.name} did not finish in time; see {proc.log}")
                live.append((proc, deadline))
                continue
            proc.stop()
            # 0: every call succeeded, 1: some failed (the counters say which).
            if code not in (0, 1):
                raise BenchError(f"{proc.name} exited with status {code}:\n{proc.tail()}")
        procs[:] = live
        if not server.running():
            for proc, _ in procs:
                proc.stop(grace=2.0)
            server.check_alive()
        if not procs and until is None:
            return
        time.sleep(0.01 if until is not None else 0.2)


def _rows_checks(checks: dict[str, bool], reasons: list[str], rows: int, expected: int) -> None:
    steps._check(
        checks, reasons, "every_202_is_a_row", rows >= expected,
        f"{expected} MESSAGEs of the overload and recovery answered 202 but only {rows} rows",
    )  # fmt: skip
    steps._check(
        checks, reasons, "no_extra_rows", rows <= expected, f"{rows} rows for {expected} 202s"
    )


def run_store_overload(
    server: Server,
    wl: Workload,
    best_rate: int,
    factor: float,
    workdir: Path,
    opts: steps.Options,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One overload step at ``factor`` x ``best_rate`` and the recovery step after it:
    (overload outcome, recovery outcome), the fields of a store step plus their own."""
    rate = round(best_rate * factor)
    server.reset()
    users = sipp.users_csv(workdir / "users.csv", wl.users)
    over_dir, rec_dir = workdir / "overload", workdir / "recovery"
    over_dir.mkdir()
    rec_dir.mkdir()
    over_calls = round(rate * opts.overload_duration)
    rec_calls = round(best_rate * opts.recovery_duration)
    over_timeout = steps.store_timeout(opts.overload_duration, opts)
    rec_timeout = steps.store_timeout(opts.recovery_duration, opts)

    before = server.counters()
    over = Proc(
        "sipp store overload",
        steps.store_argv(server, users, over_calls, rate, over_timeout, "store"),
        over_dir / "sipp.out",
        cwd=over_dir,
    )
    started = time.monotonic()
    running = [(over, started + over_timeout + 10)]
    _wait(running, server, until=started + opts.overload_duration)
    rec = Proc(
        "sipp store recovery",
        steps.store_argv(server, users, rec_calls, best_rate, rec_timeout, "store"),
        rec_dir / "sipp.out",
        cwd=rec_dir,
    )
    switched = server.counters()
    running.append((rec, time.monotonic() + rec_timeout + 10))
    _wait(running, server)
    server.check_alive()
    after = server.counters()

    over_out, over_txs = steps.store_tally(
        over_dir, "store", over_calls, None, opts.overload_duration
    )
    rec_out, rec_txs = steps.store_tally(rec_dir, "store", rec_calls, None, opts.recovery_duration)
    rows = server.count_rows()
    expected = over_out["answered_202"] + rec_out["answered_202"]
    ended = max((t.sent for t in over_txs), default=time.time())
    seconds = seconds_after(rec_txs, ended, opts.recovery_duration)
    recovered = recovery_seconds(
        rec_txs, ended, opts.recovery_duration, max_p99_ms=opts.recovery_p99_ms
    )
    goodput = over_out["achieved_rate"]
    p99_503 = over_out["latency_ms_503"]["p99"]

    checks: dict[str, bool] = {}
    reasons: list[str] = []
    made = over_out["sipp_successful"] + over_out["failed"]
    steps._check(
        checks, reasons, "all_calls_made", made == over_calls,
        f"sipp made {made} of {over_calls} calls",
    )  # fmt: skip
    steps._check(
        checks, reasons, "goodput", goodput >= GOODPUT_GOAL * best_rate,
        f"goodput {goodput:.0f}/s = {goodput / best_rate:.0%} of {best_rate}/s "
        f"(goal >= {GOODPUT_GOAL:.0%})",
    )  # fmt: skip
    bad = over_out["failed"] + over_out["answered_other"] + over_out["unanswered"]
    steps._check(
        checks, reasons, "every_excess_503", bad == 0,
        f"{over_out['failed']} failed calls (a 503 without Retry-After fails too), "
        f"{over_out['answered_other']} other answers, {over_out['unanswered']} unanswered",
    )  # fmt: skip
    steps._check(
        checks, reasons, "shed_fast", not p99_503 > SHED_P99_GOAL_MS,  # NaN: none shed
        f"503 p99 {p99_503:.1f} ms (goal <= {SHED_P99_GOAL_MS:g} ms)",
    )  # fmt: skip
    steps._check(
        checks, reasons, "no_retransmissions", over_out["retransmissions"] == 0,
        f"{over_out['retransmissions']} retransmissions",
    )  # fmt: skip
    overload = {
        **over_out,
        "factor": factor,
        "best_rate": best_rate,
        "duration_s": opts.overload_duration,
        "goodput_rate": goodput,
        "goodput_share": goodput / best_rate,
        "server_counters": steps.counter_delta(before, switched),
        # The table holds the rows of both steps; they are checked in the recovery step.
        "rows": rows,
        "rows_expected": expected,
        "checks": checks,
        "passed": not reasons,
        "reasons": reasons,
    }

    rchecks: dict[str, bool] = {}
    rreasons: list[str] = []
    made = rec_out["sipp_successful"] + rec_out["failed"]
    steps._check(
        rchecks, rreasons, "all_calls_made", made == rec_calls,
        f"sipp made {made} of {rec_calls} calls",
    )  # fmt: skip
    steps._check(
        rchecks, rreasons, "recovered",
        recovered is not None and recovered <= RECOVERY_GOAL_S,
        f"recovered after {recovered:g} s (goal <= {RECOVERY_GOAL_S:g} s)"
        if recovered is not None
        else f"not recovered within {opts.recovery_duration:g} s",
    )  # fmt: skip
    _rows_checks(rchecks, rreasons, rows, expected)
    recovery = {
        **rec_out,
        "after_factor": factor,
        "duration_s": opts.recovery_duration,
        "overload_ended": ended,
        "recovery_s": recovered,
        "recovery_p99_ms": opts.recovery_p99_ms,
        "per_second": [
            {"s": s.at, "calls": s.calls, "answered_202": s.answered_202, "p99_ms": s.p99_ms}
            for s in seconds
        ],
        "server_counters": steps.counter_delta(switched, after),
        "rows": rows,
        "rows_expected": expected,
        "checks": rchecks,
        "passed": not rreasons,
        "reasons": rreasons,
    }
    return overload, recovery
