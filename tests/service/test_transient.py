"""Typing indications (RFC 3994) and other transient MESSAGEs are relayed, never stored."""

from __future__ import annotations

import pytest

from msilo.config import load_config
from msilo.errors import ConfigError
from tests.service.conftest import ServerFactory

COMPOSING = "application/im-iscomposing+xml"
BODY = (
    b'<?xml version="1.0"?><isComposing xmlns="urn:ietf:params:xml:ns:im-iscomposing">'
    b"<state>active</state></isComposing>"
)


async def test_typing_indication_to_an_offline_user_is_not_stored(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    reply = await alice.request(
        "MESSAGE", "sip:bob@127.0.0.1", body=BODY, content_type=f"{COMPOSING};charset=utf-8"
    )
    assert reply.status == 480
    assert await srv.store.count("bob", "127.0.0.1") == 0
    assert srv.stats()["transient_not_stored"] == 1
    # An ordinary message right after is stored as always.
    assert (await alice.message("sip:bob@127.0.0.1", "hi")).status == 202
    assert await srv.store.count("bob", "127.0.0.1") == 1


async def test_typing_indication_to_an_online_user_is_relayed(server: ServerFactory) -> None:
    srv = await server()
    bob = await srv.agent("bob")
    await bob.register(600)
    alice = await srv.agent("alice")
    reply = await alice.request("MESSAGE", "sip:bob@127.0.0.1", body=BODY, content_type=COMPOSING)
    assert reply.status == 200
    [got] = bob.received
    assert got.request.body == BODY
    assert srv.stats()["relayed_messages"] == 1


async def test_a_device_that_refuses_it_is_answered_with_its_own_status(
    server: ServerFactory,
) -> None:
    srv = await server()
    bob = await srv.agent("bob", answer=lambda request: (415, "Unsupported Media Type"))
    await bob.register(600)
    alice = await srv.agent("alice")
    reply = await alice.request("MESSAGE", "sip:bob@127.0.0.1", body=BODY, content_type=COMPOSING)
    assert reply.status == 415
    assert await srv.store.count("bob", "127.0.0.1") == 0


async def test_silo_mode_and_an_empty_list(server: ServerFactory) -> None:
    silo = await server("server.mode=silo")
    alice = await silo.agent("alice")
    reply = await alice.request("MESSAGE", "sip:bob@127.0.0.1", body=BODY, content_type=COMPOSING)
    assert reply.status == 480  # behind a proxy: the proxy relays; we never store it
    everything = await server("msilo.transient_types=[]")
    carol = await everything.agent("carol")
    reply = await carol.request("MESSAGE", "sip:bob@127.0.0.1", body=BODY, content_type=COMPOSING)
    assert reply.status == 202  # the reference module's behaviour: store whatever comes
    assert await everything.store.count("bob", "127.0.0.1") == 1


def test_transient_types_must_be_media_types() -> None:
    with pytest.raises(ConfigError, match=r"msilo.transient_types: 'typing' is not a type/subtype"):
        load_config(overrides=['msilo.transient_types=["typing"]'])
    config = load_config(overrides=['msilo.transient_types=["Application/X-Typing"]'])
    assert config.msilo.transient_types == ("application/x-typing",)
