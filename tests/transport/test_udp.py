"""SIP over real UDP sockets: round trips, RFC 3581 rport, bad datagrams."""

from __future__ import annotations

import asyncio

from msilo.sip.build import build_request

from .conftest import MiniServer, parse_response, udp_peer


def _options(
    port: int, *, via_port: int | None = None, rport: bool = True, branch: str | None = None
) -> bytes:
    data = build_request(
        "OPTIONS",
        "sip:test@127.0.0.1",
        from_="sip:tester@127.0.0.1",
        to="sip:test@127.0.0.1",
        sent_by=("127.0.0.1", via_port or port),
        branch=branch,
    ).data
    return data if rport else data.replace(b";rport", b"", 1)


async def test_udp_request_gets_a_200_from_the_handler(server: MiniServer) -> None:
    peer = await udp_peer()
    try:
        peer.send(_options(peer.port), server.udp)
        data, addr = await peer.receive()
    finally:
        peer.close()
    response = parse_response(data)
    assert response.status == 200 and response.cseq is not None
    assert response.cseq.method == "OPTIONS"
    assert addr == server.udp  # answered from the listening socket
    assert server.seen[0][1] == "UDP"


async def test_rport_response_goes_to_the_source_port_not_the_via_port(
    server: MiniServer,
) -> None:
    peer = await udp_peer()
    decoy = await udp_peer()  # listens on the Via port: must get nothing
    try:
        peer.send(_options(peer.port, via_port=decoy.port), server.udp)
        data, _ = await peer.receive()
        response = parse_response(data)
        assert response.via is not None
        assert response.via.rport == peer.port and response.via.received == "127.0.0.1"
        assert decoy.queue.empty()
    finally:
        peer.close()
        decoy.close()


async def test_without_rport_the_response_goes_to_the_via_port(server: MiniServer) -> None:
    peer = await udp_peer()
    listener = await udp_peer()
    try:
        peer.send(_options(peer.port, via_port=listener.port, rport=False), server.udp)
        data, _ = await listener.receive()
        assert parse_response(data).status == 200
        assert peer.queue.empty()
    finally:
        peer.close()
        listener.close()


async def test_retransmitted_datagram_is_replayed_not_reprocessed(server: MiniServer) -> None:
    peer = await udp_peer()
    try:
        request = _options(peer.port, branch="z9hG4bK-retrans-1")
        peer.send(request, server.udp)
        first, _ = await peer.receive()
        peer.send(request, server.udp)
        second, _ = await peer.receive()
    finally:
        peer.close()
    assert first == second
    assert len(server.seen) == 1
    assert server.layer.stats.responses_replayed == 1


async def test_malformed_request_gets_400_and_garbage_is_dropped(server: MiniServer) -> None:
    peer = await udp_peer()
    try:
        broken = _options(peer.port).replace(b"CSeq: 1 OPTIONS", b"CSeq: one OPTIONS")
        peer.send(broken, server.udp)
        data, _ = await peer.receive()
        # The 400 copies the request's (broken) CSeq, so only its status line is checked.
        assert data.startswith(b"SIP/2.0 400 Bad Request\r\n")
        assert b"Call-ID: " in data and b";tag=" in data
        peer.send(b"\x00\x01\x00\x00 stun-ish binding request....", server.udp)
        peer.send(b"complete garbage that is long enough to be parsed", server.udp)
        peer.send(b"\r\n\r\n", server.udp)
        peer.send(_options(peer.port), server.udp)  # the endpoint still works
        data, _ = await peer.receive()
        assert parse_response(data).status == 200
        await asyncio.sleep(0.05)
        assert peer.queue.empty()
    finally:
        peer.close()
