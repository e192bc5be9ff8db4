"""Path (RFC 3327): a device registered through an edge proxy is reached through it.

The edge proxy is a real UDP UA on 127.0.0.1; the device's contact points at a port where
nobody listens, so a delivery that ignored the Path would time out instead of arriving.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from msilo.routing.delivery import Hop, binding_hop
from msilo.storage.location import Binding
from msilo.transport.base import Target
from tests.service.conftest import ServerFactory
from tests.service.sipua import UserAgent, free_port


async def _count_is(srv: object, user: str, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await srv.store.count(user, "127.0.0.1") != n:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} does not have {n} messages")
        await asyncio.sleep(0.05)


def _edge_path(edge: UserAgent) -> str:
    return f"<sip:edge@127.0.0.1:{edge.port};lr>"


async def test_dump_goes_to_the_edge_proxy_with_the_path_as_route(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=0")
    alice = await srv.agent("alice")
    for text in ("one", "two"):
        assert (await alice.message("sip:bob@127.0.0.1", text)).status == 202
    edge = await srv.agent("edge")
    bob = await srv.agent("bob")
    device = f"sip:bob@127.0.0.1:{free_port()}"  # behind the edge: not reachable directly
    outer = "<sip:outer.example.com;lr>"
    reply = await bob.register(
        600, contact=f"<{device}>", headers=[f"Path: {_edge_path(edge)}, {outer}"]
    )
    assert reply.status == 200
    received = await edge.wait_requests(2)
    first = received[0].request
    assert first.method == "MESSAGE"
    assert first.uri == device  # the Request-URI is still the registered contact
    assert first.get_headers("route") == [_edge_path(edge), outer]  # the whole path, in order
    assert [r.request.body for r in received] == [b"one", b"two"]
    assert bob.received == []
    await _count_is(srv, "bob", 0)


async def test_relay_to_a_device_registered_through_an_edge_proxy(server: ServerFactory) -> None:
    srv = await server()
    edge = await srv.agent("edge")
    bob = await srv.agent("bob")
    device = f"sip:bob@127.0.0.1:{free_port()}"
    path = f"Path: {_edge_path(edge)}"
    assert (await bob.register(600, contact=f"<{device}>", headers=[path])).status == 200
    alice = await srv.agent("alice")
    reply = await alice.message("sip:bob@127.0.0.1", "live")
    assert reply.status == 200  # the edge proxy answered for the device
    [got] = edge.received
    assert got.request.uri == device
    assert got.request.get_headers("route") == [_edge_path(edge)]
    assert got.request.body == b"live"
    assert bob.received == []
    assert await srv.store.count("bob", "127.0.0.1") == 0


async def test_relay_goes_through_the_outbound_proxy_with_the_path(
    server: ServerFactory,
) -> None:
    proxy = await UserAgent(("127.0.0.1", 9), user="proxy").start()
    try:
        srv = await server(f'msilo.outbound_proxy="sip:127.0.0.1:{proxy.port}"')
        edge = await srv.agent("edge")
        bob = await srv.agent("bob")
        await bob.register(600, headers=[f"Path: {_edge_path(edge)}"])
        alice = await srv.agent("alice")
        assert (await alice.message("sip:bob@127.0.0.1", "live")).status == 200
        [got] = proxy.received  # "next hop for every request msilo sends"
        assert got.request.uri == bob.contact
        assert got.request.get_headers("route") == [_edge_path(edge)]
        assert edge.received == [] and bob.received == []
    finally:
        proxy.close()


async def test_path_is_returned_only_to_a_ua_that_supports_it(server: ServerFactory) -> None:
    srv = await server()
    edge = await srv.agent("edge")
    bob = await srv.agent("bob")
    path = f"Path: {_edge_path(edge)}"
    plain = await bob.register(600, headers=[path])
    assert plain.status == 200 and plain.get_headers("path") == []
    aware = await bob.register(600, headers=[path, "Supported: timer, path"])
    assert aware.status == 200
    assert aware.get_headers("path") == [_edge_path(edge)]


async def test_a_register_with_a_malformed_path_is_refused(server: ServerFactory) -> None:
    srv = await server()
    bob = await srv.agent("bob")
    for bad in ("sip:edge@127.0.0.1;lr", "<tel:+123>", '<sip:edge@127.0.0.1;lr>, "unterminated'):
        reply = await bob.register(600, headers=[f"Path: {bad}"])
        assert reply.status == 400, bad
    assert await srv.store.lookup_bindings("bob", "127.0.0.1", now=int(time.time())) == []


def _binding(**kwargs: object) -> Binding:
    fields: dict[str, object] = {
        "username": "bob",
        "domain": "example.com",
        "contact": "sip:bob@192.0.2.7:5070",
        "expires": 0,
    }
    fields.update(kwargs)
    return Binding(**fields)  # type: ignore[arg-type]


def test_next_hop_of_a_binding() -> None:
    # No Path over UDP: the contact itself.
    assert binding_hop(_binding()) == Hop(Target("192.0.2.7", 5070, "UDP", False))
    # Registered over TCP: back over that connection (NAT).
    tcp = _binding(transport="tcp", received="tcp:198.51.100.1:40000")
    assert binding_hop(tcp) == Hop(Target("198.51.100.1", 40000, "TCP", True))
    # With a Path the first hop is its topmost URI, whatever the transport, and the
    # whole path travels as the Route set.
    path = "<sip:edge.example.com:5062;transport=tcp;lr>, <sip:core.example.com;lr>"
    hop = binding_hop(_binding(transport="tcp", received="tcp:198.51.100.1:40000", path=path))
    assert hop.target == Target("edge.example.com", 5062, "TCP", True)
    assert hop.route == ("sip:edge.example.com:5062;transport=tcp;lr", "sip:core.example.com;lr")


def test_a_stored_path_that_does_not_parse_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A row written by another registrar (an upgraded OpenSIPS table) may hold anything.
    with caplog.at_level(logging.WARNING, logger="msilo.dump"):
        hop = binding_hop(_binding(path="edge.example.com;lr"))
    assert hop == Hop(Target("192.0.2.7", 5070, "UDP", False))
    assert "event=bad_path" in caplog.text
