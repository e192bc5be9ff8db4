"""Socket binding (SO_REUSEPORT, client port, IPv6) and sending to names."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
import uvloop

from msilo.sip.build import build_request
from msilo.transport import Target, bind_client_udp, bind_tcp, bind_udp

from .conftest import MiniServer, free_port_pair, parse_request, parse_response, start_server
from .conftest import udp_peer as _udp_peer


async def test_tests_here_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


def test_two_sockets_share_a_port_with_so_reuseport() -> None:
    udp, tcp = free_port_pair()
    port = udp.getsockname()[1]
    udp.close()
    tcp.close()
    socks = [
        bind_udp("127.0.0.1", port),
        bind_udp("127.0.0.1", port),
        bind_tcp("127.0.0.1", port),
        bind_tcp("127.0.0.1", port),
    ]
    try:
        assert {s.getsockname()[1] for s in socks} == {port}
        # A process's private client port is never shared.
        with pytest.raises(OSError) as info:
            bind_client_udp("127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
        private = bind_client_udp("127.0.0.1")
        try:
            with pytest.raises(OSError):
                bind_udp("127.0.0.1", private.getsockname()[1])
        finally:
            private.close()
    finally:
        for s in socks:
            s.close()


def test_client_socket_gets_its_own_ephemeral_port() -> None:
    a = bind_client_udp("127.0.0.1")
    b = bind_client_udp("127.0.0.1")
    try:
        assert a.getsockname()[1] != b.getsockname()[1]
        assert not a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        a.close()
        b.close()


def test_ipv6_sockets_bind() -> None:
    try:
        sock = bind_udp("::1", 0)
    except OSError as exc:  # pragma: no cover - host without IPv6
        pytest.skip(f"no IPv6 loopback: {exc}")
    tcp = bind_tcp("[::1]", 0)
    try:
        assert sock.family == socket.AF_INET6 and tcp.family == socket.AF_INET6
    finally:
        sock.close()
        tcp.close()


async def test_two_servers_on_one_port_both_answer() -> None:
    first = await start_server()
    second = await start_server(port=first.port)
    peers = [await _udp_peer() for _ in range(16)]
    try:
        for i, peer in enumerate(peers):
            peer.send(
                build_request(
                    "OPTIONS",
                    "sip:x@127.0.0.1",
                    from_="sip:a@127.0.0.1",
                    to="sip:x@127.0.0.1",
                    sent_by=("127.0.0.1", peer.port),
                    call_id=f"reuse-{i}",
                ).data,
                first.udp,
            )
        answers = [parse_response((await peer.receive())[0]) for peer in peers]
        assert all(a.status == 200 for a in answers)
        # The kernel spread the peers over both processes' sockets (or at least
        # one served them all): nothing was lost either way.
        assert len(first.seen) + len(second.seen) == 16
    finally:
        for peer in peers:
            peer.close()
        for srv in (first, second):
            srv.layer.close()
            await srv.transports.close()


async def test_requests_leave_from_the_listening_port_named_in_via(server: MiniServer) -> None:
    # A device behind NAT only hears the address and port it registered to (RFC 4787 §5).
    ua = await _udp_peer()
    try:
        txn = server.layer.request(
            "MESSAGE",
            f"sip:bob@127.0.0.1:{ua.port}",
            Target("127.0.0.1", ua.port),
            from_="sip:msilo@127.0.0.1",
            to="sip:bob@127.0.0.1",
            body=b"hello",
            date=True,
            content_type="text/plain",
        )
        data, addr = await ua.receive()
        request = parse_request(data)
        assert request.via is not None
        assert addr[1] == server.transports.sent_by("UDP")[1] == request.via.port == server.port
        answer = f"SIP/2.0 202 Accepted\r\nVia: {request.via.raw}\r\n".encode()
        for name in ("from", "to", "call-id", "cseq"):
            answer += f"{name}: {request.get_header(name)}\r\n".encode()
        ua.send(answer + b"Content-Length: 0\r\n\r\n", addr)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        ua.close()
    assert result.status == 202 and result.response is not None


async def test_hostname_targets_are_resolved(server: MiniServer) -> None:
    txn = server.layer.request(
        "OPTIONS",
        f"sip:x@localhost:{server.port}",
        Target("localhost", server.port),
        from_="sip:msilo@127.0.0.1",
        to="sip:x@localhost",
    )
    result = await asyncio.wait_for(txn.wait(), 5)
    assert result.status == 200


async def test_unresolvable_host_completes_with_503(server: MiniServer) -> None:
    txn = server.layer.request(
        "MESSAGE",
        "sip:bob@host.invalid",
        Target("host.invalid"),
        from_="sip:msilo@127.0.0.1",
        to="sip:bob@host.invalid",
    )
    result = await asyncio.wait_for(txn.wait(), 10)
    assert result.status == 503 and result.local
