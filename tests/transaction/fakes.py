"""A fake network and SIP peers for transaction tests: no sockets, no sleeping.

In the spirit of trio's ``FakeNet``: every datagram that crosses the fake
network goes through ``route_packet``, which a test replaces to drop,
duplicate, hold or reorder datagrams.  Time is a :class:`ManualClock`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from msilo.sip.build import OutgoingRequest, build_request, build_response
from msilo.sip.message import SipRequest, Via
from msilo.sip.parser import parse_message_py
from msilo.transaction import ManualClock, ServerTransaction, TransactionLayer
from msilo.transport.base import Address, ErrorCallback, Source, Target

PEER: Address = ("192.0.2.10", 5070)


@dataclass
class Packet:
    """One datagram on the fake network, in either direction."""

    data: bytes
    direction: str  # "in": to the layer; "out": sent by the layer
    target: Target | None = None
    addr: Address = PEER
    transport: str = "UDP"


@dataclass
class Reply:
    data: bytes
    addr: Address
    via: Via | None
    time: float


class FakeChannel:
    """The way back to a peer: records every response the layer sends."""

    def __init__(self, net: FakeNetwork) -> None:
        self.net = net

    def reply(self, data: bytes, addr: Address, via: Via | None) -> None:
        for packet in self.net.route_packet(Packet(data, "out", addr=addr)):
            self.net.replies.append(Reply(packet.data, addr, via, self.net.clock.time()))


@dataclass
class Sent:
    data: bytes
    target: Target
    time: float
    on_error: ErrorCallback


@dataclass
class FakeNetwork:
    """Connects a TransactionLayer to the test: requests in, responses and requests out."""

    clock: ManualClock = field(default_factory=ManualClock)
    sent: list[Sent] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    fail_send: BaseException | None = None
    route_packet: Callable[[Packet], list[Packet]] = lambda packet: [packet]
    layer: TransactionLayer | None = None

    def __post_init__(self) -> None:
        self.channel = FakeChannel(self)

    def make_layer(self, handler: Callable[..., object], **kwargs: object) -> TransactionLayer:
        self.layer = TransactionLayer(
            handler,  # type: ignore[arg-type]
            self.send,
            clock=self.clock,
            parse=parse_message_py,
            sent_by=lambda transport, host="": ("198.51.100.1", 40000),
            **kwargs,  # type: ignore[arg-type]
        )
        return self.layer

    # The layer's send function.
    def send(self, data: bytes, target: Target, on_error: ErrorCallback) -> None:
        if self.fail_send is not None:
            raise self.fail_send
        for packet in self.route_packet(Packet(data, "out", target=target)):
            self.sent.append(Sent(packet.data, target, self.clock.time(), on_error))

    def deliver(self, data: bytes, *, addr: Address = PEER, transport: str = "UDP") -> None:
        """A datagram from a peer reaches the layer (through ``route_packet``)."""
        assert self.layer is not None
        for packet in self.route_packet(Packet(data, "in", addr=addr, transport=transport)):
            self.layer.receive(packet.data, Source(packet.transport, packet.addr, self.channel))

    def answer(self, sent: Sent, status: int, reason: str, **kwargs: object) -> bytes:
        """Deliver a response to a request the layer sent; returns the response bytes."""
        request = parse_message_py(sent.data)
        assert isinstance(request, SipRequest)
        data = build_response(request, status, reason, **kwargs)  # type: ignore[arg-type]
        self.deliver(
            data, addr=(sent.target.host, sent.target.port), transport=sent.target.transport
        )
        return data


def dropping(count: int, direction: str = "in") -> Callable[[Packet], list[Packet]]:
    """Route hook: lose the first ``count`` packets going ``direction``."""
    state = {"left": count}

    def route(packet: Packet) -> list[Packet]:
        if packet.direction == direction and state["left"] > 0:
            state["left"] -= 1
            return []
        return [packet]

    return route


def duplicating(direction: str = "in") -> Callable[[Packet], list[Packet]]:
    """Route hook: every packet going ``direction`` arrives twice."""
    return lambda p: [p, p] if p.direction == direction else [p]


class Holding:
    """Route hook: hold packets going ``direction`` until :meth:`release` (reordering)."""

    def __init__(self, net: FakeNetwork, direction: str = "in") -> None:
        self.net = net
        self.direction = direction
        self.held: list[Packet] = []

    def __call__(self, packet: Packet) -> list[Packet]:
        if packet.direction == self.direction:
            self.held.append(packet)
            return []
        return [packet]

    def release(self, order: list[int]) -> None:
        """Deliver the held packets in ``order`` (indexes into what was held)."""
        packets = [self.held[i] for i in order]
        self.held = []
        self.net.route_packet = lambda packet: [packet]
        for packet in packets:
            self.net.deliver(packet.data, addr=packet.addr, transport=packet.transport)


def make_request(
    method: str = "MESSAGE",
    *,
    branch: str = "z9hG4bK-c1",
    cseq: int = 1,
    call_id: str = "txn-1@example.com",
    via_transport: str = "UDP",
    rport: bool = True,
    body: bytes = b"hi",
) -> bytes:
    """A request from the peer, as bytes."""
    out: OutgoingRequest = build_request(
        method,
        "sip:bob@example.com",
        from_="sip:alice@example.com",
        to="sip:bob@example.com",
        sent_by=PEER[:2],
        transport=via_transport,
        branch=branch,
        cseq=cseq,
        call_id=call_id,
        from_tag="a-1",
        body=body,
        content_type="text/plain" if body else None,
    )
    data = out.data
    if not rport:
        data = data.replace(b";rport", b"", 1)
    return data


class RecordingHandler:
    """A request handler that records calls and optionally answers at once."""

    def __init__(self, status: int | None = 202, reason: str = "Accepted") -> None:
        self.status = status
        self.reason = reason
        self.calls: list[tuple[SipRequest, ServerTransaction]] = []

    def __call__(self, request: SipRequest, txn: ServerTransaction) -> None:
        self.calls.append((request, txn))
        if self.status is not None:
            txn.respond(self.status, self.reason)
