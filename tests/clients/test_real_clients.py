"""msilo with real SIP clients nobody here wrote: baresip and linphonec (one device each).

Every test starts its own ``msilo serve`` (registrar mode, two workers) on SQLite and
on PostgreSQL, and its own clients on 127.0.0.1 (tests/clients/conftest.py).
"""

from __future__ import annotations

import pytest

from tests.clients.baresip import Baresip
from tests.clients.lab import Clients, stored_rows
from tests.clients.linphone import Linphonec
from tests.server.conftest import wait_for

BOB = "sip:bob@127.0.0.1"
ALICE = "sip:alice@127.0.0.1"


async def test_a_message_to_an_online_baresip_is_relayed_and_shown(clients: Clients) -> None:
    bob = await clients.baresip("bob")
    alice = await clients.linphonec("alice")

    sent = await alice.send_message(BOB, "lunch at noon?")

    # baresip answered the relayed MESSAGE; alice sees the 200 as "Delivered"
    assert (sent.status, sent.verdict) == (200, "Delivered")
    shown = await bob.wait_shown(1)
    assert shown[0].sender == ALICE
    assert shown[0].text == "lunch at noon?"  # relayed as it was: no offline-date prefix
    stats = clients.server.get("/stats")
    assert (stats["relayed_messages"], stats["stored_messages"]) == (1, 0)


async def test_a_message_for_offline_baresip_is_accepted_then_shown_once_when_it_registers(
    clients: Clients, db_url: str
) -> None:
    alice = await clients.linphonec("alice")

    sent = await alice.send_message(BOB, "call me when you land")

    # RFC 3428 §7: 202 Accepted; linphonec shows no difference from a 200
    assert (sent.status, sent.verdict) == (202, "Delivered")
    assert await stored_rows(db_url) == 1

    bob = await clients.baresip("bob")
    shown = await bob.wait_shown(1)
    assert shown[0].sender == ALICE
    assert shown[0].text.endswith("] call me when you land")
    assert shown[0].text.startswith("[Offline message - ")  # msilo.add_date
    await wait_for(
        lambda: clients.server.get("/stats")["dumped_messages"], lambda n: n == 1, 5, "dump"
    )
    assert await stored_rows(db_url) == 0
    assert len(bob.incoming_messages()) == 1
    # once: the same device (same +sip.instance) logging out and in again gets nothing more
    await bob.quit()
    bob_again = await clients.baresip("bob", instance=bob.instance)
    await _nothing_but_a_fresh_message(alice, bob_again)


async def test_a_message_for_offline_linphonec_is_accepted_then_shown_once_when_it_registers(
    clients: Clients, db_url: str
) -> None:
    alice = await clients.baresip("alice", peers=(BOB,))

    sent = await alice.send_message(BOB, "the keys are under the mat")

    # baresip prints nothing for a 2xx, 202 included
    assert (sent.status, sent.verdict) == (202, "")
    assert await stored_rows(db_url) == 1

    bob = await clients.linphonec("bob")
    shown = await bob.wait_shown(1)
    assert shown[0].sender == ALICE
    assert shown[0].text.endswith("] the keys are under the mat")
    await wait_for(
        lambda: clients.server.get("/stats")["dumped_messages"], lambda n: n == 1, 5, "dump"
    )
    assert await stored_rows(db_url) == 0
    assert len(bob.incoming_messages()) == 1
    # once: the same device quitting (linphonec does not de-register) and coming back
    await bob.quit()
    bob_again = await clients.linphonec("bob", instance=bob.instance)
    await _nothing_but_a_fresh_message(alice, bob_again)


@pytest.mark.parametrize("msilo_overrides", [("msilo.max_messages=1",)])
async def test_a_refused_message_is_a_failure_in_each_sender(clients: Clients) -> None:
    alice_phone = await clients.linphonec("alice")
    alice_desk = await clients.baresip("alice", peers=(BOB,))
    assert (await alice_phone.send_message(BOB, "first")).status == 202

    # bob's mailbox is full: 486 (msilo.max_messages), and each client says it failed
    phone = await alice_phone.send_message(BOB, "second")
    desk = await alice_desk.send_message(BOB, "third")

    assert (phone.status, phone.verdict) == (486, "NotDelivered")
    assert (desk.status, desk.verdict) == (486, "486 Mailbox Full")
    assert clients.server.get("/stats")["stored_messages"] == 1


async def _nothing_but_a_fresh_message(
    alice: Baresip | Linphonec, bob: Baresip | Linphonec
) -> None:
    """After bob registered again: a new MESSAGE is relayed to him, and it is the only one
    he gets (a second delivery of the stored one would have been sent on his REGISTER,
    before this one)."""
    sent = await alice.send_message(BOB, "ping")
    assert sent.status == 200
    assert [s.text for s in await bob.wait_shown(1)] == ["ping"]
    assert [m.body for m in bob.incoming_messages()] == ["ping"]
