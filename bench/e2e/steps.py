"""One ramp step of each workload: run sipp at one rate, then check what really happened."""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e import sipp
from bench.e2e.procs import BenchError, Proc, cpu_sample, free_port, idle_share
from bench.e2e.servers import HOST, KEY_PATTERN, Server
from bench.e2e.workloads import Workload

SIPP = "sipp"
# Below this share of the offered rate in the measuring window the step fails: either the
# server fell behind or sipp itself could not offer the rate (both are reported).
MIN_ACHIEVED = 0.95


@dataclass(frozen=True)
class Options:
    """Harness settings that are not part of a workload."""

    uas_linger_ms: int  # message_uas.xml's -d: how long a delivered call keeps answering
    sipp_grace: float  # seconds sipp may run past its nominal duration
    # After a ramp that failed, one overload step at each of these multiples of the highest
    # passing rate (the overload criterion); () = none. store: each lasts
    # overload_duration s and is followed at once by recovery_duration s at that rate.
    overload_factors: tuple[float, ...] = (1.5, 2.0)
    overload_duration: float = 30.0
    recovery_duration: float = 10.0
    recovery_p99_ms: float = 50.0  # a recovery second is normal with its 202s' p99 under it
    # Before each step: wait (up to wait_idle_max s) until the host is this share idle.
    wait_idle: float = 0.0
    wait_idle_max: float = 120.0


# sipp's own socket buffers (64 KB by default): when sipp stalls for a few ms at 4,000/s,
# the answers overflow them and the kernel drops them on sipp's side (seen as drops on
# sipp's port in /proc/net/udp), and the retransmission then fails the step of whichever
# server is measured. The load generator must not be what is measured.
SIPP_BUFFER = 4 * 1024 * 1024


def _common(stat: Path, short: Path | None) -> list[str]:
    argv = ["-nostdin", "-buff_size", str(SIPP_BUFFER), "-trace_stat", "-stf", stat.name]
    argv += ["-fd", "1"]
    if short is not None:
        argv += ["-trace_shortmsg", "-shortmessage_file", short.name]
    return argv


def _run_uac(name: str, argv: list[str], workdir: Path, timeout: float, server: Server) -> int:
    proc = Proc(name, argv, workdir / f"{name.replace(' ', '_')}.out", cwd=workdir)
    deadline = time.monotonic() + timeout
    code = None
    while code is None:
        code = proc.wait(0.5)
        if code is not None:
            break
        if not server.running():
            # No point letting sipp retransmit into a dead server until its timeout.
            proc.stop(grace=2.0)
            server.check_alive()
        if time.monotonic() > deadline:
            proc.stop(grace=5.0, sig=signal.SIGUSR1)
            raise BenchError(f"{name} did not finish within {timeout:.0f} s; see {proc.log}")
    proc.stop()
    # 0: every call succeeded, 1: some failed (the counters say which); else sipp broke.
    if code not in (0, 1):
        raise BenchError(f"{name} exited with status {code}; its output:\n{proc.tail()}")
    return code


def _window(start: float, wl: Workload) -> tuple[float, float]:
    begin = start + wl.warmup
    return begin, begin + wl.duration


def _check(checks: dict[str, bool], reasons: list[str], name: str, ok: bool, why: str) -> None:
    checks[name] = ok
    if not ok:
        reasons.append(why)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


STORE_SCENARIO = "store_bench_uac.xml"


def store_argv(
    server: Server, users: Path, calls: int, rate: int, timeout: float, stem: str
) -> list[str]:
    """sipp's command line for ``calls`` MESSAGEs at ``rate``/s (store_bench_uac.xml), its
    stat and short trace named after ``stem`` in the process's working folder."""
    return [
        SIPP,
        f"{HOST}:{server.port}",
        "-sf",
        str(sipp.scenario(STORE_SCENARIO)),
        "-inf",
        str(users),
        "-i",
        HOST,
        "-p",
        str(free_port()),
        "-m",
        str(calls),
        "-r",
        str(rate),
        "-rp",
        "1000",
        "-l",
        str(rate * 40),
        "-default_behaviors",
        "all,-bye",
        "-timeout",
        str(math.ceil(timeout)),
        "-timeout_error",
        "-trace_rtt",
        "-rtt_freq",
        "1000",
        *_common(Path(f"{stem}_stat.csv"), Path(f"{stem}_short.log")),
    ]


def store_timeout(seconds: float, opts: Options) -> float:
    """How long a store sipp may run: its calls, then 40 s of a call's retransmissions."""
    return seconds + 40 + opts.sipp_grace


def store_tally(
    workdir: Path, stem: str, calls: int, window: tuple[float, float] | None, seconds: float
) -> tuple[dict[str, Any], list[sipp.Transaction]]:
    """What one store sipp (files ``stem``_* in ``workdir``) saw: sipp's counters, the
    MESSAGEs answered 202 / 503 / other / not at all, and the latencies of the 202s and of
    the 503s sent in ``window`` (seconds from the first MESSAGE; None = all), whose length
    is ``seconds``. Also the transactions, for callers that look closer."""
    counters = sipp.read_stat(workdir / f"{stem}_stat.csv")
    sipp_ok = sipp.stat_int(counters, "SuccessfulCall(C)")
    failed = sipp.stat_int(counters, "FailedCall(C)")
    retrans = sipp.stat_int(counters, "Retransmissions(C)")
    txs = list(sipp.read_shortmsg(workdir / f"{stem}_short.log").values())
    ok202 = sum(1 for t in txs if t.status == 202)
    shed = sum(1 for t in txs if t.status == 503)
    other = sum(1 for t in txs if t.status is not None and t.status not in (202, 503))
    start = min((t.sent for t in txs), default=0.0)
    begin, end = (start + window[0], start + window[1]) if window else (start, math.inf)
    answered = [t for t in txs if begin <= t.sent < end and t.answered is not None]
    lat202 = [(t.answered - t.sent) * 1000.0 for t in answered if t.status == 202 and t.answered]
    lat503 = [(t.answered - t.sent) * 1000.0 for t in answered if t.status == 503 and t.answered]
    ok_window = sum(1 for t in answered if t.status == 202)
    window_ms = (window[0] * 1000, window[1] * 1000) if window else (0.0, math.inf)
    rtt = [
        ms
        for at, ms in sipp.read_rtt(workdir.glob("store_bench_uac_*_rtt.csv"))
        if window_ms[0] <= at < window_ms[1]
    ]
    tally = {
        "offered_calls": calls,
        # Calls answered 202, as before the scenario accepted 503s (callers compare rows).
        "successful": ok202,
        "sipp_successful": sipp_ok,  # 202s and 503s with Retry-After: sipp's own count
        "failed": failed,
        "retransmissions": retrans,
        "answered_202": ok202,
        "answered_503": shed,
        "answered_other": other,
        "unanswered": calls - ok202 - shed - other,
        "retransmitted_messages": sum(1 for t in txs if t.sends > 1),
        "shares": {
            "202": _share(ok202, calls),
            "503": _share(shed, calls),
            "failed": _share(calls - ok202 - shed, calls),
            "retransmissions": _share(retrans, calls),
        },
        "achieved_rate": ok_window / seconds if seconds > 0 else 0.0,
        "latency_ms": sipp.summarize(lat202),
        "latency_ms_503": sipp.summarize(lat503),
        "latency_ms_rtt_csv": sipp.summarize(rtt),
    }
    return tally, txs


def run_store(
    server: Server, wl: Workload, rate: int, workdir: Path, opts: Options
) -> dict[str, Any]:
    """MESSAGEs to ``wl.users`` offline users at ``rate``/s; every one must be answered 202
    (a 503 fails the step too) and every 202 must be a row."""
    server.reset()
    users = sipp.users_csv(workdir / "users.csv", wl.users)
    calls = round(rate * (wl.warmup + wl.duration))
    timeout = store_timeout(wl.warmup + wl.duration, opts)
    argv = store_argv(server, users, calls, rate, timeout, "store")
    before = server.counters()
    code = _run_uac("sipp store", argv, workdir, timeout + 10, server)
    server.check_alive()
    counted = server.counters()
    out, _ = store_tally(workdir, "store", calls, (wl.warmup, wl.warmup + wl.duration), wl.duration)
    rows = server.count_rows()
    ok202, failed, retrans = out["answered_202"], out["failed"], out["retransmissions"]

    checks: dict[str, bool] = {}
    reasons: list[str] = []
    _check(
        checks,
        reasons,
        "all_calls_made",
        out["sipp_successful"] + failed == calls,
        f"sipp made {out['sipp_successful'] + failed} of {calls} calls (exit {code})",
    )
    _check(
        checks,
        reasons,
        "all_messages_202",
        ok202 == calls,
        f"{ok202} of {calls} MESSAGEs got 202 ({out['answered_503']} 503, "
        f"{out['answered_other']} other, {out['unanswered']} unanswered)",
    )
    _check(checks, reasons, "no_failed_calls", failed == 0, f"{failed} failed calls")
    _check(checks, reasons, "no_retransmissions", retrans == 0, f"{retrans} retransmissions")
    # Every 202 is a row. More rows than 202s means a row was committed but its 202 never
    # reached sipp in time (counted as a failed call above).
    _check(
        checks,
        reasons,
        "every_202_is_a_row",
        rows >= ok202,
        f"{ok202} MESSAGEs answered 202 but only {rows} rows",
    )
    _check(checks, reasons, "no_extra_rows", rows <= ok202, f"{rows} rows for {ok202} 202s")
    _check(
        checks,
        reasons,
        "rate_achieved",
        out["achieved_rate"] >= MIN_ACHIEVED * rate,
        f"only {out['achieved_rate']:.0f}/s answered 202 in the window",
    )
    return {
        **out,
        # The server's counters over the step (e.g. overload_shed): what it did.
        "server_counters": counter_delta(before, counted),
        "rows": rows,
        "checks": checks,
        "passed": not reasons,
        "reasons": reasons,
    }


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The server's counters that moved between two ``Server.counters()`` snapshots."""
    moved = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in moved.items() if v}


def _wait_bound(proc: Proc, port: int, timeout: float = 10.0) -> None:
    """Until sipp has bound its UDP port (binding it ourselves then fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise BenchError(f"{proc.name} exited at start; its output:\n{proc.tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                return
        time.sleep(0.1)
    raise BenchError(f"{proc.name} did not bind {HOST}:{port}; its output:\n{proc.tail()}")


def run_dump(
    server: Server, wl: Workload, rate: int, workdir: Path, opts: Options
) -> dict[str, Any]:
    """Preload users x N rows, REGISTER them at rate/N per second, count what the UAS got."""
    per_user = wl.messages_per_user
    if rate % per_user:
        raise BenchError(f"dump rate {rate} is not a multiple of {per_user} messages per user")
    reg_rate = rate // per_user
    users = wl.users or max(1, round(reg_rate * (wl.warmup + wl.duration)))
    # A fixed user count fixes the step's length instead of the other way round.
    span = users / reg_rate
    server.reset()
    total = server.preload(users, per_user, wl.body_bytes)

    uas_port = free_port()
    contacts = sipp.users_csv(workdir / "contacts.csv", users, (HOST, uas_port))
    uas_stat = workdir / "uas_stat.csv"
    uas_msgs = workdir / "uas_messages.log"
    uas_timeout = span + server.drain_timeout + 120 + opts.sipp_grace
    uas = Proc(
        "sipp UAS",
        [
            SIPP,
            "-sf",
            str(sipp.scenario("message_uas.xml")),
            "-i",
            HOST,
            "-p",
            str(uas_port),
            "-d",
            str(opts.uas_linger_ms),
            "-timeout",
            str(math.ceil(uas_timeout)),
            *_common(uas_stat, None),
            "-trace_msg",
            "-message_file",
            uas_msgs.name,
        ],
        workdir / "sipp_UAS.out",
        cwd=workdir,
    )
    try:
        _wait_bound(uas, uas_port)
        reg_stat, reg_short = workdir / "register_stat.csv", workdir / "register_short.log"
        timeout = span + 40 + opts.sipp_grace
        argv = [
            SIPP,
            f"{HOST}:{server.port}",
            "-sf",
            str(sipp.scenario("register_uac.xml")),
            "-inf",
            str(contacts),
            "-i",
            HOST,
            "-p",
            str(free_port()),
            "-m",
            str(users),
            "-r",
            str(reg_rate),
            "-rp",
            "1000",
            "-l",
            str(max(100, reg_rate * 40)),
            "-default_behaviors",
            "all,-bye",
            "-timeout",
            str(math.ceil(timeout)),
            "-timeout_error",
            "-trace_rtt",
            "-rtt_freq",
            "1000",
            *_common(reg_stat, reg_short),
        ]
        code = _run_uac("sipp register", argv, workdir, timeout + 10, server)
        server.check_alive()
        # Drain: Kamailio deletes delivered rows only in its clean timer (every check_time).
        drained_at = None
        deadline = time.monotonic() + server.drain_timeout
        left = server.count_rows()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = server.count_rows()
        if not left:
            drained_at = time.time()
    finally:
        # Soft quit: sipp stops taking new calls and waits for the lingering ones.
        uas.stop(grace=opts.uas_linger_ms / 1000 + 10, sig=signal.SIGUSR1)
    server.check_alive()

    reg_counters = sipp.read_stat(reg_stat)
    reg_ok = sipp.stat_int(reg_counters, "SuccessfulCall(C)")
    reg_failed = sipp.stat_int(reg_counters, "FailedCall(C)")
    reg_retrans = sipp.stat_int(reg_counters, "Retransmissions(C)")
    uas_counters = sipp.read_stat(uas_stat)
    uas_ok = sipp.stat_int(uas_counters, "SuccessfulCall(C)")
    deliveries = sipp.read_trace_msg(uas_msgs, KEY_PATTERN)

    registers = sipp.read_shortmsg(reg_short)
    # sipp's Call-IDs are "<call number>-<pid>@<ip>", and call N used CSV line N (userN).
    sent_by_user = {tx.call_id.split("-", 1)[0]: tx.sent for tx in registers.values()}
    start = min(sent_by_user.values(), default=0.0)
    begin, end = _window(start, wl)
    reg_latency = [
        (t.answered - t.sent) * 1000.0
        for t in registers.values()
        if t.answered is not None and t.status == 200 and begin <= t.sent < end
    ]
    delivery_latency = []
    delivered_in_window = 0
    for key, at in deliveries.first_arrival.items():
        user = key[2:].split(".", 1)[0]
        if begin <= at < end:
            delivered_in_window += 1
        if user in sent_by_user and begin <= sent_by_user[user] < end:
            delivery_latency.append((at - sent_by_user[user]) * 1000.0)
    last = max(deliveries.first_arrival.values(), default=start)
    measured = min(wl.duration, span - wl.warmup) if span > wl.warmup else span
    achieved = delivered_in_window / measured if measured > 0 else 0.0
    delivered = len(deliveries.first_arrival)
    missing = total - delivered

    checks: dict[str, bool] = {}
    reasons: list[str] = []
    _check(
        checks,
        reasons,
        "all_registers_ok",
        reg_ok == users and reg_failed == 0,
        f"{reg_ok} of {users} REGISTERs got 200, {reg_failed} failed (exit {code})",
    )
    _check(
        checks,
        reasons,
        "no_register_retransmissions",
        reg_retrans == 0,
        f"{reg_retrans} REGISTER retransmissions",
    )
    _check(
        checks,
        reasons,
        "no_message_retransmissions",
        deliveries.retransmissions == 0,
        f"the server retransmitted {deliveries.retransmissions} MESSAGEs",
    )
    _check(
        checks,
        reasons,
        "every_message_once",
        missing == 0 and deliveries.duplicates == 0,
        f"{missing} of {total} messages not delivered, {deliveries.duplicates} delivered twice",
    )
    _check(
        checks,
        reasons,
        "uas_calls_equal_preloaded",
        uas_ok == total,
        f"the UAS completed {uas_ok} calls for {total} preloaded messages",
    )
    _check(checks, reasons, "silo_empty", left == 0, f"{left} rows left in the silo")
    _check(
        checks,
        reasons,
        "rate_achieved",
        achieved >= MIN_ACHIEVED * rate,
        f"only {achieved:.0f} messages/s delivered in the window",
    )
    return {
        "users": users,
        "preloaded": total,
        "register_rate": reg_rate,
        "registers_ok": reg_ok,
        "failed": reg_failed,
        "retransmissions": reg_retrans + deliveries.retransmissions,
        "register_retransmissions": reg_retrans,
        "message_retransmissions": deliveries.retransmissions,
        "delivered": delivered,
        "duplicates": deliveries.duplicates,
        "unkeyed": deliveries.unkeyed,
        "uas_successful_calls": uas_ok,
        "achieved_rate": achieved,
        "delivery_span_s": last - start,
        "drain_s": (drained_at - start) if drained_at else None,
        "latency_ms": sipp.summarize(reg_latency),
        "delivery_latency_ms": sipp.summarize(delivery_latency),
        "rows": left,
        "checks": checks,
        "passed": not reasons,
        "reasons": reasons,
    }


# --- register ---------------------------------------------------------------------------

REGISTER_SCENARIO = "register_bench_uac.xml"
# Refreshes need one Call-ID per user in every round (see register_bench_uac.xml): call N of
# every sipp process of a ramp uses CSV line N, i.e. user N.
REFRESH_CALL_ID = "reg-%u@bench"


@dataclass
class _RegisterRamp:
    """What the steps of one refresh ramp share: the users' contact, and per half of the
    users its source port (a device refreshes from the address it registered from, as a
    phone behind a stable NAT mapping does) and its next CSeq.

    The users are refreshed half by half, each half by its own sipp process on its own
    port: the process of one half finishes while the other half runs, so each half's port
    is free again when its next round starts."""

    uas_port: int
    ports: tuple[int, int]
    cseqs: list[int]
    next_half: int = 0

    @staticmethod
    def halves(users: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(first user, count) of each half."""
        a = (users + 1) // 2
        return (1, a), (a + 1, users - a)


_ramps: dict[tuple[str, str], _RegisterRamp] = {}


def _register_argv(
    server: Server,
    csv: Path,
    calls: int,
    rate: int,
    timeout: float,
    stem: str,
    cid: str | None,
    *,
    port: int | None = None,
) -> list[str]:
    argv = [
        SIPP,
        f"{HOST}:{server.port}",
        "-sf",
        str(sipp.scenario(REGISTER_SCENARIO)),
        "-inf",
        str(csv),
        "-i",
        HOST,
        "-p",
        str(port or free_port()),
        "-m",
        str(calls),
        "-r",
        str(rate),
        "-rp",
        "1000",
        "-l",
        str(max(100, rate * 40)),
        "-default_behaviors",
        "all,-bye",
        "-timeout",
        str(math.ceil(timeout)),
        "-timeout_error",
        *_common(csv.parent / f"{stem}_stat.csv", csv.parent / f"{stem}_short.log"),
    ]
    if cid is not None:
        argv += ["-cid_str", cid]
    return argv


def prepare_ramp(server: Server, wl: Workload, workdir: Path, opts: Options) -> list[str]:
    """Before a refresh ramp: no binding, then every user registered once (CSeq 1);
    before a store ramp: no binding.

    Returns the reasons the ramp cannot run (a priming round that did not get a 200 for
    every user), empty when it can. Nothing to do for other workloads.
    """
    if wl.runner == "store":
        # Its users must be offline: a register ramp earlier in the run left them bindings
        # (to a sipp UAS long gone), and every MESSAGE would be relayed into a timeout.
        server.reset_bindings()
        return []
    if wl.runner != "register" or wl.kind != "refresh":
        return []
    server.reset()
    server.reset_bindings()
    uas_port = free_port()
    primedir = workdir / f"{server.name}-{wl.name}-prime"
    primedir.mkdir(parents=True)
    ports = (free_port(), free_port())
    ok = 0
    for half, ((first, count), port) in enumerate(
        zip(_RegisterRamp.halves(wl.users), ports, strict=True)
    ):
        stem = f"prime{half}"
        csv = sipp.users_csv(primedir / f"{stem}.csv", count, (HOST, uas_port), cseq=1, first=first)
        timeout = count / wl.prime_rate + 40 + opts.sipp_grace
        argv = _register_argv(
            server, csv, count, wl.prime_rate, timeout, stem, REFRESH_CALL_ID, port=port
        )
        _run_uac(f"sipp register {stem}", argv, primedir, timeout + 10, server)
        server.check_alive()
        answered = sipp.read_shortmsg(primedir / f"{stem}_short.log", by_cseq=True).values()
        ok += sum(1 for t in answered if t.status == 200)
    if ok != wl.users:
        return [
            f"priming: {ok} of {wl.users} first REGISTERs at {wl.prime_rate}/s got 200 "
            "(lower --register-prime-rate)"
        ]
    _ramps[(server.name, wl.name)] = _RegisterRamp(uas_port=uas_port, ports=ports, cseqs=[2, 2])
    return []


def _pending_users(covered: set[int], share: float) -> list[int]:
    """Every k-th user (k = 1/share) of those the step registers, so the users with
    messages are spread over the step."""
    if share <= 0:
        return []
    k = max(1, round(1 / share))
    return sorted(u for u in covered if u % k == 0)


def _run_rounds(
    server: Server,
    rounds: list[tuple[Path, int, float, int | None]],
    rate: int,
    opts: Options,
    cid: str | None,
) -> list[str]:
    """Start each round's sipp at its offset (s) from its port (None: any), so the rounds
    follow each other at ``rate`` as one stream; wait for all. Returns the stems of their
    output files."""
    t0 = time.monotonic()
    procs: list[tuple[Proc, float, int | None]] = []
    stems = []
    pending = list(rounds)
    while pending or procs:
        now = time.monotonic()
        while pending and now - t0 >= pending[0][2]:
            csv, calls, _, port = pending.pop(0)
            if port is not None and any(p == port for _, _, p in procs):
                # The half's last round still waits for answers (an overloaded server):
                # this round comes from another address, as a device whose NAT mapping
                # changed would (the server sees a changed binding).
                port = None
            stem = csv.stem
            stems.append(stem)
            timeout = calls / rate + 40 + opts.sipp_grace
            argv = _register_argv(server, csv, calls, rate, timeout, stem, cid, port=port)
            proc = Proc(f"sipp register {stem}", argv, csv.parent / f"{stem}.out", cwd=csv.parent)
            procs.append((proc, now + timeout + 10, port))
        still = []
        for proc, deadline, port in procs:
            code = proc.wait(0)
            if code is None:
                if time.monotonic() > deadline:
                    proc.stop(grace=5.0, sig=signal.SIGUSR1)
                    raise BenchError(f"{proc.name} did not finish in time; see {proc.log}")
                still.append((proc, deadline, port))
                continue
            proc.stop()
            if code not in (0, 1):
                raise BenchError(f"{proc.name} exited with status {code}:\n{proc.tail()}")
        procs = still
        if not server.running():
            for proc, _, _ in procs:
                proc.stop(grace=2.0)
            server.check_alive()
        time.sleep(0.02 if pending else 0.2)
    return stems


def run_register(
    server: Server, wl: Workload, rate: int, workdir: Path, opts: Options
) -> dict[str, Any]:
    """REGISTERs at ``rate``/s: first registrations or refreshes, empty or with messages."""
    calls = round(rate * (wl.warmup + wl.duration))
    server.reset()
    cid: str | None
    rounds: list[tuple[Path, int, float, int | None]]
    if wl.kind == "first":
        # Every REGISTER of the step is an AoR without a binding.
        server.reset_bindings()
        users, uas_port, cid = calls, free_port(), None
        csv = sipp.users_csv(workdir / "reg0.csv", calls, (HOST, uas_port), 1)
        rounds = [(csv, calls, 0.0, None)]
        covered = set(range(1, calls + 1))
    else:
        ramp = _ramps.get((server.name, wl.name))
        if ramp is None:
            raise BenchError(f"{wl.name}: the ramp was not primed (prepare_ramp)")
        users, uas_port, cid = wl.users, ramp.uas_port, REFRESH_CALL_ID
        rounds = []
        covered = set()
        left, offset = calls, 0.0
        halves = ramp.halves(users)
        while left > 0:
            half = ramp.next_half
            first, size = halves[half]
            n = min(left, size)
            csv = sipp.users_csv(
                workdir / f"reg{len(rounds)}.csv", n, (HOST, uas_port), ramp.cseqs[half],
                first=first,
            )  # fmt: skip
            rounds.append((csv, n, offset, ramp.ports[half]))
            covered.update(range(first, first + n))
            ramp.cseqs[half] += 1
            ramp.next_half = 1 - half
            left -= n
            offset += size / rate
    # Only users that register in this step can get their messages (a refresh step at a
    # low rate covers only the first users of the population).
    with_messages = _pending_users(covered, wl.pending_share)
    total = (
        server.preload(with_messages, wl.messages_per_user, wl.body_bytes) if with_messages else 0
    )

    uas_stat, uas_msgs = workdir / "uas_stat.csv", workdir / "uas_messages.log"
    span = calls / rate
    uas = Proc(
        "sipp UAS",
        [
            SIPP,
            "-sf",
            str(sipp.scenario("message_uas.xml")),
            "-i",
            HOST,
            "-p",
            str(uas_port),
            "-d",
            str(opts.uas_linger_ms),
            "-timeout",
            str(math.ceil(span + server.drain_timeout + 120 + opts.sipp_grace)),
            *_common(uas_stat, None),
            "-trace_msg",
            "-message_file",
            uas_msgs.name,
        ],
        workdir / "sipp_UAS.out",
        cwd=workdir,
    )
    left = 0
    try:
        _wait_bound(uas, uas_port)
        # The host's idle CPU while the REGISTERs run (the issue compares "host % idle").
        cpu_before, load_before = cpu_sample(), os.getloadavg()[0]
        counted = server.counters()
        stems = _run_rounds(server, rounds, rate, opts, cid)
        host_idle = idle_share(cpu_before, cpu_sample())
        counted = counter_delta(counted, server.counters())
        server.check_alive()
        if total:
            deadline = time.monotonic() + server.drain_timeout
            left = server.count_rows()
            while left and time.monotonic() < deadline:
                time.sleep(0.5)
                left = server.count_rows()
        else:
            left = server.count_rows()
    finally:
        uas.stop(grace=opts.uas_linger_ms / 1000 + 10, sig=signal.SIGUSR1)
    server.check_alive()
    bindings = server.count_bindings()

    successful = failed = retrans = 0
    txs: list[sipp.Transaction] = []
    for stem in stems:
        counters = sipp.read_stat(workdir / f"{stem}_stat.csv")
        successful += sipp.stat_int(counters, "SuccessfulCall(C)")
        failed += sipp.stat_int(counters, "FailedCall(C)")
        retrans += sipp.stat_int(counters, "Retransmissions(C)")
        txs += sipp.read_shortmsg(workdir / f"{stem}_short.log", by_cseq=True).values()
    ok200 = sum(1 for t in txs if t.status == 200)
    shed = sum(1 for t in txs if t.status == 503)
    other = sum(1 for t in txs if t.status is not None and t.status not in (200, 503))
    resent = sum(1 for t in txs if t.sends > 1)
    start = min((t.sent for t in txs), default=0.0)
    begin, end = _window(start, wl)
    window = [t for t in txs if begin <= t.sent < end and t.answered is not None]
    lat200 = [(t.answered - t.sent) * 1000.0 for t in window if t.status == 200 and t.answered]
    lat503 = [(t.answered - t.sent) * 1000.0 for t in window if t.status == 503 and t.answered]
    achieved = sum(1 for t in window if t.status == 200) / wl.duration
    uas_ok = sipp.stat_int(sipp.read_stat(uas_stat), "SuccessfulCall(C)")
    deliveries = sipp.read_trace_msg(uas_msgs, KEY_PATTERN)
    missing = total - len(deliveries.first_arrival)

    checks: dict[str, bool] = {}
    reasons: list[str] = []
    _check(
        checks,
        reasons,
        "all_calls_made",
        successful + failed == calls,
        f"sipp made {successful + failed} of {calls} calls",
    )
    _check(
        checks,
        reasons,
        "all_registers_200",
        ok200 == calls,
        f"{ok200} of {calls} REGISTERs got 200 ({shed} 503, {other} other, "
        f"{calls - ok200 - shed - other} unanswered)",
    )
    _check(checks, reasons, "no_failed_calls", failed == 0, f"{failed} failed calls")
    _check(checks, reasons, "no_retransmissions", retrans == 0, f"{retrans} retransmissions")
    _check(
        checks,
        reasons,
        "no_message_retransmissions",
        deliveries.retransmissions == 0,
        f"the server retransmitted {deliveries.retransmissions} MESSAGEs",
    )
    _check(
        checks,
        reasons,
        "every_message_once",
        missing == 0 and deliveries.duplicates == 0 and deliveries.unkeyed == 0,
        f"{missing} of {total} messages not delivered, {deliveries.duplicates} twice, "
        f"{deliveries.unkeyed} unexpected",
    )
    _check(
        checks,
        reasons,
        "uas_calls_equal_preloaded",
        uas_ok == total,
        f"the UAS completed {uas_ok} calls for {total} preloaded messages",
    )
    _check(checks, reasons, "silo_empty", left == 0, f"{left} rows left in the silo")
    if bindings is not None:
        # Durable registrars: every user that got a 200 has its row (first: one per AoR).
        expected = ok200 if wl.kind == "first" else users
        _check(
            checks,
            reasons,
            "every_200_is_a_binding",
            bindings >= expected,
            f"{bindings} bindings in the table for {expected} registered users",
        )
    _check(
        checks,
        reasons,
        "rate_achieved",
        achieved >= MIN_ACHIEVED * rate,
        f"only {achieved:.0f}/s answered 200 in the window",
    )
    return {
        "kind": wl.kind,
        "users": users,
        "rounds": len(rounds),
        "offered_calls": calls,
        "successful": successful,
        "failed": failed,
        "retransmissions": retrans + deliveries.retransmissions,
        "register_retransmissions": retrans,
        "message_retransmissions": deliveries.retransmissions,
        "answered_200": ok200,
        "answered_503": shed,
        "answered_other": other,
        "unanswered": calls - ok200 - shed - other,
        "retransmitted_registers": resent,
        "shares": {
            "200": _share(ok200, calls),
            "503": _share(shed, calls),
            "failed": _share(calls - ok200 - shed, calls),
            "retransmissions": _share(retrans, calls),
        },
        "preloaded": total,
        "registers_with_messages": len(with_messages),
        "delivered": len(deliveries.first_arrival),
        "duplicates": deliveries.duplicates,
        "uas_successful_calls": uas_ok,
        "bindings": bindings,
        "achieved_rate": achieved,
        "host_idle_share": host_idle,
        "load_average_before": load_before,
        # The server's counters over the step (e.g. refreshes_deferred): what it did.
        "server_counters": counted,
        "latency_ms": sipp.summarize(lat200),
        "latency_ms_503": sipp.summarize(lat503),
        "rows": left,
        "checks": checks,
        "passed": not reasons,
        "reasons": reasons,
    }


RUNNERS = {"store": run_store, "dump": run_dump, "register": run_register}
