"""A custom route (``server.route``) replaces the default route and uses the script API."""

from __future__ import annotations

import datetime as dt

import pytest

from msilo.errors import ConfigError
from tests.service.conftest import ServerFactory
from tests.service.test_dump import _store


async def test_custom_route_stores_for_an_explicit_owner_with_an_avp_send_time(
    server: ServerFactory,
) -> None:
    srv = await server(
        'server.route="tests.service.routes:shared_inbox"',
        'msilo.snd_time_avp="$avp(snd_time)"', 'msilo.timezone="UTC"',
        'msilo.from_address="sip:registrar@127.0.0.1"', 'msilo.offline_message="offline"',
        'msilo.content_type_hdr="Content-Type: text/plain\\r\\n"',
    )  # fmt: skip
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "to the inbox")).status == 202
    later = await alice.message("sip:bob@127.0.0.1", "later", headers=["X-When: 20300101120000"])
    assert later.status == 202
    rows = await srv.store.list("inbox", "127.0.0.1")
    assert [r.body for r in rows] == [b"to the inbox", b"later"]
    assert rows[1].snd_time == int(dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC).timestamp())
    assert await srv.store.count("bob", "127.0.0.1") == 0
    assert srv.stats()["notifications_sent"] == 0  # m_store(notify=False) suppressed them
    inbox = await srv.agent("inbox")
    await inbox.register(600)
    [got] = await inbox.wait_requests(1)  # the scheduled one waits for its time
    assert got.request.body.endswith(b"to the inbox")


async def test_custom_route_relays_or_stores_and_limits_the_dump(server: ServerFactory) -> None:
    srv = await server('server.route="tests.service.routes:relay_or_store"')
    alice = await srv.agent("alice")
    await _store(alice, "sip:bob@127.0.0.1", "one", "two")
    bob = await srv.agent("bob")
    await bob.register(600)
    [got] = await bob.wait_requests(1)  # m_dump(max=1)
    assert got.request.body.endswith(b"one")
    assert (await alice.message("sip:bob@127.0.0.1", "live")).status == 200


async def test_a_route_that_never_replies_gets_500(server: ServerFactory) -> None:
    srv = await server('server.route="tests.service.routes:forgets_to_reply"')
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "x")).status == 500


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.service.nosuchmodule:route", "cannot import 'tests.service.nosuchmodule'"),
        ("tests.service.routes:missing", "is not an async function"),
        ("tests.service.routes:not_async", "is not an async function"),
    ],
)
async def test_a_bad_route_stops_start_up_with_a_clear_error(
    server: ServerFactory, spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        await server(f'server.route="{spec}"')
