"""A UDP device behind NAT is reached at the address its REGISTER came from (Part A Q4).

The test UA registers a private Contact (10.1.2.3, which nothing on this host answers)
from its real socket on 127.0.0.1: deliveries must come back to that socket.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from msilo.routing.delivery import direct_target
from msilo.sip.parser import parse_uri
from msilo.transport.base import Target
from tests.service.conftest import ServerFactory

NATED_CONTACT = "sip:bob@10.1.2.3:5062"


async def test_dump_to_a_contact_behind_nat(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=0")
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "behind nat")).status == 202
    bob = await srv.agent("bob")
    assert (await bob.register(600, contact=f"<{NATED_CONTACT}>")).status == 200
    [got] = await bob.wait_requests(1)
    assert got.request.uri == NATED_CONTACT  # the Request-URI is still the contact
    assert got.request.body == b"behind nat"
    deadline = time.monotonic() + 5
    while await srv.store.count("bob", "127.0.0.1"):
        assert time.monotonic() < deadline, "the delivered row was not deleted"
        await asyncio.sleep(0.05)


async def test_relay_to_a_contact_behind_nat(server: ServerFactory) -> None:
    srv = await server()
    bob = await srv.agent("bob")
    assert (await bob.register(600, contact=f"<{NATED_CONTACT}>")).status == 200
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "live")).status == 200
    [got] = bob.received
    assert got.request.uri == NATED_CONTACT
    assert await srv.store.count("bob", "127.0.0.1") == 0


SOURCE = Target("203.0.113.9", 40123, "UDP", True)


@pytest.mark.parametrize(
    ("contact", "source", "expected"),
    [
        # Private addresses that are not the source: behind NAT.
        ("sip:bob@192.168.1.20:5060", SOURCE, SOURCE),
        ("sip:bob@10.0.0.7", SOURCE, SOURCE),
        ("sip:bob@172.20.1.1:5070", SOURCE, SOURCE),
        ("sip:bob@100.64.3.4", SOURCE, SOURCE),  # carrier-grade NAT
        ("sip:bob@[fd00::5]:5060", SOURCE, SOURCE),
        # The device registered from its own private address (same network, no NAT).
        (
            "sip:bob@10.0.0.7:5060",
            Target("10.0.0.7", 5060, "UDP", True),
            Target("10.0.0.7", 5060, "UDP", False),
        ),
        # Public address, host name, loopback, TCP contact: the contact itself.
        ("sip:bob@198.51.100.4:5080", SOURCE, Target("198.51.100.4", 5080, "UDP", False)),
        (
            "sip:bob@phone.example.com",
            SOURCE,
            Target("phone.example.com", 5060, "UDP", False, srv=True),
        ),
        ("sip:bob@127.0.0.1:5099", SOURCE, Target("127.0.0.1", 5099, "UDP", False)),
        (
            "sip:bob@192.168.1.20;transport=tcp",
            SOURCE,
            Target("192.168.1.20", 5060, "TCP", True),
        ),
        # No source known (a binding written by another registrar): the contact.
        ("sip:bob@192.168.1.20", None, Target("192.168.1.20", 5060, "UDP", False)),
    ],
)
def test_direct_target(contact: str, source: Target | None, expected: Target) -> None:
    assert direct_target(parse_uri(contact), source) == expected
