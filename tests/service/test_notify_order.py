"""The offline notification reaches the sender after the 202 of the message it is about,
with the default route and with a custom route that does more work before replying."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from msilo.routing.service import RouteContext
from msilo.sip.message import SipRequest
from tests.service.conftest import ServerFactory
from tests.service.sipua import UserAgent
from tests.service.test_notify_and_cycles import NOTIFY


@dataclass
class OrderedAgent(UserAgent):
    """A UA that remembers in which order datagrams arrived."""

    arrivals: list[str] = field(default_factory=list)

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        first = data.split(b"\r\n", 1)[0].decode()
        self.arrivals.append(first)
        super()._datagram(data, addr)


async def route_slow_reply(request: SipRequest, ctx: RouteContext) -> None:
    """Stores, then takes its time before answering (a route that logs, looks things up...)."""
    await ctx.m_store()
    await asyncio.sleep(0.2)
    ctx.reply(202, "Accepted")


@pytest.mark.parametrize("route", ["", "tests.service.test_notify_order:route_slow_reply"])
async def test_the_202_reaches_the_sender_before_the_notification(
    server: ServerFactory, route: str
) -> None:
    srv = await server("server.mode=silo", f'server.route="{route}"', *NOTIFY)
    alice = await OrderedAgent(srv.address, user="alice", domain="127.0.0.1").start()
    srv.agents.append(alice)
    reply = await alice.message(
        "sip:bob@127.0.0.1", "hi", call_id="order@x", headers=[f"Contact: <{alice.contact}>"]
    )
    assert reply.status == 202
    [note] = await alice.wait_requests(1)
    assert note.request.body.endswith(b"your message order@x is kept")
    assert alice.arrivals == [
        "SIP/2.0 202 Accepted",
        f"MESSAGE {alice.contact} SIP/2.0",
    ]
    assert srv.stats()["notifications_sent"] == 1
