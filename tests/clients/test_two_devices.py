"""Issue 13, real clients: bob reads his messages on two devices, baresip and linphonec.

A message stored while both of bob's devices were away reaches both, once each. The
devices were known to msilo (both registered as bob, then went away without logging
out: baresip vanished, linphonec quit), their bindings expired, then alice wrote.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.clients.baresip import Baresip
from tests.clients.lab import Clients, live_bindings, stored_rows
from tests.clients.linphone import Linphonec

BOB = "sip:bob@127.0.0.1"
ALICE = "sip:alice@127.0.0.1"
EXPIRES = 2  # short bindings, so that "away" is a binding that expired, not a logout


@pytest.fixture
def msilo_overrides() -> tuple[str, ...]:
    return ("registrar.min_expires=1",)


async def test_a_message_stored_while_both_devices_were_away_reaches_both_once_each(
    clients: Clients, db_url: str
) -> None:
    # bob's two devices register, so msilo knows both of them...
    desk = await clients.baresip("bob", expires=EXPIRES)
    phone = await clients.linphonec("bob", expires=EXPIRES)
    assert desk.instance != phone.instance
    # ...and go away without logging out: the desk's baresip is killed, the phone's
    # linphonec quits (it never de-registers); their bindings then expire.
    await desk.vanish()
    await phone.quit()
    assert all(r.expires() != 0 for r, _ in phone.registrations())  # no logout, as documented
    await _until_no_live_binding(db_url, "bob", timeout=3 * EXPIRES + 5)

    alice = await clients.linphonec("alice")
    sent = await alice.send_message(BOB, "dinner is at eight")
    assert (sent.status, sent.verdict) == (202, "Delivered")
    assert await stored_rows(db_url) == 1

    # Both devices come back (the same devices: the same +sip.instance), one after the other.
    desk_again = await clients.baresip("bob", instance=desk.instance)
    phone_again = await clients.linphonec("bob", instance=phone.instance)
    devices: list[Baresip | Linphonec] = [desk_again, phone_again]
    await _until_each_has_shown(devices, "dinner is at eight", timeout=10)

    shown = _shown_counts(devices, "dinner is at eight")
    assert shown == {desk_again.name: 1, phone_again.name: 1}, f"shown per device: {shown}"
    # Once each: a MESSAGE alice writes now is relayed to both devices, and that is all
    # they get besides the stored one.
    sent = await alice.send_message(BOB, "bring wine")
    assert sent.status == 200
    await _until_each_has_shown(devices, "bring wine", timeout=10)
    assert _shown_counts(devices, "bring wine") == {desk_again.name: 1, phone_again.name: 1}
    shown = _shown_counts(devices, "dinner is at eight")
    assert shown == {desk_again.name: 1, phone_again.name: 1}, f"shown per device: {shown}"
    for device in devices:  # on the wire too: one delivery (Call-ID, CSeq) per device
        deliveries = {
            (m.call_id, m.cseq)
            for m in device.incoming_messages()
            if m.body.endswith("dinner is at eight")
        }
        assert len(deliveries) == 1, (device.name, deliveries)
    # every due device has it: the message is gone (bounded wait: the row may be
    # deleted just after the last device's 200 was handled)
    await _until_stored(db_url, 0, timeout=5)


def _shown_counts(devices: list[Baresip | Linphonec], text: str) -> dict[str, int]:
    return {d.name: sum(s.text.endswith(text) for s in d.shown()) for d in devices}


async def _until_each_has_shown(
    devices: list[Baresip | Linphonec], text: str, timeout: float
) -> None:
    """Wait (bounded) until every device showed ``text``; the caller asserts what came."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not all(_shown_counts(devices, text).values()):
        await asyncio.sleep(0.05)


async def _until_no_live_binding(db_url: str, user: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (live := await live_bindings(db_url, user)) > 0:
        assert loop.time() < deadline, f"{user} still has {live} live binding(s)"
        await asyncio.sleep(0.1)


async def _until_stored(db_url: str, count: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (rows := await stored_rows(db_url)) != count:
        assert loop.time() < deadline, f"{rows} message(s) stored, expected {count}"
        await asyncio.sleep(0.1)
