"""Requests leave from the shared UDP port; responses reach their sender through the hand-off;
a request for a connection another worker holds is written there.

Several "processes" (a Transports + TransactionLayer + Handoff each) share one port in this
event loop, as the supervisor's workers do across processes.  A reuseport program that sends
every datagram to the second socket of the group makes "the response reached the other
worker" deterministic.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import connect

from msilo.errors import TransportError
from msilo.sip.build import new_branch
from msilo.sip.message import SipRequest
from msilo.transaction import ServerTransaction, TransactionLayer
from msilo.transaction.client import ClientTransaction
from msilo.transport import Target, Transports
from msilo.transport.base import UDP, Source
from msilo.transport.handoff import (
    LEADER,
    MAX_FRAME,
    WORKER,
    Handoff,
    branch_tag,
    branch_with_tag,
    live_workers,
    process_tag,
    socket_name,
)
from msilo.transport.spread import always, attach

from .conftest import (
    PARSE,
    UdpPeer,
    free_port_pair,
    parse_request,
    read_message,
    start_server,
    udp_peer,
)


@dataclass
class Proc:
    """One process of a deployment: its transports, transaction layer and hand-off."""

    transports: Transports
    layer: TransactionLayer
    handoff: Handoff
    seen: list[SipRequest] = field(default_factory=list)
    handed_off: int = 0  # what the worker counts as requests_handed_off

    def count_handed_off(self) -> None:
        self.handed_off += 1

    def request(self, target: Target) -> ClientTransaction:
        """An OPTIONS to ``target`` (a device's connection, by its address)."""
        return self.layer.request(
            "OPTIONS",
            f"sip:bob@127.0.0.1:{target.port};transport={target.transport.lower()}",
            target,
            from_="sip:msilo@127.0.0.1",
            to="sip:bob@127.0.0.1",
        )

    def message(self, peer: UdpPeer) -> ClientTransaction:
        return self.layer.request(
            "MESSAGE",
            f"sip:bob@127.0.0.1:{peer.port}",
            Target("127.0.0.1", peer.port),
            from_="sip:msilo@127.0.0.1",
            to="sip:bob@127.0.0.1",
            body=b"hello",
            content_type="text/plain",
        )

    async def close(self) -> None:
        self.layer.close()
        await self.transports.close()


async def start_proc(deployment: str, role: str, slot: int, port: int) -> Proc:
    transports = Transports()
    tag = process_tag(role, slot)
    seen: list[SipRequest] = []

    def handler(request: SipRequest, txn: ServerTransaction) -> None:
        seen.append(request)
        txn.respond(200, "OK")

    def on_response(data: bytes, peer: Any) -> None:
        layer.receive(data, Source(UDP, peer, handoff), handed=True)

    handoff = Handoff(
        deployment,
        tag,
        on_response=on_response,
        on_send=transports.send_from_listener if role == WORKER else None,
        on_connection=transports.write_held if role == WORKER else None,
    )
    layer = TransactionLayer(
        handler,
        transports.send,
        sent_by=transports.sent_by,
        parse=PARSE,
        tag=tag,
        forward=handoff.forward,
    )
    transports.on_message = layer.receive
    handoff.open()
    if role == WORKER:
        await transports.listen_udp("127.0.0.1", port)
    else:
        await transports.open_client_udp("127.0.0.1")
    proc = Proc(transports, layer, handoff, seen)
    transports.use_handoff(handoff, [("127.0.0.1", port)], proc.count_handed_off)
    return proc


@dataclass
class Deployment:
    name: str
    port: int
    procs: list[Proc] = field(default_factory=list)

    async def start(self, role: str, slot: int) -> Proc:
        proc = await start_proc(self.name, role, slot, self.port)
        self.procs.append(proc)
        return proc

    def steer_to(self, proc: Proc, index: int) -> None:
        """Every datagram to the port goes to the group's socket at ``index`` from now on."""
        sock = proc.transports.udp_listeners[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
        attach(sock, always(index))


@pytest.fixture
async def deployment() -> AsyncIterator[Deployment]:
    udp, tcp = free_port_pair()
    port = udp.getsockname()[1]
    udp.close()
    tcp.close()
    dep = Deployment(f"t{uuid.uuid4().hex[:10]}", port)
    yield dep
    for proc in dep.procs:
        await proc.close()


async def answer(peer: UdpPeer, status: str = "200 OK") -> tuple[SipRequest, Any]:
    """Receive one request and answer it where it came from (RFC 3581 rport)."""
    data, addr = await peer.receive()
    request = parse_request(data)
    assert request.via is not None
    lines = [f"SIP/2.0 {status}", f"Via: {request.via.raw}"]
    for name in ("from", "to", "call-id", "cseq"):
        lines.append(f"{name}: {request.get_header(name)}")
    peer.send(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode(), addr)
    return request, addr


def test_the_branch_names_the_process_that_sent_the_request() -> None:
    tag = process_tag(WORKER, 7)
    assert tag == "w007" and process_tag(LEADER, 0x201) == "l201"
    branch = branch_with_tag(new_branch(), tag)
    assert branch.startswith("z9hG4bKw007.")  # RFC 3261 §8.1.1.7: still the magic cookie
    assert branch_tag(branch) == "w007"
    # Branches nobody here made name no process.
    for foreign in (new_branch(), "z9hG4bKw007x12345", "z9hG4bKwxyz.123", "z9hG4bKq007.12", None):
        assert branch_tag(foreign) is None, foreign
    for role, slot in (("x", 1), (WORKER, -1), (WORKER, 0x1000)):
        with pytest.raises(ValueError):
            process_tag(role, slot)


async def test_a_response_reaching_another_worker_is_handed_to_the_sender(
    deployment: Deployment,
) -> None:
    first = await deployment.start(WORKER, 0)
    second = await deployment.start(WORKER, 1)
    deployment.steer_to(first, 1)  # every datagram reaches `second`
    peer = await udp_peer()
    try:
        txn = first.message(peer)
        request, addr = await answer(peer)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        peer.close()
    # The request left from the shared listening port, and Via names it.
    assert addr == ("127.0.0.1", deployment.port)
    assert request.via is not None and request.via.port == deployment.port
    assert branch_tag(request.via.branch) == "w000"
    assert result.status == 200
    assert second.layer.stats.responses_forwarded == 1
    assert first.handoff.stats.received == 1
    assert first.layer.stats.stray_responses == second.layer.stats.stray_responses == 0


async def test_a_response_reaching_its_sender_is_not_handed_off(deployment: Deployment) -> None:
    first = await deployment.start(WORKER, 0)
    second = await deployment.start(WORKER, 1)
    deployment.steer_to(first, 1)
    peer = await udp_peer()
    try:
        txn = second.message(peer)
        await answer(peer)
        assert (await asyncio.wait_for(txn.wait(), 3)).status == 200
    finally:
        peer.close()
    assert second.layer.stats.responses_forwarded == 0
    assert first.handoff.stats.received == second.handoff.stats.received == 0


async def test_the_leader_sends_through_a_worker_and_gets_the_response(
    deployment: Deployment,
) -> None:
    first = await deployment.start(WORKER, 0)
    second = await deployment.start(WORKER, 1)
    leader = await deployment.start(LEADER, 2)
    deployment.steer_to(first, 1)
    peer = await udp_peer()
    try:
        txn = leader.message(peer)
        request, addr = await answer(peer)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        peer.close()
    assert addr == ("127.0.0.1", deployment.port)  # not the leader's own client port
    assert request.via is not None and request.via.port == deployment.port
    assert result.status == 200
    assert leader.handoff.stats.relayed == 1
    assert first.handoff.stats.sent_for_leader + second.handoff.stats.sent_for_leader == 1
    assert second.layer.stats.responses_forwarded == 1


async def test_a_leader_with_no_worker_sends_from_its_client_socket(
    deployment: Deployment,
) -> None:
    leader = await deployment.start(LEADER, 2)
    peer = await udp_peer()
    try:
        txn = leader.message(peer)
        _, addr = await answer(peer)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        peer.close()
    assert addr[1] != deployment.port  # nobody listens there: the client socket it is
    assert result.status == 200 and leader.handoff.stats.relayed == 0


async def test_a_draining_worker_sends_through_another_one(deployment: Deployment) -> None:
    first = await deployment.start(WORKER, 0)
    second = await deployment.start(WORKER, 1)
    first.transports.stop_listening()  # left the group: everything reaches `second`
    peer = await udp_peer()
    try:
        txn = first.message(peer)
        _, addr = await answer(peer)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        peer.close()
    assert addr == ("127.0.0.1", deployment.port)
    assert result.status == 200
    assert first.handoff.stats.relayed == 1 and second.handoff.stats.sent_for_leader == 1
    assert second.layer.stats.responses_forwarded == 1


async def test_a_response_for_a_process_that_is_gone_is_stray(deployment: Deployment) -> None:
    worker = await deployment.start(WORKER, 0)
    peer = await udp_peer()
    try:
        branch = branch_with_tag(new_branch(), "w0ff")
        peer.send(
            (
                f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{deployment.port}"
                f";branch={branch}\r\n"
                "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: gone\r\n"
                "CSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            ("127.0.0.1", deployment.port),
        )
        for _ in range(100):
            if worker.layer.stats.stray_responses:
                break
            await asyncio.sleep(0.01)
    finally:
        peer.close()
    assert worker.layer.stats.stray_responses == 1
    assert worker.layer.stats.responses_forwarded == 0
    assert worker.handoff.stats.undeliverable == 1


def _send_frame_as(uid: int | None, name: bytes, frame: bytes) -> None:
    """Send one frame from a forked child (as ``uid`` when given): a real other process."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if uid is not None:
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.connect(name)
                sock.send(frame)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_frames_from_another_user_or_malformed_are_refused(deployment: Deployment) -> None:
    worker = await deployment.start(WORKER, 0)
    response = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    request = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    name = socket_name(deployment.name, "w000")
    assert os.getuid() == 0, "this test runs as root (CI does) to send as another user"
    _send_frame_as(65534, name, b"R127.0.0.1 5060\n" + response)  # nobody
    _send_frame_as(65534, socket_name(deployment.name, "s000"), b"CTCP 127.0.0.1 5 1\n" + request)
    for frame in (
        b"R127.0.0.1 5060" + response,  # no header line
        b"R127.0.0.1 http\n" + response,  # bad port
        b"R127.0.0.1 5060\nOPTIONS sip:x SIP/2.0\r\n\r\n",  # not a response
        b"S127.0.0.1 5 127.0.0.1 5060\n" + response,  # a send, on the response socket
        b"X127.0.0.1 5060\n" + response,  # unknown kind
        b"CTCP 127.0.0.1 5 1\nOPTIONS sip:x SIP/2.0\r\n\r\n",  # a connection ask, here
    ):
        _send_frame_as(None, name, frame)
    sender = socket_name(deployment.name, "s000")
    for frame in (
        b"S127.0.0.1 5 127.0.0.1\n" + response,  # a send without its local address
        b"R127.0.0.1 5060\n" + response,  # a response, on the sender socket
        b"CUDP 127.0.0.1 5 1\n" + request,  # not a connection transport
        b"CTCP 127.0.0.1 5 x1\n" + request,  # a bad id
        b"CTCP 127.0.0.1 5 " + b"1" * 21 + b"\n" + request,  # an id too long
        b"CTCP 127.0.0.1 port 1\n" + request,  # a bad port
        b"CTCP 127.0.0.1 5\n" + request,  # no id
        b"CTCP 127.0.0.1 5 1\n" + response,  # a response to write
        b"CTCP 127.0.0.1 5 1\n" + request + b"x" * MAX_FRAME,  # longer than a frame
    ):
        _send_frame_as(None, sender, frame)
    for _ in range(100):
        if worker.handoff.stats.refused == 17:
            break
        await asyncio.sleep(0.01)
    assert worker.handoff.stats.refused == 17
    assert worker.handoff.stats.sent_for_others == 0
    assert worker.handoff.stats.received == worker.handoff.stats.sent_for_leader == 0


async def test_live_workers_names_the_bound_workers_only(deployment: Deployment) -> None:
    await deployment.start(WORKER, 0)
    await deployment.start(WORKER, 0x1A)
    await deployment.start(LEADER, 3)
    assert live_workers(deployment.name) == [
        socket_name(deployment.name, "s000"),
        socket_name(deployment.name, "s01a"),
    ]
    assert live_workers("another-deployment") == []
    # A worker that stopped listening sends for nobody: the others no longer find it.
    deployment.procs[0].transports.stop_listening()
    assert live_workers(deployment.name) == [socket_name(deployment.name, "s01a")]


async def test_a_response_spelling_branch_otherwise_is_handed_over_once_parsed(
    deployment: Deployment,
) -> None:
    first = await deployment.start(WORKER, 0)
    second = await deployment.start(WORKER, 1)
    deployment.steer_to(first, 1)
    peer = await udp_peer()
    try:
        txn = first.message(peer)
        data, addr = await peer.receive()
        request = parse_request(data)
        assert request.via is not None
        # Parameter names are case-insensitive (RFC 3261 §7.3.1): the byte search misses
        # this one, the parsed Via does not.
        via = request.via.raw.replace("branch=", "BRANCH=")
        lines = ["SIP/2.0 200 OK", f"Via: {via}"]
        lines += [
            f"{name}: {request.get_header(name)}" for name in ("from", "to", "call-id", "cseq")
        ]
        peer.send(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode(), addr)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        peer.close()
    assert result.status == 200
    assert second.layer.stats.responses_forwarded == 1


async def test_a_handed_response_is_never_handed_on(deployment: Deployment) -> None:
    worker = await deployment.start(WORKER, 0)
    other = await deployment.start(WORKER, 1)
    branch = branch_with_tag(new_branch(), "w001")  # names `other`, reached `worker` by hand
    response = (
        f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{deployment.port};branch={branch}\r\n"
        "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: loop\r\n"
        "CSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    worker.layer.receive(response, Source(UDP, ("127.0.0.1", 5), worker.handoff), handed=True)
    await asyncio.sleep(0.05)
    assert worker.layer.stats.responses_forwarded == 0
    assert worker.layer.stats.stray_responses == 1
    assert other.handoff.stats.received == 0


async def test_a_worker_that_stops_listening_is_no_longer_asked_to_send(
    deployment: Deployment,
) -> None:
    first = await deployment.start(WORKER, 0)
    second = await deployment.start(WORKER, 1)
    leader = await deployment.start(LEADER, 2)
    peer = await udp_peer()
    try:
        txn = leader.message(peer)
        await answer(peer)
        assert (await asyncio.wait_for(txn.wait(), 3)).status == 200
        [used] = [w for w in (first, second) if w.handoff.stats.sent_for_leader == 1]
        spare = second if used is first else first
        used.transports.stop_listening()  # draining: it closes its sender connections
        await asyncio.sleep(0.05)
        txn = leader.message(peer)
        _, addr = await answer(peer)
        assert (await asyncio.wait_for(txn.wait(), 3)).status == 200
    finally:
        peer.close()
    assert addr == ("127.0.0.1", deployment.port)
    assert spare.handoff.stats.sent_for_leader == 1
    assert used.handoff.stats.sent_for_leader == 1 and used.handoff.stats.refused == 0


async def test_a_process_restarted_under_the_same_tag_is_reached_again(
    deployment: Deployment,
) -> None:
    sender = await deployment.start(WORKER, 0)
    owner = await deployment.start(WORKER, 1)
    response = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert sender.handoff.forward("w001", response, ("127.0.0.1", 5))
    await owner.close()
    deployment.procs.remove(owner)
    await asyncio.sleep(0.05)
    assert not sender.handoff.forward("w001", response, ("127.0.0.1", 5))  # gone
    again = await deployment.start(WORKER, 1)
    assert sender.handoff.forward("w001", response, ("127.0.0.1", 5))
    for _ in range(100):
        if again.handoff.stats.received:
            break
        await asyncio.sleep(0.01)
    assert again.handoff.stats.received == 1
    assert sender.handoff.stats.undeliverable == 1


async def test_a_peer_that_does_not_read_makes_frames_undeliverable_not_errors(
    deployment: Deployment,
) -> None:
    sender = await deployment.start(WORKER, 0)
    # Something holding w001's name that accepts nothing and reads nothing.
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck.bind(socket_name(deployment.name, "w001"))
    stuck.listen(1)
    response = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n" + b"x" * 60000
    try:
        for _ in range(10_000):
            if not sender.handoff.forward("w001", response, ("127.0.0.1", 5)):
                break
        else:
            raise AssertionError("the connection's buffer never filled")
    finally:
        stuck.close()
    assert sender.handoff.stats.undeliverable == 1
    assert sender.handoff.stats.forwarded > 0


# -- a request for a connection another worker holds --------------------------------------


async def _answer_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SipRequest:
    """Read one request on a TCP connection and answer it 200 on the same connection."""
    request = parse_request(await read_message(reader))
    writer.write(_ok(request))
    return request


def _ok(request: SipRequest) -> bytes:
    assert request.via is not None
    lines = ["SIP/2.0 200 OK", f"Via: {request.via.raw}"]
    lines += [f"{name}: {request.get_header(name)}" for name in ("from", "to", "call-id", "cseq")]
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


async def _wait(check: Any, what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


@pytest.mark.parametrize("role", [WORKER, LEADER])
async def test_a_request_for_another_workers_tcp_connection_is_written_there(
    deployment: Deployment, role: str
) -> None:
    holder = await deployment.start(WORKER, 0)
    sender = await deployment.start(role, 1)
    server = await holder.transports.listen_tcp("127.0.0.1", 0, reuse_port=False)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    try:
        writer.write(b"\r\n\r\n")  # a keep-alive ping: the connection is registered
        assert await asyncio.wait_for(reader.readexactly(2), 3) == b"\r\n"
        bob = writer.get_extra_info("sockname")
        txn = sender.request(Target("127.0.0.1", bob[1], "TCP", True))
        request = await _answer_stream(reader, writer)
        result = await asyncio.wait_for(txn.wait(), 3)
    finally:
        writer.close()
    # The sender built it (its branch tag): the response, on the holder's connection, was
    # handed back by that tag (TransactionLayer.receive's forward path, over TCP).
    assert request.via is not None and branch_tag(request.via.branch) == sender.handoff.tag
    assert result.status == 200 and not result.local
    assert len(sender.transports.pool) == 0  # no connection of its own was opened
    assert sender.handoff.stats.asked == sender.handoff.stats.handed_off == 1
    assert sender.handed_off == 1 and sender.handoff.stats.received == 1
    assert holder.handoff.stats.sent_for_others == 1
    assert holder.layer.stats.responses_forwarded == 1


async def test_a_request_for_another_workers_ws_connection_is_written_there(
    deployment: Deployment,
) -> None:
    holder = await deployment.start(WORKER, 0)
    other = await deployment.start(WORKER, 1)  # holds nothing: answers N
    sender = await deployment.start(WORKER, 2)
    server = await holder.transports.listen_ws("127.0.0.1", 0, reuse_port=False)
    for proc in (other, sender):  # every worker listens on ws: (nobody else connects)
        await proc.transports.listen_ws("127.0.0.1", 0, reuse_port=False)
    port = server.sockets[0].getsockname()[1]
    async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"]) as ws:  # type: ignore[list-item]
        await _wait(lambda: len(holder.transports.ws_pools["WS"]) == 1, "registered")
        bob = ws.local_address
        txn = sender.request(Target("127.0.0.1", bob[1], "WS", True))
        frame = await asyncio.wait_for(ws.recv(), 3)
        request = parse_request(frame.encode() if isinstance(frame, str) else frame)
        assert request.via is not None and request.via.transport == "WS"
        await ws.send(_ok(request).decode())
        result = await asyncio.wait_for(txn.wait(), 3)
    assert result.status == 200
    assert sender.handoff.stats.handed_off == 1 and sender.handed_off == 1
    assert other.handoff.stats.sent_for_others == 0
    assert holder.layer.stats.responses_forwarded == 1
    # The N came before or after the A: either way the ask was settled once, by the A.
    await _wait(lambda: other.handoff.stats.not_here == 1, "the other worker's N")
    assert sender.handoff.stats.late_answers <= 1
    assert sender.handoff.stats.not_held == sender.handoff.stats.ask_timeouts == 0


async def test_a_ws_connection_nobody_holds_fails_the_request_at_once(
    deployment: Deployment,
) -> None:
    await deployment.start(WORKER, 0)
    sender = await deployment.start(WORKER, 1)
    txn = sender.request(Target("127.0.0.1", 9, "WS", True))
    result = await asyncio.wait_for(txn.wait(), 3)
    assert result.status == 503 and result.local
    # Every worker asked answered N: settled by the answers, not by ASK_TIMEOUT.
    assert sender.handoff.stats.not_held == 1 and sender.handoff.stats.ask_timeouts == 0
    assert sender.handed_off == 0


async def test_a_tcp_connection_nobody_holds_is_opened_as_without_the_handoff(
    deployment: Deployment,
) -> None:
    await deployment.start(WORKER, 0)
    sender = await deployment.start(WORKER, 1)
    target_server = await start_server()  # a TCP peer that listens: dialled
    with socket.socket() as probe:  # a closed connection's port: refused
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    try:
        ok = sender.request(Target("127.0.0.1", target_server.port, "TCP", True))
        assert (await asyncio.wait_for(ok.wait(), 3)).status == 200
        assert len(sender.transports.pool) == 1  # its own connection, dialled
        refused = sender.request(Target("127.0.0.1", dead, "TCP", True))
        result = await asyncio.wait_for(refused.wait(), 3)
        # A connection we dialled is never written on for another worker: it can dial too.
        assert not sender.transports.write_held("TCP", ("127.0.0.1", target_server.port), b"x")
    finally:
        target_server.layer.close()
        await target_server.transports.close()
    assert result.status == 503 and result.local
    assert sender.handoff.stats.asked == 2 and sender.handoff.stats.not_held == 2


async def test_a_worker_that_does_not_answer_fails_the_ask_after_the_timeout(
    deployment: Deployment,
) -> None:
    sender = await deployment.start(WORKER, 0)
    # Something holding worker 1's sender name that accepts nothing and answers nothing.
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck.bind(socket_name(deployment.name, "s001"))
    stuck.listen(1)
    try:
        txn = sender.request(Target("127.0.0.1", 9, "WSS", True))
        result = await asyncio.wait_for(txn.wait(), 3)  # ASK_TIMEOUT, not Timer F
    finally:
        stuck.close()
    assert result.status == 503 and result.local
    assert sender.handoff.stats.ask_timeouts == 1 and sender.handoff.stats.handed_off == 0


async def test_answers_that_make_no_sense_are_refused_not_errors(deployment: Deployment) -> None:
    sender = await deployment.start(WORKER, 0)
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fake.bind(socket_name(deployment.name, "s001"))
    fake.listen(1)
    fake.setblocking(False)
    loop = asyncio.get_running_loop()
    answered: list[bool] = []
    try:
        assert sender.handoff.ask(
            "WS", ("127.0.0.1", 9), b"OPTIONS x SIP/2.0\r\n\r\n", answered.append
        )
        conn, _ = await loop.sock_accept(fake)
        with conn:
            frame = await loop.sock_recv(conn, MAX_FRAME)
            assert frame.startswith(b"CWS 127.0.0.1 9 ")
            ident = frame.partition(b"\n")[0].rpartition(b" ")[2]
            for garbage in (b"Axyz", b"Z" + ident, b"A", b"A" + b"1" * 21, b"A" + ident + b"0"):
                await loop.sock_sendall(conn, garbage)
            await loop.sock_sendall(conn, b"N" + ident)  # the real answer: not here
            await _wait(lambda: answered == [False], "the N")
            await loop.sock_sendall(conn, b"A" + ident)  # settled already
            await _wait(lambda: sender.handoff.stats.late_answers == 2, "the late answers")
    finally:
        fake.close()
    assert sender.handoff.stats.refused == 4  # the unknown id ...0 counts as late
    assert sender.handoff.stats.not_held == 1 and answered == [False]


async def test_what_cannot_be_asked_is_sent_as_without_the_handoff(deployment: Deployment) -> None:
    sender = await deployment.start(WORKER, 0)
    called: list[bool] = []
    errors: list[BaseException] = []
    request = b"OPTIONS x SIP/2.0\r\n\r\n"
    assert not sender.handoff.ask("WS", ("127.0.0.1", 9), request, called.append)  # nobody
    other = await deployment.start(WORKER, 1)
    # The list of workers is looked at again at most once a second (by time.monotonic;
    # the loop's clock may wake us a millisecond early).
    await asyncio.sleep(1.2)
    assert not sender.handoff.ask("UDP", ("127.0.0.1", 9), request, called.append)
    big = request + b"x" * MAX_FRAME
    assert not sender.handoff.ask("WS", ("127.0.0.1", 9), big, called.append)
    with pytest.raises(TransportError):  # a WS send with nobody to ask fails at once, as before
        sender.transports.send(big, Target("127.0.0.1", 9, "WS", True), errors.append)
    assert sender.handoff.ask("WS", ("127.0.0.1", 9), request, called.append)
    await _wait(lambda: called == [False], "the answer")
    assert other.handoff.stats.not_here == 1 and errors == []
    sender.handoff.close()  # asks waiting when it closes are dropped, not answered
    assert not sender.handoff.ask("WS", ("127.0.0.1", 9), request, called.append)


async def test_a_name_another_user_listens_on_is_never_sent_to(deployment: Deployment) -> None:
    sender = await deployment.start(WORKER, 0)
    assert os.getuid() == 0, "this test runs as root (CI does) to listen as another user"
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: worker 1's sender name, as nobody
        code = 1
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.bind(socket_name(deployment.name, "s001"))
                sock.listen(8)
                os.write(ready_w, b"x")
                os.read(stop_r, 1)  # until the test is done
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == b"x"
        called: list[bool] = []
        request = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n"
        assert not sender.handoff.ask("WS", ("127.0.0.1", 9), request, called.append)
        assert sender.handoff.stats.refused == 1 and sender.handoff.stats.asked == 0
        assert not sender.handoff.relay(request, ("127.0.0.1", 9), ("127.0.0.1", 5060))
    finally:
        os.write(stop_w, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, stop_r, stop_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0 and called == []
