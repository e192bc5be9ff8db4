"""Datagrams from one peer are spread over the sockets sharing a port, by content.

Real sockets on 127.0.0.1: two UDP sockets in one SO_REUSEPORT group stand for two
workers, one client socket stands for the proxy in front of them.
"""

from __future__ import annotations

import socket
import time
from collections import Counter

import pytest

from msilo.transport.sockets import bind_udp
from msilo.transport.spread import HEAD_BYTES, program, spread_by_content


def _request(n: int) -> bytes:
    """A MESSAGE as a proxy forwards it: same request line every time, its own branch."""
    return (
        "MESSAGE sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-proxy-{n}\r\n"
        "Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=a1\r\n"
        f"To: <sip:bob@example.com>\r\nCall-ID: c{n}@192.0.2.1\r\nCSeq: 1 MESSAGE\r\n"
        "Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    ).encode()


def _group(spread: bool) -> tuple[list[socket.socket], int]:
    first = bind_udp("127.0.0.1", 0)
    port = first.getsockname()[1]
    group = [first, bind_udp("127.0.0.1", port)]
    if spread:
        assert all(spread_by_content(sock, 2) for sock in group)
    return group, port


def _drain(group: list[socket.socket], expected: int) -> tuple[Counter[int], dict[bytes, set[int]]]:
    """Which socket got how many datagrams, and which socket(s) each distinct datagram hit."""
    counts: Counter[int] = Counter()
    seen: dict[bytes, set[int]] = {}
    deadline = time.monotonic() + 5
    while sum(counts.values()) < expected and time.monotonic() < deadline:
        for i, sock in enumerate(group):
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                continue
            counts[i] += 1
            seen.setdefault(data, set()).add(i)
    return counts, seen


def _send(port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:  # one source port
        for data in datagrams:
            peer.sendto(data, ("127.0.0.1", port))
            time.sleep(0.0005)  # stay well inside the socket buffers


def test_one_peer_reaches_both_sockets_and_a_retransmission_the_same_one() -> None:
    group, port = _group(spread=True)
    try:
        requests = [_request(n) for n in range(300)]
        assert all(len(r) >= HEAD_BYTES for r in requests)
        # Each request three times, as a UAC retransmits over UDP.
        _send(port, [r for r in requests for _ in range(3)])
        counts, seen = _drain(group, 900)
        assert sum(counts.values()) == 900
        assert min(counts[0], counts[1]) > 900 * 0.3, counts
        assert all(len(sockets) == 1 for sockets in seen.values())
    finally:
        for sock in group:
            sock.close()


def test_without_the_program_one_peer_lands_on_one_socket() -> None:
    # The kernel's default that the program exists to overcome.
    group, port = _group(spread=False)
    try:
        _send(port, [_request(n) for n in range(50)])
        counts, _ = _drain(group, 50)
        assert sorted(counts.values()) == [50]
    finally:
        for sock in group:
            sock.close()


def test_short_datagrams_are_delivered_too() -> None:
    # Keep-alives and stray bytes are shorter than the hashed head: the program must not
    # read past their end (the kernel would then pick socket 0 by aborting it, or drop).
    group, port = _group(spread=True)
    try:
        _send(port, [b"\r\n\r\n", b"x", b"OPTIONS sip:a SIP/2.0\r\n" * 3])
        counts, _ = _drain(group, 3)
        assert sum(counts.values()) == 3
    finally:
        for sock in group:
            sock.close()


def test_one_worker_needs_no_program_and_zero_groups_is_refused() -> None:
    sock = bind_udp("127.0.0.1", 0)
    try:
        assert spread_by_content(sock, 1) is False
    finally:
        sock.close()
    with pytest.raises(ValueError):
        program(0)


@pytest.mark.parametrize("groups", [2, 3, 8])
def test_the_program_always_returns_an_index_below_the_group_size(groups: int) -> None:
    insns = program(groups)
    assert len(insns) < 4096  # BPF_MAXINSNS
    assert insns[-2] == (0x04 | 0x90, 0, 0, groups)  # A %= groups, then return A


def test_a_refused_program_is_logged_and_the_kernel_hash_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The kernel refuses the program on a socket outside a reuseport group (as an old or
    # locked-down kernel would on any): one warning, no exception, datagrams still flow.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        assert spread_by_content(sock, 2) is False
        assert "event=spread_unavailable" in caplog.text
        _send(sock.getsockname()[1], [_request(1)])
        sock.settimeout(2)
        assert sock.recv(65535) == _request(1)
    finally:
        sock.close()
