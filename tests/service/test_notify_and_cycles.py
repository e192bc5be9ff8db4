"""Notifications (D11), reminders (D10), expiry and lease recovery (D6), statistics (D8)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import zoneinfo

import pytest

from msilo.leader import cycles
from msilo.storage.base import NewMessage
from tests.service.conftest import ServerFactory
from tests.service.sipua import UserAgent
from tests.service.test_dump import _count_is, _eventually

NOTIFY = (
    'msilo.from_address="sip:registrar@$rd"',
    'msilo.offline_message="User $rU@$rd is offline, your message $ci is kept"',
    'msilo.content_type_hdr="Content-Type: text/plain; charset=UTF-8\\r\\n"',
    'msilo.contact_hdr="Contact: <sip:registrar@$rd>\\r\\n"',
)


async def test_sender_is_notified_after_the_store(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", *NOTIFY)
    alice = await srv.agent("alice")
    reply = await alice.message(
        "sip:bob@127.0.0.1", "hi", call_id="n1@x", headers=[f"Contact: <{alice.contact}>"]
    )
    assert reply.status == 202
    [note] = await alice.wait_requests(1)
    request = note.request
    assert request.uri == alice.contact  # use_contact = 1: the sender's Contact
    assert request.body == b"User bob@127.0.0.1 is offline, your message n1@x is kept"
    assert request.from_ is not None and request.from_.uri == "sip:registrar@127.0.0.1"
    assert request.to is not None and request.to.uri == "sip:alice@127.0.0.1"
    assert request.content_type is not None
    assert request.content_type.raw == "text/plain; charset=UTF-8"
    assert [c.uri for c in request.contacts] == ["sip:registrar@127.0.0.1"]  # §10 Q1 fixed
    assert srv.stats()["notifications_sent"] == 1


async def test_notification_goes_to_the_from_uri_without_use_contact(
    server: ServerFactory,
) -> None:
    srv = await server("server.mode=silo", "msilo.use_contact=0", *NOTIFY)
    alice = await srv.agent("alice", domain=f"127.0.0.1:{0}")
    alice.domain = f"127.0.0.1:{alice.port}"  # the From URI reaches the agent
    await alice.message("sip:bob@127.0.0.1", "hi", headers=["Contact: <sip:elsewhere@10.0.0.1>"])
    [note] = await alice.wait_requests(1)
    assert note.request.uri == f"sip:alice@127.0.0.1:{alice.port}"


async def test_no_notification_loop(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", *NOTIFY)
    registrar = await srv.agent("registrar")  # sends as sip:registrar@127.0.0.1
    assert (await registrar.message("sip:bob@127.0.0.1", "from the notifier")).status == 202
    marked = await srv.agent("carol")
    reply = await marked.message("sip:bob@127.0.0.1", "a notice", headers=["X-Msilo: notify"])
    assert reply.status == 202
    await asyncio.sleep(0.3)
    assert registrar.received == [] and marked.received == []
    assert srv.stats()["notifications_sent"] == 0
    assert await srv.store.count("bob", "127.0.0.1") == 2


async def test_no_notification_for_a_duplicate_or_a_full_mailbox(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "msilo.max_messages=1", *NOTIFY)
    alice = await srv.agent("alice")
    same = {
        "call_id": "dup@x",
        "cseq": 1,
        "from_tag": "t",
        "headers": [f"Contact: <{alice.contact}>"],
    }
    await alice.message("sip:bob@127.0.0.1", "one", **same)
    await alice.message("sip:bob@127.0.0.1", "one", **same)
    full = await alice.message("sip:bob@127.0.0.1", "two", headers=same["headers"])
    assert full.status == 486
    await asyncio.sleep(0.3)
    assert len(alice.received) == 1


async def test_reminder_goes_to_the_registered_contact_and_is_then_deleted(
    server: ServerFactory,
) -> None:
    srv = await server(
        'msilo.reminder="sip:reminder@127.0.0.1"', "msilo.send_time=1", "msilo.check_time=1",
        'msilo.snd_time_hdr="X-Send-Time"', 'msilo.timezone="Europe/Berlin"',
    )  # fmt: skip
    bob = await srv.agent("bob")
    await bob.register(600, headers=["Allow: MESSAGE"])
    alice = await srv.agent("alice")
    due = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)
    stamp = due.astimezone(zoneinfo.ZoneInfo("Europe/Berlin")).strftime("%Y%m%d%H%M%S")
    # The header's local Berlin time is read with daylight saving (D10); due in an hour so
    # the reminder cycle leaves the row alone while we look at it.
    reply = await alice.message("sip:dave@127.0.0.1", "call mum", headers=[f"X-Send-Time: {stamp}"])
    assert reply.status == 202
    [row] = await srv.store.list("dave", "127.0.0.1")
    assert row.snd_time == int(due.timestamp())
    # Now a reminder for bob, written straight into his mailbox.
    now = int(time.time())
    await srv.store.store_batch(
        [NewMessage("bob", "127.0.0.1", "sip:alice@127.0.0.1", "sip:bob@127.0.0.1", b"meeting",
                    "text/plain", now, now + 3600, snd_time=now - 1)],
        0,
    )  # fmt: skip
    [got] = await bob.wait_requests(1, timeout=6)
    assert got.request.from_ is not None and got.request.from_.uri == "sip:reminder@127.0.0.1"
    assert got.request.to is not None and got.request.to.uri == "sip:bob@127.0.0.1"
    assert got.request.body.startswith(b"[Reminder message - ")
    assert got.request.get_header("Date") is None
    await _eventually(lambda: _count_is(srv, "bob", 0))
    # The leader counts the reminder right after its DELETE commits: the row may be gone a
    # moment before the counter moves.
    await _eventually(lambda: _stat_is(srv, "dumped_reminders", 1), timeout=5)


async def test_a_failed_reminder_becomes_an_ordinary_offline_message(
    server: ServerFactory,
) -> None:
    srv = await server('msilo.reminder="sip:reminder@127.0.0.1"', "msilo.send_time=1")
    now = int(time.time())
    await srv.store.store_batch(
        [NewMessage("erin", "127.0.0.1", "sip:alice@127.0.0.1", "sip:erin@127.0.0.1", b"later",
                    "text/plain", now, now + 3600, snd_time=now - 1)],
        0,
    )  # fmt: skip
    # erin has no contact
    await _eventually(lambda: _stat_is(srv, "failed_reminders", 1), timeout=6)
    [row] = await srv.store.list("erin", "127.0.0.1")
    assert row.snd_time == 0
    erin = await srv.agent("erin")
    await erin.register(600)
    [got] = await erin.wait_requests(1)
    assert got.request.body.endswith(b"] later")
    assert got.request.from_ is not None and got.request.from_.uri == "sip:alice@127.0.0.1"


async def test_malformed_send_time_stores_an_ordinary_message(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", 'msilo.snd_time_hdr="X-Send-Time"')
    alice = await srv.agent("alice")
    reply = await alice.message("sip:bob@127.0.0.1", "hi", headers=["X-Send-Time: 20300231120000"])
    assert reply.status == 202
    [row] = await srv.store.list("bob", "127.0.0.1")
    assert row.snd_time == 0


async def test_expired_messages_are_deleted_and_never_dumped(server: ServerFactory) -> None:
    srv = await server("msilo.check_time=1", "msilo.clean_period=1")
    now = int(time.time())
    await srv.store.store_batch(
        [NewMessage("bob", "127.0.0.1", "sip:a@127.0.0.1", "sip:bob@127.0.0.1", b"old",
                    "text/plain", now - 100, now - 1)],
        0,
    )  # fmt: skip
    bob = await srv.agent("bob")
    await bob.register(600)
    await asyncio.sleep(0.3)
    assert bob.received == []  # D6: the dump query filters exp_time > now
    await _eventually(lambda: _count_is(srv, "bob", 0), timeout=5)
    await _eventually(lambda: _stat_is(srv, "expired_messages", 1), timeout=5)


async def test_a_dead_workers_leases_are_recovered(server: ServerFactory) -> None:
    srv = await server("msilo.check_time=1")
    now = int(time.time())
    await srv.store.store_batch(
        [NewMessage("bob", "127.0.0.1", "sip:a@127.0.0.1", "sip:bob@127.0.0.1", b"stuck",
                    "text/plain", now, now + 3600)],
        0,
    )  # fmt: skip
    # A worker that died mid-dump left this lease behind.
    claimed = await srv.store.claim_for_dump(
        "bob", "127.0.0.1", lease_owner="dead:1", lease_seconds=1, now=now - 5
    )
    assert len(claimed) == 1
    await _eventually(lambda: _recovered(srv), timeout=5)
    bob = await srv.agent("bob")
    await bob.register(600)
    [got] = await bob.wait_requests(1)
    assert got.request.body.endswith(b"stuck")


async def _recovered(srv: object) -> bool:
    return srv.stats()["leases_recovered"] >= 1  # type: ignore[attr-defined, no-any-return]


async def test_silo_mode_reminder_goes_to_the_aor_through_the_outbound_proxy(
    server: ServerFactory,
) -> None:
    from tests.service.sipua import UserAgent

    proxy = await UserAgent(("127.0.0.1", 9), user="proxy").start()
    try:
        srv = await server(
            "server.mode=silo", 'msilo.reminder="sip:reminder@127.0.0.1"', "msilo.send_time=1",
            f'msilo.outbound_proxy="sip:127.0.0.1:{proxy.port}"',
        )  # fmt: skip
        now = int(time.time())
        await srv.store.store_batch(
            [NewMessage("bob", "example.com", "sip:alice@127.0.0.1", "sip:bob@example.com",
                        b"ping", "text/plain", now, now + 3600, snd_time=now - 1)],
            0,
        )  # fmt: skip
        [got] = await proxy.wait_requests(1, timeout=6)
        assert got.request.uri == "sip:bob@example.com"
        assert got.request.to is not None and got.request.to.uri == "sip:bob@example.com"
        await _eventually(lambda: _stat_is(srv, "dumped_reminders", 1), timeout=5)
    finally:
        proxy.close()


async def _stat_is(srv: object, name: str, n: int) -> bool:
    return srv.stats()[name] == n  # type: ignore[attr-defined, no-any-return]


async def test_management_http_reports_the_counters(server: ServerFactory) -> None:
    from tests.service.sipua import free_port

    port = free_port()
    srv = await server("server.mode=silo", f'server.http="127.0.0.1:{port}"')
    alice = await srv.agent("alice")
    await alice.message("sip:bob@127.0.0.1", "counted")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    metrics = await reader.read()
    writer.close()
    assert b"msilo_stored_messages_total 1.0" in metrics
    assert b"msilo_replies_2xx_total 1.0" in metrics
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    health = await reader.read()
    writer.close()
    assert health.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in health


async def test_sender_is_told_when_a_message_expires_undelivered(
    server: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cycles, "EXPIRY_BATCH", 1)  # both rows, one batch each
    caplog.set_level(logging.INFO, logger="msilo.leader")
    proxy = await UserAgent(("127.0.0.1", 9), user="proxy").start()
    try:
        srv = await server(
            "msilo.check_time=1", "msilo.clean_period=1",
            'msilo.from_address="sip:registrar@$rd"',
            'msilo.expired_message="Your message to $tU was not delivered: it expired."',
            'msilo.content_type_hdr="Content-Type: text/plain; charset=UTF-8\\r\\n"',
            f'msilo.outbound_proxy="sip:127.0.0.1:{proxy.port}"',
        )  # fmt: skip
        now = int(time.time())
        await srv.store.store_batch(
            [NewMessage("bob", "127.0.0.1", "sip:alice@127.0.0.1", "sip:bob@127.0.0.1", b"old",
                        "text/plain", now - 100, now - 1),
             # One of our own notices, expired too: never noticed in turn (loop guard).
             NewMessage("bob", "127.0.0.1", "sip:registrar@127.0.0.1", "sip:bob@127.0.0.1",
                        b"notice", "text/plain", now - 100, now - 1)],
            0,
        )  # fmt: skip
        [got] = await proxy.wait_requests(1, timeout=6)
        request = got.request
        assert request.uri == "sip:alice@127.0.0.1"
        assert request.to is not None and request.to.uri == "sip:alice@127.0.0.1"
        assert request.from_ is not None and request.from_.uri == "sip:registrar@127.0.0.1"
        assert request.body == b"Your message to bob was not delivered: it expired."
        assert request.content_type is not None
        assert request.content_type.raw == "text/plain; charset=UTF-8"
        assert request.get_header("X-Msilo") == "notify"
        await _eventually(lambda: _count_is(srv, "bob", 0))
        await _eventually(lambda: _stat_is(srv, "expiry_notices_sent", 1), timeout=5)
        await asyncio.sleep(0.3)
        assert len(proxy.received) == 1
        assert srv.stats()["expired_messages"] == 2
        assert "event=expired count=2" in caplog.text  # one cycle took both batches
    finally:
        proxy.close()
