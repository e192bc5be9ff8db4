"""The register benchmark's sipp plumbing: refresh rounds keep their Call-IDs, and the
harness tells the rounds' transactions and their 200s / 503s apart (bench/e2e)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

from bench.e2e import sipp, steps
from bench.e2e.procs import free_port
from bench.e2e.report import _pct

SIPP = shutil.which("sipp")


def _responder(sock: socket.socket, stop: threading.Event) -> None:
    """Answer each REGISTER: CSeq 2 of user2 gets 503, everything else 200."""
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
        cseq = next(ln for ln in lines if ln.startswith("CSeq:"))
        to = next(ln for ln in lines if ln.startswith("To:"))
        status = (
            "503 Service Unavailable"
            if "user2@" in to and cseq.startswith("CSeq: 2 ")
            else "200 OK"
        )
        reply = f"SIP/2.0 {status}\r\n" + "\r\n".join(keep) + "\r\nContent-Length: 0\r\n\r\n"
        sock.sendto(reply.encode(), addr)


def _round(tmp: Path, port: int, cseq: int, users: int) -> Path:
    csv = sipp.users_csv(tmp / f"r{cseq}.csv", users, ("127.0.0.1", 9), cseq)
    short = tmp / f"r{cseq}_short.log"
    assert SIPP is not None, "sipp is a test dependency (make test-deps: sip-tester)"
    result = subprocess.run(
        [SIPP, f"127.0.0.1:{port}", "-sf", str(sipp.scenario(steps.REGISTER_SCENARIO)),
         "-inf", str(csv), "-i", "127.0.0.1", "-p", str(free_port()), "-m", str(users),
         "-r", "200",
         "-cid_str", steps.REFRESH_CALL_ID, "-nostdin", "-timeout", "20", "-timeout_error",
         "-default_behaviors", "all,-bye", "-trace_shortmsg", "-shortmessage_file", short.name],
        cwd=tmp, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return short


def test_refresh_rounds_reuse_call_ids_and_count_503(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        stop = threading.Event()
        thread = threading.Thread(target=_responder, args=(sock, stop), daemon=True)
        thread.start()
        try:
            port = sock.getsockname()[1]
            first = _round(tmp_path, port, 1, 3)
            second = _round(tmp_path, port, 2, 3)
        finally:
            stop.set()
            thread.join(5)
    one = sipp.read_shortmsg(first, by_cseq=True)
    two = sipp.read_shortmsg(second, by_cseq=True)
    # User N keeps Call-ID reg-N@bench in every round; only the CSeq grows (a refresh).
    assert {t.call_id for t in one.values()} == {f"reg-{n}@bench" for n in (1, 2, 3)}
    assert {t.call_id for t in two.values()} == {t.call_id for t in one.values()}
    both = list(one.values()) + list(two.values())
    assert sorted(t.status or 0 for t in both) == [200, 200, 200, 200, 200, 503]
    assert all(t.sends == 1 and t.answered is not None for t in both)
    # Keyed by Call-ID alone, the two rounds of one file set would collide.
    merged = tmp_path / "both.log"
    merged.write_text(first.read_text() + second.read_text())
    assert len(sipp.read_shortmsg(merged)) == 3
    assert len(sipp.read_shortmsg(merged, by_cseq=True)) == 6


def test_shares_never_round_to_all_or_nothing() -> None:
    assert _pct(47984 / 48000) == "99.97"
    assert _pct(1 / 100_000) == "0.001"
    assert (_pct(0.0), _pct(1.0), _pct(0.5)) == ("0", "100", "50.0")


def test_refresh_halves_cover_every_user_once(tmp_path: Path) -> None:
    for users in (1, 2, 5, 20000):
        (a_first, a_count), (b_first, b_count) = steps._RegisterRamp.halves(users)
        assert a_first == 1 and b_first == a_count + 1 and a_count + b_count == users
    csv = sipp.users_csv(tmp_path / "b.csv", 2, ("127.0.0.1", 9), 4, first=3)
    assert csv.read_text().splitlines() == [
        "SEQUENTIAL",
        "user3;127.0.0.1;9;4;",
        "user4;127.0.0.1;9;4;",
    ]
