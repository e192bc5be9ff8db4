"""m_dump (D5, D6, D7) and relay over real SIP: the admin guide's scenarios end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from tests.service.conftest import ServerFactory
from tests.service.sipua import Received, UserAgent

UTC = 'msilo.timezone="UTC"'


async def _store(sender: UserAgent, to: str, *texts: str, **kwargs: object) -> None:
    for text in texts:
        reply = await sender.message(to, text, **kwargs)
        assert reply.status == 202, reply


def _bodies(received: list[Received]) -> list[bytes]:
    return [r.request.body for r in received]


async def _eventually(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_offline_store_register_dump_2xx_row_gone(server: ServerFactory) -> None:
    srv = await server(UTC)
    alice = await srv.agent("alice")
    bob = await srv.agent("bob")
    await _store(alice, "sip:bob@127.0.0.1", "hello bob", "second")
    rows = await srv.store.list("bob", "127.0.0.1")
    assert (await bob.register(600)).status == 200
    received = await bob.wait_requests(2)
    first = received[0].request
    assert first.method == "MESSAGE"
    assert first.uri == bob.contact  # R-URI = the contact just registered (D5)
    assert first.to is not None and first.to.uri == "sip:bob@127.0.0.1"  # To = dst_addr
    assert first.from_ is not None and first.from_.uri == "sip:alice@127.0.0.1"
    assert first.from_.tag  # a new From tag
    stamp = dt.datetime.fromtimestamp(rows[0].inc_time, dt.UTC)
    assert first.get_header("Date") == stamp.strftime("%a, %d %b %Y %H:%M:%S GMT")
    prefix = f"[Offline message - {stamp.strftime('%a %b %e %H:%M:%S %Y')}] "
    assert _bodies(received)[0] == prefix.encode() + b"hello bob"
    assert _bodies(received)[1].endswith(b"] second")
    await _eventually(lambda: _count_is(srv, "bob", 0))
    assert srv.stats()["dumped_messages"] == 2


async def _count_is(srv: object, user: str, n: int) -> bool:
    return await srv.store.count(user, "127.0.0.1") == n  # type: ignore[attr-defined, no-any-return]


async def test_messages_go_one_after_the_other_in_arrival_order(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=0")
    alice = await srv.agent("alice")
    await _store(alice, "sip:bob@127.0.0.1", *[f"m{i}" for i in range(5)])
    answered: set[str] = set()
    order: list[bytes] = []
    overtaken: list[bytes] = []

    bob = await srv.agent("bob", answer=lambda request: None)  # answered by the task below

    async def answer_slowly() -> None:
        seen = 0
        while len(order) < 5:
            await bob.wait_requests(seen + 1)
            item = bob.received[seen]
            seen += 1
            call_id = item.request.call_id or ""
            if call_id in answered or item.request.body in order:
                continue
            if len({r.request.call_id for r in bob.received}) > len(answered) + 1:
                overtaken.append(item.request.body)  # a second message before the first's answer
            order.append(item.request.body)
            await asyncio.sleep(0.1)  # time for a parallel sender to get ahead, if it would
            answered.add(call_id)
            bob.transport.sendto(_ok(item), srv.address)

    await bob.register(600)
    await asyncio.wait_for(answer_slowly(), 15)
    assert order == [f"m{i}".encode() for i in range(5)]
    assert overtaken == []
    await _eventually(lambda: _count_is(srv, "bob", 0))


def _ok(item: Received) -> bytes:
    from tests.service.sipua import _response_for

    return _response_for(item.raw, item.request, 200, "OK")


async def test_a_failed_delivery_keeps_the_row_and_is_sent_again(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    await _store(alice, "sip:bob@127.0.0.1", "try me")
    answers = iter([(480, "Temporarily Unavailable"), (200, "OK")])
    bob = await srv.agent("bob", answer=lambda req: next(answers))
    await bob.register(600)
    await bob.wait_requests(1)
    await _eventually(lambda: _failed_is(srv, 1))
    assert await srv.store.count("bob", "127.0.0.1") == 1

    async def attempt_counted() -> bool:
        # The failed row's lease is released (and the attempt counted) when the dump ends.
        [row] = await srv.store.list("bob", "127.0.0.1")  # type: ignore[attr-defined]
        return bool(row.attempts == 1)

    await _eventually(attempt_counted)
    await bob.register(600)  # the next REGISTER sends it again
    await bob.wait_requests(2)
    await _eventually(lambda: _count_is(srv, "bob", 0))
    assert srv.stats()["dumped_messages"] == 1


async def _failed_is(srv: object, n: int) -> bool:
    return srv.stats()["failed_messages"] == n  # type: ignore[attr-defined, no-any-return]


async def test_a_contact_that_never_answers_times_out_and_keeps_every_row(
    server: ServerFactory,
) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    await _store(alice, "sip:bob@127.0.0.1", "one", "two", "three")
    bob = await srv.agent("bob", answer=lambda req: None)
    await bob.register(600)
    await _eventually(lambda: _failed_is(srv, 1), timeout=8)  # Timer F = 3.2 s here
    # Only the first was tried (retransmitted over UDP, then Timer F): the others were
    # released for the next REGISTER instead of each waiting for its own timeout.
    assert len(bob.received) > 1
    assert all(r.request.body.endswith(b"] one") for r in bob.received)
    assert await srv.store.count("bob", "127.0.0.1") == 3
    rows = await srv.store.claim_for_dump(
        "bob", "127.0.0.1", lease_owner="test", lease_seconds=60, now=int(time.time())
    )
    assert len(rows) == 3  # no lease is left behind


async def test_no_dump_to_a_contact_that_does_not_take_message(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    await _store(alice, "sip:bob@127.0.0.1", "hi")
    bob = await srv.agent("bob")
    await bob.register(600, headers=["Allow: INVITE, OPTIONS"])
    await bob.register(600, contact=f'<{bob.contact}>;methods="INVITE,BYE"')
    await asyncio.sleep(0.3)
    assert bob.received == []
    await bob.register(600, contact=f'<{bob.contact}>;methods="INVITE,MESSAGE"')
    await bob.wait_requests(1)


async def test_unregister_does_not_dump(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    await _store(alice, "sip:bob@127.0.0.1", "hi")
    bob = await srv.agent("bob")
    await bob.register(0)
    await asyncio.sleep(0.3)
    assert bob.received == []
    assert await srv.store.count("bob", "127.0.0.1") == 1


async def test_prefix_only_for_text_plain_and_never_twice(server: ServerFactory) -> None:
    srv = await server(UTC)
    alice = await srv.agent("alice")
    cpim = b"From: <sip:alice@x>\r\n\r\nContent-Type: text/plain\r\n\r\nhi"
    await _store(alice, "sip:bob@127.0.0.1", "x", content_type="message/cpim")
    await alice.request("MESSAGE", "sip:bob@127.0.0.1", body=cpim, content_type="message/cpim")
    await _store(alice, "sip:bob@127.0.0.1", "[Offline message - Mon Feb  5 09:03:01 2024] old")
    await _store(alice, "sip:bob@127.0.0.1", "utf8", content_type="Text/Plain;charset=UTF-8")
    bob = await srv.agent("bob")
    await bob.register(600)
    received = await bob.wait_requests(4)
    bodies = _bodies(received)
    assert bodies[0] == b"x" and bodies[1] == cpim
    assert bodies[2] == b"[Offline message - Mon Feb  5 09:03:01 2024] old"
    assert bodies[3].startswith(b"[Offline message - ") and bodies[3].endswith(b"] utf8")
    assert received[3].request.content_type is not None
    assert received[3].request.content_type.raw == "Text/Plain;charset=UTF-8"


async def test_large_bodies_are_delivered_intact_over_tcp(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=0")
    alice = await srv.agent("alice")
    big = "x" * 3000
    tcp_reply = await _tcp_message(srv.address, "sip:bob@127.0.0.1", big)
    assert tcp_reply.startswith(b"SIP/2.0 202")
    assert [len(r.body) for r in await srv.store.list("bob", "127.0.0.1")] == [3000]
    del alice


async def _tcp_message(address: tuple[str, int], uri: str, text: str) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    local = writer.get_extra_info("sockname")
    body = text.encode()
    data = (
        f"MESSAGE {uri} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{local[1]};branch=z9hG4bKtcp1\r\n"
        f"From: <sip:alice@127.0.0.1>;tag=t1\r\nTo: <{uri}>\r\nCall-ID: tcp1@x\r\n"
        f"CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    writer.write(data)
    reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    return reply


async def test_relay_to_an_online_user(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    bob = await srv.agent("bob")
    await bob.register(600)
    reply = await alice.message("sip:bob@127.0.0.1", "live", call_id="relay-1@x")
    assert reply.status == 200
    [got] = bob.received
    assert got.request.body == b"live"  # relayed as sent: no prefix
    assert got.request.call_id == "relay-1@x"
    assert got.request.uri == bob.contact
    assert await srv.store.count("bob", "127.0.0.1") == 0
    assert srv.stats()["relayed_messages"] == 1


async def test_relay_failure_on_every_branch_stores_the_message(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    phone = await srv.agent("bob", answer=lambda req: (480, "Temporarily Unavailable"))
    laptop = await srv.agent("bob", answer=lambda req: (486, "Busy Here"))
    await phone.register(600)
    await laptop.register(600)
    reply = await alice.message("sip:bob@127.0.0.1", "forked")
    assert reply.status == 202
    assert len(phone.received) == 1 and len(laptop.received) == 1
    assert [r.body for r in await srv.store.list("bob", "127.0.0.1")] == [b"forked"]


async def test_relay_first_2xx_wins(server: ServerFactory) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    slow = await srv.agent("bob", answer=lambda req: None)
    fast = await srv.agent("bob")
    await slow.register(600)
    await fast.register(600)
    reply = await alice.message("sip:bob@127.0.0.1", "forked")
    assert reply.status == 200
    assert await srv.store.count("bob", "127.0.0.1") == 0


async def test_dump_through_outbound_proxy(server: ServerFactory) -> None:
    proxy_ua = UserAgent(("127.0.0.1", 9), user="proxy")
    await proxy_ua.start()
    try:
        srv = await server(
            "server.mode=silo", f'msilo.outbound_proxy="sip:127.0.0.1:{proxy_ua.port}"'
        )
        alice = await srv.agent("alice")
        await _store(alice, "sip:bob@127.0.0.1", "via proxy")
        bob = await srv.agent("bob")
        await bob.register(600)
        [got] = await proxy_ua.wait_requests(1)
        assert got.request.uri == bob.contact  # R-URI still the contact (D5)
        assert bob.received == []
        await _eventually(lambda: _count_is(srv, "bob", 0))
    finally:
        proxy_ua.close()


async def test_large_message_to_a_udp_only_phone_falls_back_to_udp(server: ServerFactory) -> None:
    srv = await server("msilo.add_date=0")
    alice = await srv.agent("alice")
    big = "y" * 2000  # over 1300 bytes: TCP first (RFC 3261 §18.1.1), refused, then UDP
    await _store(alice, "sip:bob@127.0.0.1", big)
    bob = await srv.agent("bob")  # listens on UDP only
    await bob.register(600)
    [got] = await bob.wait_requests(1)
    assert got.request.body == big.encode()
    await _eventually(lambda: _count_is(srv, "bob", 0))


async def _refuse_deletes(db_url: str, refuse: bool) -> None:
    """A real database error on DELETE FROM silo (a trigger), or back to normal."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute(
                "CREATE TRIGGER no_delete BEFORE DELETE ON silo "
                "BEGIN SELECT RAISE(ABORT, 'deletes refused'); END"
                if refuse
                else "DROP TRIGGER no_delete"
            )
        return
    if db_url.startswith("mysql://"):
        from tests.conftest import mysql_script

        await mysql_script(
            db_url,
            "CREATE TRIGGER no_delete BEFORE DELETE ON silo FOR EACH ROW "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'deletes refused'"
            if refuse
            else "DROP TRIGGER no_delete",
        )
        return
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        if refuse:
            await conn.execute(
                "CREATE FUNCTION no_delete() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'deletes refused'; END $$; "
                "CREATE TRIGGER no_delete BEFORE DELETE ON silo "
                "FOR EACH ROW EXECUTE FUNCTION no_delete()"
            )
        else:
            await conn.execute("DROP TRIGGER no_delete ON silo; DROP FUNCTION no_delete()")
    finally:
        await conn.close()


async def test_a_delivered_row_whose_delete_fails_is_kept_not_lost(
    server: ServerFactory, db_url: str, caplog: object
) -> None:
    srv = await server()
    alice = await srv.agent("alice")
    bob = await srv.agent("bob")
    await _store(alice, "sip:bob@127.0.0.1", "one", "two")
    await _refuse_deletes(db_url, True)
    assert (await bob.register(600)).status == 200
    received = await bob.wait_requests(2)
    assert [body.rsplit(b"] ", 1)[-1] for body in _bodies(received)] == [b"one", b"two"]
    # The dump ends with both rows still stored (leased): the user may get them again
    # later, but a message the database did not let go of is never dropped.
    await asyncio.sleep(0.5)
    assert await srv.store.count("bob", "127.0.0.1") == 2
    assert "event=delete_failed" in caplog.text  # type: ignore[attr-defined]
    await _refuse_deletes(db_url, False)
    # The worker goes on serving.
    await _store(alice, "sip:bob2@127.0.0.1", "three")
