"""Several devices per user: every device gets every stored message once (deliver_to = all).

Each test runs on SQLite and PostgreSQL over real UDP sockets.  A device "vanishes" the way
a phone does: its binding lapses (here: the leader's stale-binding cleanup runs as if its
expiry had passed) while it stays remembered as a device of the user.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest

from msilo.sip.message import SipRequest
from msilo.storage.ledger import DEVICE_TABLE, ledger_table
from tests.service.conftest import (
    Running,
    ServerFactory,
    rename_table,
    start_worker,
    stop_worker,
)
from tests.service.sipua import UserAgent, _response_for

DOMAIN = "127.0.0.1"


async def _eventually(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _device(srv: Running, user: str = "bob", **kwargs: object) -> tuple[UserAgent, str]:
    """A UA with its own +sip.instance (RFC 5626), and its Contact value."""
    ua = await srv.agent(user, DOMAIN, **kwargs)
    instance = f"urn:uuid:{uuid.uuid4()}"
    return ua, f'<{ua.contact}>;+sip.instance="<{instance}>"'


async def _vanish(srv: Running, devices: int | None = None) -> None:
    """Every binding lapses (the phone sleeps without unregistering), once ``devices``
    devices of bob are remembered (a REGISTER is answered before its device is)."""
    if devices is not None:
        await _eventually(lambda: _remembered(srv, devices))
    await _registers_done(srv)
    await srv.store.delete_expired_bindings(int(time.time()) + 10**7)


async def _registers_done(srv: Running) -> None:
    """Every request handler has finished: a REGISTER's dump runs after its 200 and its
    device, and one still running would deliver a message the test stores next."""
    assert srv.worker.layer is not None
    assert await srv.worker.layer.drain(10), "a request handler is still running"


async def _remembered(srv: Running, n: int) -> bool:
    return len(await srv.store.remembered_devices("bob", DOMAIN, since=0)) == n


def _messages(ua: UserAgent) -> list[SipRequest]:
    """The MESSAGE transactions a UA got (retransmissions folded by branch)."""
    seen: dict[str, SipRequest] = {}
    for r in ua.received:
        if r.request.method == "MESSAGE" and r.request.via is not None:
            seen.setdefault(r.request.via.branch or "", r.request)
    return list(seen.values())


async def _count(srv: Running, user: str = "bob") -> int:
    return await srv.store.count(user, DOMAIN)


async def _quiet(ua: UserAgent, expected: int, wait: float = 0.4) -> None:
    """Nothing more arrives at ``ua`` within ``wait`` seconds."""
    await asyncio.sleep(wait)
    assert len(_messages(ua)) == expected, [m.body for m in _messages(ua)]


async def _two_remembered_devices(
    srv: Running, *, tracked: bool = True
) -> tuple[UserAgent, str, UserAgent, str]:
    phone, phone_contact = await _device(srv)
    desktop, desktop_contact = await _device(srv)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    await _vanish(srv, devices=2 if tracked else None)
    return phone, phone_contact, desktop, desktop_contact


async def test_a_message_stored_while_both_devices_were_away_reaches_each_once(
    server: ServerFactory,
) -> None:
    srv = await server("msilo.add_date=false")
    phone, phone_contact, desktop, desktop_contact = await _two_remembered_devices(srv)
    alice = await srv.agent("alice", DOMAIN)
    sent = await alice.message(f"sip:bob@{DOMAIN}", "for every device", call_id="chat-1@alice")
    assert sent.status == 202

    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    # The desktop has not had it yet: the message stays stored for it.
    await _quiet(phone, 1)
    assert await _count(srv) == 1
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await _quiet(phone, 1)  # a device never gets a message twice

    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    await desktop.wait_requests(1)
    await _eventually(lambda: _gone(srv))
    for ua in (phone, desktop):
        [got] = _messages(ua)
        assert got.body == b"for every device"
        assert got.call_id == "chat-1@alice"  # one identity per message
    stats = srv.stats()
    assert stats["dumped_messages"] == 2
    assert stats["devices_due"] == 2


async def _gone(srv: Running, user: str = "bob") -> bool:
    return await _count(srv, user) == 0


async def test_a_device_registering_for_the_first_time_while_the_message_lives_gets_it(
    server: ServerFactory,
) -> None:
    srv = await server("msilo.add_date=false")
    phone, phone_contact = await _device(srv)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await _vanish(srv, devices=1)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "hello")).status == 202

    tablet, tablet_contact = await _device(srv)  # bob's new tablet, never seen before
    assert (await tablet.register(600, contact=tablet_contact)).status == 200
    await tablet.wait_requests(1)
    await _quiet(tablet, 1)
    assert await _count(srv) == 1  # the phone is still due
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _eventually(lambda: _gone(srv))


async def test_a_user_with_no_remembered_device_is_served_by_the_first_to_register(
    server: ServerFactory,
) -> None:
    srv = await server("msilo.add_date=false")
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "first come")).status == 202
    phone, phone_contact = await _device(srv)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _eventually(lambda: _gone(srv))
    desktop, desktop_contact = await _device(srv)
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    await _quiet(desktop, 0)


async def test_logging_out_a_device_forgets_it(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=false")
    phone, phone_contact, desktop, desktop_contact = await _two_remembered_devices(srv)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "bye desktop")).status == 202
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _quiet(phone, 1)
    assert await _count(srv) == 1
    # Expires: 0 is a log-out there: the desktop is not waited for any more.
    assert (await desktop.register(0, contact=desktop_contact)).status == 200
    await _eventually(lambda: _gone(srv))
    assert _messages(desktop) == []


async def test_deliver_to_first_keeps_the_opensips_behaviour(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=false", 'msilo.deliver_to="first"')
    phone, phone_contact, desktop, desktop_contact = await _two_remembered_devices(
        srv, tracked=False
    )
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "only one")).status == 202
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _eventually(lambda: _gone(srv))
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    await _quiet(desktop, 0)


async def test_relay_stores_for_the_device_whose_branch_failed_and_only_for_it(
    server: ServerFactory,
) -> None:
    srv = await server("msilo.add_date=false")
    desktop_answers = iter([(480, "Temporarily Unavailable")])
    phone, phone_contact = await _device(srv)
    desktop, desktop_contact = await _device(
        srv, answer=lambda req: next(desktop_answers, (200, "OK"))
    )
    assert (await phone.register(600, contact=phone_contact)).status == 200
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    alice = await srv.agent("alice", DOMAIN)
    sent = await alice.message(f"sip:bob@{DOMAIN}", "fork me", call_id="fork-1@alice")
    assert sent.status == 200  # the phone's 2xx answers alice at once
    await _eventually(lambda: _stored(srv, 1))
    # The desktop answered 480: it gets the message when it next registers, with the
    # Call-ID of alice's request; the phone never gets it again.
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    await desktop.wait_requests(2)
    await _eventually(lambda: _gone(srv))
    assert [m.call_id for m in _messages(desktop)] == ["fork-1@alice", "fork-1@alice"]
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await _quiet(phone, 1)


async def _stored(srv: Running, n: int, user: str = "bob") -> bool:
    return await _count(srv, user) == n


async def test_relay_to_every_device_that_answers_stores_nothing(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=false")
    phone, phone_contact = await _device(srv)
    desktop, desktop_contact = await _device(srv)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "both online")).status == 200
    await desktop.wait_requests(1)
    await phone.wait_requests(1)
    await asyncio.sleep(0.3)
    assert await _count(srv) == 0


async def test_a_remembered_offline_device_gets_what_was_relayed_to_the_others(
    server: ServerFactory,
) -> None:
    srv = await server("msilo.add_date=false")
    phone, phone_contact, desktop, desktop_contact = await _two_remembered_devices(srv)
    assert (await desktop.register(600, contact=desktop_contact)).status == 200  # online
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "phone was asleep")).status == 200
    await _eventually(lambda: _stored(srv, 1))  # kept for the phone alone
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _eventually(lambda: _gone(srv))
    assert (await desktop.register(600, contact=desktop_contact)).status == 200
    await _quiet(desktop, 1)


async def test_a_vanished_phone_does_not_make_the_sender_wait_for_timer_f(
    server: ServerFactory,
) -> None:
    # relay_timeout 0.5 s against Timer F 3.2 s (T1 = 50 ms in these tests).
    srv = await server("msilo.add_date=false", "msilo.relay_timeout=0.5")
    awake = False
    phone, phone_contact = await _device(srv, answer=lambda req: (200, "OK") if awake else None)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    alice = await srv.agent("alice", DOMAIN)
    started = time.monotonic()
    sent = await alice.message(f"sip:bob@{DOMAIN}", "are you there", timeout=10)
    waited = time.monotonic() - started
    assert sent.status == 202
    assert 0.4 < waited < 2.0, waited
    assert await _count(srv) == 1
    # The branch ends with Timer F; then the phone wakes up and registers: it gets the
    # message once, with alice's Call-ID.
    await asyncio.sleep(3.5)
    awake = True
    before = len(_messages(phone))
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(len(phone.received) + 1)
    await _eventually(lambda: _gone(srv))
    assert len(_messages(phone)) == before + 1
    assert srv.stats()["dumped_messages"] == 1


async def test_a_late_2xx_after_relay_timeout_settles_its_device(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=false", "msilo.relay_timeout=0.3")
    held: list[tuple[bytes, SipRequest]] = []

    def hold(req: SipRequest) -> tuple[int, str] | None:
        if req.method == "MESSAGE":
            return None  # answered by hand, late
        return (200, "OK")

    phone, phone_contact = await _device(srv, answer=hold)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    alice = await srv.agent("alice", DOMAIN)
    sent = await alice.message(f"sip:bob@{DOMAIN}", "slow phone")
    assert sent.status == 202
    assert await _count(srv) == 1
    [first] = [r for r in phone.received if r.request.method == "MESSAGE"][:1]
    held.append((first.raw, first.request))
    raw, request = held[0]
    phone.send_raw(_response_for(raw, request, 200, "OK"))
    await _eventually(lambda: _gone(srv))  # the phone was the only device due
    assert srv.stats()["relayed_late"] == 1
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await asyncio.sleep(0.4)
    assert (
        len(
            {
                r.request.via.branch
                for r in phone.received
                if r.request.via and r.request.method == "MESSAGE"
            }
        )
        == 1
    )


async def test_every_attempt_carries_the_call_id_with_a_new_cseq(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=false")
    answers = iter([(480, "Temporarily Unavailable"), (200, "OK")])
    phone, phone_contact = await _device(
        srv, answer=lambda req: next(answers) if req.method == "MESSAGE" else (200, "OK")
    )
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "again", call_id="once@alice")).status == 202
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _eventually(lambda: _failed(srv))
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await _eventually(lambda: _gone(srv))
    first, second = _messages(phone)
    assert first.call_id == second.call_id == "once@alice"
    assert first.cseq is not None and second.cseq is not None
    assert second.cseq.number > first.cseq.number  # never 482 Loop Detected


async def _failed(srv: Running) -> bool:
    return srv.stats()["failed_messages"] == 1


async def test_two_stored_messages_never_share_a_call_id(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=false")
    alice = await srv.agent("alice", DOMAIN)
    # A client that keeps one Call-ID for a conversation (RFC 3428 allows it).
    for n, text in enumerate(["one", "two", "three"], start=1):
        sent = await alice.message(f"sip:bob@{DOMAIN}", text, call_id="conv@alice", cseq=n)
        assert sent.status == 202
    phone, phone_contact = await _device(srv)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(3)
    await _eventually(lambda: _gone(srv))
    got = _messages(phone)
    assert [m.body for m in got] == [b"one", b"two", b"three"]
    ids = [m.call_id for m in got]
    assert ids[0] == "conv@alice"
    assert len(set(ids)) == 3, ids


async def test_nothing_lost_nor_twice_across_workers_and_a_restart(db_url: str) -> None:
    # Two workers (as on two hosts) share the database; the phone takes the message from
    # one, then everything restarts, and the desktop registers with the other.
    first = await start_worker(db_url, "msilo.add_date=false")
    second = await start_worker(db_url, "msilo.add_date=false")
    try:
        phone, phone_contact = await _device(first)
        desktop_instance = f"urn:uuid:{uuid.uuid4()}"
        desktop = await second.agent("bob", DOMAIN)
        desktop_contact = f'<{desktop.contact}>;+sip.instance="<{desktop_instance}>"'
        assert (await phone.register(600, contact=phone_contact)).status == 200
        assert (await desktop.register(600, contact=desktop_contact)).status == 200
        await _eventually(lambda: _remembered(first, 2))
        await _registers_done(second)
        await _vanish(first, devices=2)
        alice = await first.agent("alice", DOMAIN)
        assert (await alice.message(f"sip:bob@{DOMAIN}", "survives")).status == 202
        assert (await phone.register(600, contact=phone_contact)).status == 200
        await phone.wait_requests(1)
        await _quiet(phone, 1)
        assert await _count(first) == 1
    finally:
        await stop_worker(first)
        await stop_worker(second)

    restarted = await start_worker(db_url, "msilo.add_date=false")
    try:
        # The desktop comes back (a new socket, the same instance) to the restarted server.
        desktop = await restarted.agent("bob", DOMAIN)
        contact = f'<{desktop.contact}>;+sip.instance="<{desktop_instance}>"'
        assert (await desktop.register(600, contact=contact)).status == 200
        await desktop.wait_requests(1)
        await _eventually(lambda: _gone(restarted))
        [got] = _messages(desktop)
        assert got.body == b"survives"
        phone_again = await restarted.agent("bob", DOMAIN)
        again = phone_contact.replace(f":{phone.port}>", f":{phone_again.port}>")
        assert (await phone_again.register(600, contact=again)).status == 200
        await _quiet(phone_again, 0)
    finally:
        await stop_worker(restarted)


async def test_silo_mode_tracks_devices_from_the_proxys_register_copies(
    server: ServerFactory,
) -> None:
    srv = await server("msilo.add_date=false", 'server.mode="silo"')
    proxy = await srv.agent("bob", DOMAIN)  # the front proxy replicates bob's REGISTERs
    phone, phone_contact = await _device(srv)
    desktop, desktop_contact = await _device(srv)
    for contact in (phone_contact, desktop_contact):
        assert (await proxy.register(600, contact=contact)).status == 200
    await _eventually(lambda: _remembered(srv, 2))
    await _registers_done(srv)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "via the proxy")).status == 202
    assert (await proxy.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _quiet(phone, 1)
    assert await _count(srv) == 1
    assert (await proxy.register(600, contact=desktop_contact)).status == 200
    await desktop.wait_requests(1)
    await _eventually(lambda: _gone(srv))


async def test_a_failing_ledger_aborts_the_dump_and_loses_nothing(
    server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await server("msilo.add_date=false")
    phone, phone_contact = await _device(srv)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await _vanish(srv, devices=1)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "kept")).status == 202
    ledger = ledger_table(srv.store.names)
    await rename_table(srv, ledger, broken=True)
    with caplog.at_level(logging.ERROR, logger="msilo"):
        # The binding is saved and answered; the dump cannot lease and stops, logged.
        assert (await phone.register(600, contact=phone_contact)).status == 200
        await _eventually(lambda: _logged(caplog, "event=dump_aborted"))
    await _quiet(phone, 0)
    assert await _count(srv) == 1
    await rename_table(srv, ledger, broken=False)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await phone.wait_requests(1)
    await _eventually(lambda: _gone(srv))
    [got] = _messages(phone)
    assert got.body == b"kept"


async def _logged(caplog: pytest.LogCaptureFixture, event: str) -> bool:
    return any(event in r.getMessage() for r in caplog.records)


async def test_a_device_table_that_fails_never_loses_a_message(server: ServerFactory) -> None:
    # PostgreSQL writes the binding and the device in one call (the REGISTER gets 503 +
    # Retry-After, nothing half-done); SQLite saves the binding and logs the device write
    # (200).  Either way the worker goes on and nothing stored is lost.
    srv = await server("msilo.add_date=false")
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "waiting")).status == 202
    phone, phone_contact = await _device(srv)
    await rename_table(srv, DEVICE_TABLE, broken=True)
    try:
        answer = await phone.register(600, contact=phone_contact)
        assert answer.status in (200, 503)
        if answer.status == 503:
            assert answer.get_header("retry-after") is not None
    finally:
        await rename_table(srv, DEVICE_TABLE, broken=False)
    assert (await phone.register(600, contact=phone_contact)).status == 200
    await _eventually(lambda: _gone(srv))
    assert [m.body for m in _messages(phone)] == [b"waiting"]
