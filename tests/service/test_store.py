"""m_store over real SIP: 202 only after commit, fields (D4), owner (D3), quota (D9),
idempotency (D12), limits (D13), request policy, and failure paths."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import asyncpg
import pytest

from tests.service.conftest import Running, ServerFactory, rename_table
from tests.service.sipua import UserAgent

SILO = "server.mode=silo"


async def test_offline_message_is_stored_with_its_fields_and_answered_202(
    server: ServerFactory,
) -> None:
    srv = await server(SILO)
    alice = await srv.agent("alice")
    body = "héllo, Bob; ünïcode and\r\nnew lines".encode()
    before = int(time.time())
    reply = await alice.request(
        "MESSAGE", "sip:bob@127.0.0.1", body=body, content_type="text/plain; charset=UTF-8"
    )
    assert (reply.status, reply.reason) == (202, "Accepted")
    rows = await srv.store.list("bob", "127.0.0.1")
    assert len(rows) == 1
    row = rows[0]
    assert row.body == body
    assert row.ctype == "text/plain; charset=UTF-8"  # full value, parameters kept (D4)
    assert row.src_addr == "sip:alice@127.0.0.1"
    assert row.dst_addr == "sip:bob@127.0.0.1"
    assert before <= row.inc_time <= int(time.time())
    assert row.exp_time == row.inc_time + 259200
    assert srv.stats()["stored_messages"] == 1
    assert (srv.stats()["batch_flushes"], srv.stats()["batch_rows"]) == (1, 1)


async def test_expires_header_shortens_but_never_lengthens_the_lifetime(
    server: ServerFactory,
) -> None:
    srv = await server(SILO, "msilo.expire_time=1000")
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "a", headers=["Expires: 60"])).status == 202
    assert (await alice.message("sip:bob@127.0.0.1", "b", headers=["Expires: 99999"])).status == 202
    assert (await alice.message("sip:bob@127.0.0.1", "c", headers=["Expires: 0"])).status == 202
    rows = await srv.store.list("bob", "127.0.0.1")
    assert [r.exp_time - r.inc_time for r in rows] == [60, 1000, 1000]


async def test_empty_body_is_stored(server: ServerFactory) -> None:
    srv = await server(SILO)
    alice = await srv.agent("alice")
    assert (await alice.request("MESSAGE", "sip:bob@127.0.0.1", body=b"")).status == 202
    assert [r.body for r in await srv.store.list("bob", "127.0.0.1")] == [b""]


async def test_retransmission_is_answered_without_storing_again(server: ServerFactory) -> None:
    srv = await server(SILO)
    alice = await srv.agent("alice")
    data, branch = alice.build("MESSAGE", "sip:bob@127.0.0.1", body=b"once")
    first = await alice.send_and_wait(data, branch)
    second = await alice.send_and_wait(data, branch)
    assert first.status == second.status == 202
    assert first.to and second.to and first.to.tag == second.to.tag  # the same response replayed
    assert await srv.store.count("bob", "127.0.0.1") == 1


async def test_replay_after_the_transaction_is_caught_by_the_dedupe_key(
    server: ServerFactory,
) -> None:
    srv = await server(SILO)
    alice = await srv.agent("alice")
    same = {"call_id": "replayed-1@host", "cseq": 7, "from_tag": "fixed"}
    # Each call uses a new branch, so a new transaction: only the dedupe key
    # (Call-ID, CSeq, From-tag) recognises the replay (D12).
    first = await alice.message("sip:bob@127.0.0.1", "once", **same)
    second = await alice.message("sip:bob@127.0.0.1", "once", **same)
    assert first.status == second.status == 202
    assert await srv.store.count("bob", "127.0.0.1") == 1
    assert srv.stats()["duplicates"] == 1
    other = await alice.message("sip:bob@127.0.0.1", "new", **{**same, "cseq": 8})
    assert other.status == 202
    assert await srv.store.count("bob", "127.0.0.1") == 2


async def test_full_mailbox_is_answered_486_and_nothing_is_stored(server: ServerFactory) -> None:
    srv = await server(SILO, "msilo.max_messages=2")
    alice = await srv.agent("alice")
    statuses = [(await alice.message("sip:bob@127.0.0.1", f"m{i}")).status for i in range(3)]
    assert statuses == [202, 202, 486]
    assert await srv.store.count("bob", "127.0.0.1") == 2
    assert srv.stats()["quota_rejections"] == 1


async def test_quota_holds_under_concurrent_stores(server: ServerFactory) -> None:
    srv = await server(SILO, "msilo.max_messages=5")
    senders = [await srv.agent(f"s{i}") for i in range(20)]
    replies = await asyncio.gather(*(s.message("sip:bob@127.0.0.1", "x") for s in senders))
    assert sorted(r.status for r in replies) == [202] * 5 + [486] * 15
    assert await srv.store.count("bob", "127.0.0.1") == 5


async def test_owner_is_the_to_uri_when_the_request_uri_is_not_our_aor(
    server: ServerFactory,
) -> None:
    srv = await server(SILO, 'server.domains=["example.com","127.0.0.1"]')
    alice = await srv.agent("alice")
    # R-URI rewritten to a device contact in another domain: the To URI names the owner (D3).
    reply = await alice.message("sip:bob@10.1.2.3:5062", "hi", to_uri="sip:Bob@EXAMPLE.com")
    assert reply.status == 403  # the R-URI's domain is not ours: policy refuses it
    reply = await alice.message("sip:127.0.0.1", "hi", to_uri="sip:Bob@EXAMPLE.com")
    assert reply.status == 484  # no user in the R-URI
    reply = await alice.message("sip:bob%40x@127.0.0.1", "hi", to_uri="sip:Bob@EXAMPLE.com")
    assert reply.status == 202
    assert await srv.store.count("bob@x", "127.0.0.1") == 1  # escapes resolved (§19.1.4)


async def test_owner_domain_is_lower_cased(server: ServerFactory) -> None:
    srv = await server(SILO)
    alice = await srv.agent("alice")
    assert (await alice.message("sip:carol@Example.COM", "hi")).status == 202
    assert await srv.store.count("carol", "example.com") == 1


async def test_oversize_message_gets_513_and_the_next_request_works(
    server: ServerFactory,
) -> None:
    srv = await server(SILO, "limits.max_message_size=2048")
    alice = await srv.agent("alice")
    reply = await alice.message("sip:bob@127.0.0.1", "x" * 3000)
    assert reply.status == 513
    assert (await alice.message("sip:bob@127.0.0.1", "small")).status == 202
    assert await srv.store.count("bob", "127.0.0.1") == 1


async def test_request_policy(server: ServerFactory) -> None:
    srv = await server(SILO, 'server.domains=["127.0.0.1"]')
    ua = await srv.agent("alice")
    options = await ua.request("OPTIONS", "sip:127.0.0.1", content_type=None)
    assert options.status == 200
    assert options.allow == ("REGISTER", "MESSAGE", "OPTIONS")
    subscribe = await ua.request("SUBSCRIBE", "sip:bob@127.0.0.1", content_type=None)
    assert subscribe.status == 405 and subscribe.allow is not None
    # RFC 3261 §8.2.2.3: an extension we do not implement is refused and named; Path is ours.
    required = ["Require: 100rel, path", "Require: timer"]
    bad = await ua.request("MESSAGE", "sip:bob@127.0.0.1", body=b"x", headers=required)
    assert bad.status == 420 and bad.get_headers("unsupported") == ["100rel, timer"]
    path_only = await ua.request("OPTIONS", "sip:127.0.0.1", headers=["Require: path"])
    assert path_only.status == 200
    data, branch = ua.build("MESSAGE", "sip:bob@127.0.0.1", body=b"x")
    hops = await ua.send_and_wait(data.replace(b"Max-Forwards: 70", b"Max-Forwards: 0"), branch)
    assert hops.status == 483
    assert (await ua.message("sip:127.0.0.1", "x")).status == 484
    assert (await ua.message("sip:bob@elsewhere.org", "x")).status == 403
    assert await srv.store.count("bob", "127.0.0.1") == 0


async def test_garbage_and_broken_requests_do_not_stop_the_service(server: ServerFactory) -> None:
    srv = await server(SILO)
    ua = await srv.agent("alice")
    ua.send_raw(b"\x00\xff garbage that is not SIP at all \r\n\r\n")
    data, branch = ua.build("MESSAGE", "sip:bob@127.0.0.1", body=b"abc")
    wrong_length = data.replace(b"Content-Length: 3", b"Content-Length: 30")
    assert (await ua.send_and_wait(wrong_length, branch)).status == 400
    no_cseq, branch = ua.build("MESSAGE", "sip:bob@127.0.0.1", body=b"abc")
    ua.send_raw(no_cseq.replace(b"CSeq:", b"X-Nothing:"))  # unanswerable: dropped
    data, branch = ua.build("MESSAGE", "unknown:bob@127.0.0.1", body=b"abc")
    assert (await ua.send_and_wait(data, branch)).status == 416
    assert (await ua.message("sip:bob@127.0.0.1", "still alive")).status == 202
    assert [r.body for r in await srv.store.list("bob", "127.0.0.1")] == [b"still alive"]


async def test_database_failure_is_answered_503_logged_once_and_recovered(
    server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await server(SILO)
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "before")).status == 202
    await _rename_silo_table(srv, broken=True)
    with caplog.at_level(logging.INFO, logger="msilo"):
        replies = [await alice.message("sip:bob@127.0.0.1", f"lost? {i}") for i in range(5)]
        assert {r.status for r in replies} == {503}
        assert {r.get_header("Retry-After") for r in replies} == {"5"}
        await _rename_silo_table(srv, broken=False)  # the database is back
        assert (await alice.message("sip:bob@127.0.0.1", "after")).status == 202
    events = [r.getMessage().split()[0] for r in caplog.records if "event=db_" in r.getMessage()]
    assert events == ["event=db_down", "event=db_up"]  # one line per change, not per request
    assert srv.stats()["store_failures"] == 5
    assert [r.body for r in await srv.store.list("bob", "127.0.0.1")] == [b"before", b"after"]


async def _rename_silo_table(srv: Running, *, broken: bool) -> None:
    """Rename the silo table behind the server's back (every insert fails), or back."""
    await rename_table(srv, srv.config.msilo.db_table, broken=broken)


async def test_a_flood_from_one_address_is_rate_limited_while_another_is_served(
    server: ServerFactory,
) -> None:
    srv = await server(SILO, "limits.rate=5", "limits.burst=5")
    flooder = await srv.agent("mallory")
    statuses = [(await flooder.message("sip:bob@127.0.0.1", f"x{i}")).status for i in range(8)]
    assert statuses[:5] == [202] * 5 and set(statuses[5:]) == {503}
    # Every test agent is on 127.0.0.1: a second address shows the limit is per source.
    other = await UserAgent(srv.address, user="trent", bind_host="127.0.0.2").start()
    try:
        assert (await other.message("sip:bob@127.0.0.1", "served")).status == 202
    finally:
        other.close()
    assert srv.stats()["rate_limited"] == 3


async def test_silo_mode_accepts_only_trusted_proxies(server: ServerFactory) -> None:
    closed = await server(SILO, 'server.trusted=["10.0.0.0/8"]')
    stranger = await closed.agent("alice")
    assert (await stranger.message("sip:bob@127.0.0.1", "x")).status == 403
    assert await closed.store.count("bob", "127.0.0.1") == 0
    opened = await server(SILO, 'server.trusted=["127.0.0.0/8", "::1"]')
    proxy = await opened.agent("alice")
    assert (await proxy.message("sip:bob@127.0.0.1", "x")).status == 202


async def test_a_full_batch_queue_is_answered_503_with_retry_after(server: ServerFactory) -> None:
    srv = await server(SILO)
    assert srv.worker.writer is not None
    # Tiny, so that a stalled database fills it at once: one flush in flight, two waiting.
    srv.worker.writer.max_queue = 2
    srv.worker.writer.max_inflight = 1
    senders = [await srv.agent(f"s{i}") for i in range(6)]
    table = srv.config.msilo.db_table
    url = srv.config.msilo.db_url
    # Stall every commit by holding the table's write lock from another connection.
    if url.startswith("sqlite:///"):
        blocker = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        release = blocker.rollback
    elif url.startswith("mysql://"):
        from tests.conftest import mysql_connect

        my = await mysql_connect(url)
        async with my.cursor() as cur:
            await cur.execute(f'LOCK TABLES "{table}" WRITE')

        async def unlock() -> None:
            my.close()  # the session ends: its table lock with it
    else:
        conn = await asyncpg.connect(url)
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")

        async def unlock() -> None:
            await tx.rollback()
            await conn.close()

    pending = [asyncio.ensure_future(s.message("sip:bob@127.0.0.1", "q")) for s in senders]
    await asyncio.sleep(1.0)
    done_early = [p.result() for p in pending if p.done()]
    assert done_early and all(r.status == 503 for r in done_early)
    assert all(r.get_header("Retry-After") == "5" for r in done_early)
    if url.startswith("sqlite:///"):
        release()
        blocker.close()
    else:
        await unlock()
    replies = await asyncio.gather(*pending)
    accepted = sum(r.status == 202 for r in replies)
    assert accepted + len(done_early) == 6
    assert await srv.store.count("bob", "127.0.0.1") == accepted  # every 202 is a row
