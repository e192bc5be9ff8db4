"""An outbound proxy named by host name is found with SRV records (RFC 3263), end to end."""

from __future__ import annotations

import asyncio
import time

from tests.dnsserver import dns_server, needs_dnsmasq
from tests.service.conftest import ServerFactory
from tests.service.sipua import UserAgent


@needs_dnsmasq
async def test_dump_through_an_outbound_proxy_found_by_srv(server: ServerFactory) -> None:
    proxy = await UserAgent(("127.0.0.1", 9), user="proxy").start()
    srv = [("_sip._udp.proxy.test", "edge1.proxy.test", proxy.port, 10, 0)]
    try:
        with dns_server(srv=srv, hosts=[("edge1.proxy.test", "127.0.0.1")]) as dns:
            running = await server(
                "server.mode=silo",
                'msilo.outbound_proxy="sip:proxy.test"',
                f'server.dns=["{dns}"]',
            )
            alice = await running.agent("alice")
            assert (await alice.message("sip:bob@127.0.0.1", "via srv")).status == 202
            bob = await running.agent("bob")
            await bob.register(600)
            [got] = await proxy.wait_requests(1)
            assert got.request.uri == bob.contact
            assert bob.received == []
            deadline = time.monotonic() + 5
            while await running.store.count("bob", "127.0.0.1"):
                assert time.monotonic() < deadline, "the delivered row was not deleted"
                await asyncio.sleep(0.05)
    finally:
        proxy.close()
