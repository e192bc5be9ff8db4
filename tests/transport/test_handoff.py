"""Requests leave from the shared UDP port; responses reach their sender through the hand-off.

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

from msilo.sip.build import new_branch
from msilo.sip.message import SipRequest
from msilo.transaction import ServerTransaction, TransactionLayer
from msilo.transaction.client import ClientTransaction
from msilo.transport import Target, Transports
from msilo.transport.base import UDP, Source
from msilo.transport.handoff import (
    LEADER,
    WORKER,
    Handoff,
    branch_tag,
    branch_with_tag,
    live_workers,
    process_tag,
    socket_name,
)
from msilo.transport.spread import always, attach

from .conftest import PARSE, UdpPeer, free_port_pair, parse_request, udp_peer


@dataclass
class Proc:
    """One process of a deployment: its transports, transaction layer and hand-off."""

    transports: Transports
    layer: TransactionLayer
    handoff: Handoff
    seen: list[SipRequest] = field(default_factory=list)

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
    transports.use_handoff(handoff, [("127.0.0.1", port)])
    return Proc(transports, layer, handoff, seen)


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
    name = socket_name(deployment.name, "w000")
    assert os.getuid() == 0, "this test runs as root (CI does) to send as another user"
    _send_frame_as(65534, name, b"R127.0.0.1 5060\n" + response)  # nobody
    for frame in (
        b"R127.0.0.1 5060" + response,  # no header line
        b"R127.0.0.1 http\n" + response,  # bad port
        b"R127.0.0.1 5060\nOPTIONS sip:x SIP/2.0\r\n\r\n",  # not a response
        b"S127.0.0.1 5 127.0.0.1 5060\n" + response,  # a send, on the response socket
        b"X127.0.0.1 5060\n" + response,  # unknown kind
    ):
        _send_frame_as(None, name, frame)
    sender = socket_name(deployment.name, "s000")
    for frame in (
        b"S127.0.0.1 5 127.0.0.1\n" + response,  # a send without its local address
        b"R127.0.0.1 5060\n" + response,  # a response, on the sender socket
    ):
        _send_frame_as(None, sender, frame)
    for _ in range(100):
        if worker.handoff.stats.refused == 8:
            break
        await asyncio.sleep(0.01)
    assert worker.handoff.stats.refused == 8
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
