"""What the real clients do that per-device delivery relies on (issue 13), checked against
msilo's own test UA standing in for the server: how each names itself as a device
(``+sip.instance``, RFC 5626 §4.1) and what each does with a MESSAGE that arrives again
with the same Call-ID (a delivery repeated after a lost 200).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.clients.baresip import Baresip
from tests.clients.linphone import Linphonec
from tests.service.sipua import UserAgent

Client = Baresip | Linphonec
Start = Callable[[type[Baresip] | type[Linphonec]], Awaitable[tuple[Client, UserAgent]]]


@pytest.fixture
async def registered(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a client for bob that registers with a test UA (which answers 200 to all)."""
    started: list[tuple[Client, UserAgent]] = []

    async def start(kind: type[Baresip] | type[Linphonec]) -> tuple[Client, UserAgent]:
        ua = await UserAgent(("127.0.0.1", 9), user="alice", domain="127.0.0.1").start()
        client = kind(tmp_path / kind.__name__, "bob", ("127.0.0.1", ua.port))
        started.append((client, ua))
        await client.start()
        await client.wait_registered()
        ua.server = ("127.0.0.1", client.sip_port)  # from now on the UA talks to the client
        return client, ua

    yield start
    for client, ua in started:
        await client.close()
        ua.close()


@pytest.mark.parametrize("kind", [Baresip, Linphonec])
async def test_each_client_names_its_device_with_the_configured_sip_instance(
    registered: Start, kind: type[Baresip] | type[Linphonec]
) -> None:
    client, _ = await registered(kind)
    assert f'+sip.instance="<urn:uuid:{client.instance}>"' in client.contact()


async def _send_twice_with_one_call_id(client: Client, ua: UserAgent) -> list[int]:
    contact = client.contact().split(">", 1)[0].lstrip("<")
    statuses = []
    for cseq in (1, 2):  # two transactions (new branch, new CSeq), one Call-ID
        response = await ua.message(
            contact, "see you at 8", call_id="once@127.0.0.1", cseq=cseq, from_tag="a1"
        )
        statuses.append(response.status)
    return statuses


async def test_linphonec_shows_a_message_repeated_with_the_same_call_id_once(
    registered: Start,
) -> None:
    client, ua = await registered(Linphonec)
    assert await _send_twice_with_one_call_id(client, ua) == [200, 200]  # it answers both
    # a third, new message: linphonec handles MESSAGEs in order, so the repeat, had it
    # been shown, would come before this one
    contact = client.contact().split(">", 1)[0].lstrip("<")
    assert (await ua.message(contact, "ping", call_id="other@127.0.0.1")).status == 200
    shown = await client.wait_shown(2)
    assert [s.text for s in shown] == ["see you at 8", "ping"]
    assert len(client.incoming_messages()) == 3


async def test_baresip_shows_a_message_repeated_with_the_same_call_id_twice(
    registered: Start,
) -> None:
    client, ua = await registered(Baresip)
    assert await _send_twice_with_one_call_id(client, ua) == [200, 200]
    shown = await client.wait_shown(2)
    assert [s.text for s in shown] == ["see you at 8", "see you at 8"]
