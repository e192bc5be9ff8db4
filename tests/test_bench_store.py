"""The store benchmark's overload plumbing (bench/e2e): a 503 with Retry-After ends a call
without a failure, the harness tells 202s from 503s, and the recovery after an overload is
read from the per-MESSAGE send and answer times."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

from bench.e2e import sipp, steps
from bench.e2e.overload import recovery_seconds, seconds_after
from bench.e2e.procs import free_port

SIPP = shutil.which("sipp")
ENDED = 1000.0  # the overload's last MESSAGE, s


def _responder(sock: socket.socket, stop: threading.Event) -> None:
    """user1: 202; user2: 503 with Retry-After; user3: 503 without it."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        lines = data.decode().split("\r\n")
        keep = [
            ln for ln in lines if ln.split(":", 1)[0] in ("Via", "From", "To", "Call-ID", "CSeq")
        ]
        to = next(ln for ln in lines if ln.startswith("To:"))
        if "user1@" in to:
            status, extra = "202 Accepted", []
        elif "user2@" in to:
            status, extra = "503 Service Unavailable", ["Retry-After: 5"]
        else:
            status, extra = "503 Service Unavailable", []
        head = [f"SIP/2.0 {status}", *keep, *extra, "Content-Length: 0"]
        sock.sendto(("\r\n".join(head) + "\r\n\r\n").encode(), addr)


def test_503_with_retry_after_ends_the_call_and_is_counted(tmp_path: Path) -> None:
    assert SIPP is not None, "sipp is a test dependency (make test-deps: sip-tester)"
    users = sipp.users_csv(tmp_path / "users.csv", 3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        stop = threading.Event()
        thread = threading.Thread(target=_responder, args=(sock, stop), daemon=True)
        thread.start()
        try:
            result = subprocess.run(
                [SIPP, f"127.0.0.1:{sock.getsockname()[1]}",
                 "-sf", str(sipp.scenario(steps.STORE_SCENARIO)), "-inf", str(users),
                 "-i", "127.0.0.1", "-p", str(free_port()), "-m", "6", "-r", "100",
                 "-default_behaviors", "all,-bye", "-timeout", "20", "-timeout_error",
                 "-nostdin", "-trace_stat", "-stf", "store_stat.csv",
                 "-trace_shortmsg", "-shortmessage_file", "store_short.log"],
                cwd=tmp_path, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            stop.set()
            thread.join(5)
    # 1: some calls failed -- the 503s without Retry-After.
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    out, txs = steps.store_tally(tmp_path, "store", 6, None, 1.0)
    assert (out["answered_202"], out["answered_503"], out["unanswered"]) == (2, 4, 0)
    assert (out["sipp_successful"], out["failed"]) == (4, 2)
    assert out["successful"] == 2  # the calls answered 202, as the rows are compared to
    assert out["latency_ms"]["count"] == 2 and out["latency_ms_503"]["count"] == 4
    assert len(txs) == 6


def _tx(
    n: int, sent: float, latency_ms: float | None, status: int = 202, sends: int = 1
) -> sipp.Transaction:
    answered = None if latency_ms is None else sent + latency_ms / 1000.0
    return sipp.Transaction(f"{n}", sent, answered, status if answered else None, sends)


def _load(per_second: list[tuple[int, float | None, int]], n: int = 10) -> list[sipp.Transaction]:
    """``n`` MESSAGEs a second after ENDED, 2 ms each but per second (how many are not,
    their latency ms or None = unanswered, their status)."""
    txs = []
    for second, (bad, latency, status) in enumerate(per_second):
        for i in range(n):
            sent = ENDED + second + i / n
            txs.append(_tx(len(txs), sent, latency, status) if i < bad else _tx(len(txs), sent, 2))
    return txs


def test_recovery_is_the_second_after_the_last_abnormal_one() -> None:
    # 503s in second 0, a slow second 1, an unanswered MESSAGE in second 2, then normal.
    txs = _load([(10, 1, 503), (10, 400, 202), (1, None, 202), (0, 2, 202), (0, 2, 202)])
    assert recovery_seconds(txs, ENDED) == 3.0
    assert [s.answered_202 for s in seconds_after(txs, ENDED)] == [0, 10, 9, 10, 10]


def test_a_server_normal_from_the_start_recovers_in_zero_seconds() -> None:
    txs = _load([(0, 2, 202)] * 3)
    # One sent while the overload's last MESSAGE went out still belongs to second 0.
    txs.append(_tx(99, ENDED - 0.01, 3))
    assert recovery_seconds(txs, ENDED) == 0.0


def test_one_bad_second_later_moves_the_recovery_past_it() -> None:
    # Normal, then a retransmitted MESSAGE in second 2: normal only from second 3 on.
    txs = _load([(0, 2, 202)] * 5)
    txs[25].sends = 2
    assert recovery_seconds(txs, ENDED) == 3.0


def test_a_slow_tail_beyond_the_p99_is_normal_but_a_slow_second_is_not() -> None:
    # 2 MESSAGEs in 200 at 400 ms are beyond the p99; 3 are not, nor a whole second at 60 ms.
    assert recovery_seconds(_load([(2, 400, 202), (0, 2, 202)], n=200), ENDED) == 0.0
    assert recovery_seconds(_load([(3, 400, 202), (0, 2, 202)], n=200), ENDED) == 1.0
    assert recovery_seconds(_load([(10, 60, 202), (0, 2, 202)]), ENDED) == 1.0
    assert recovery_seconds(_load([(10, 40, 202), (0, 2, 202)]), ENDED) == 0.0


def test_a_server_still_abnormal_at_the_end_has_not_recovered() -> None:
    assert recovery_seconds(_load([(0, 2, 202), (10, 1, 503)]), ENDED) is None
    assert recovery_seconds([], ENDED) is None


def test_the_last_calls_of_a_late_sipp_are_part_of_the_last_second() -> None:
    # A 2-s load whose sipp started 0.3 s late: its last calls fall in second 2.
    txs = [_tx(n, ENDED + 0.3 + n / 10, 2) for n in range(20)]
    for t in txs[:10]:
        t.status = 503
    assert [s.calls for s in seconds_after(txs, ENDED)] == [7, 10, 3]
    assert [s.calls for s in seconds_after(txs, ENDED, 2.0)] == [7, 13]
    # Alone, the 3 normal calls of "second 2" would be a recovery after 2 s of a 2-s load.
    assert recovery_seconds(txs, ENDED) == 2.0
    assert recovery_seconds(txs, ENDED, 2.0) is None
