"""The registrar (registrar mode), RFC 3261 §10.3, over real SIP."""

from __future__ import annotations

import asyncio
import time

from tests.service.conftest import ServerFactory


def _contact_expiries(reply: object) -> dict[str, int | None]:
    return {c.uri: c.expires for c in reply.contacts}  # type: ignore[attr-defined]


def _expiries_are(reply: object, expected: dict[str, int]) -> bool:
    """The 200 lists exactly these contacts, each with its remaining expiry (which may
    have ticked down by one second between the REGISTER and the answer)."""
    got = _contact_expiries(reply)
    return got.keys() == expected.keys() and all(
        got[uri] is not None and expected[uri] - 1 <= got[uri] <= expected[uri]  # type: ignore[operator]
        for uri in expected
    )


async def test_register_saves_the_binding_and_lists_it(server: ServerFactory) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    reply = await ua.register(600, headers=["Allow: INVITE, MESSAGE, OPTIONS"])
    assert reply.status == 200
    assert _expiries_are(reply, {ua.contact: 600})
    [binding] = await srv.store.lookup_bindings("alice", "127.0.0.1", now=int(time.time()))
    assert binding.contact == ua.contact
    assert binding.methods == ("INVITE", "MESSAGE", "OPTIONS")
    assert binding.received == f"udp:127.0.0.1:{ua.port}"
    assert binding.transport == "udp"


async def test_expiry_is_bounded(server: ServerFactory) -> None:
    srv = await server("registrar.min_expires=60", "registrar.max_expires=7200")
    ua = await srv.agent("alice")
    brief = await ua.register(10)
    assert brief.status == 423
    assert brief.get_header("Min-Expires") == "60"
    assert await srv.store.lookup_bindings("alice", "127.0.0.1", now=int(time.time())) == []
    long = await ua.register(999999)
    assert _expiries_are(long, {ua.contact: 7200})


async def test_default_expiry_applies_when_none_is_asked(server: ServerFactory) -> None:
    srv = await server("registrar.default_expires=1800")
    ua = await srv.agent("alice")
    reply = await ua.request(
        "REGISTER", "sip:127.0.0.1", to_uri=ua.uri, content_type=None,
        headers=[f"Contact: <{ua.contact}>"],
    )  # fmt: skip
    assert _expiries_are(reply, {ua.contact: 1800})


async def test_two_devices_and_removal(server: ServerFactory) -> None:
    srv = await server()
    phone = await srv.agent("alice")
    laptop = await srv.agent("alice")
    await phone.register(600)
    reply = await laptop.register(300)
    assert _expiries_are(reply, {phone.contact: 600, laptop.contact: 300})
    removed = await phone.register(0)
    assert _expiries_are(removed, {laptop.contact: 300})


async def test_star_removes_every_binding_only_with_expires_zero(server: ServerFactory) -> None:
    srv = await server()
    phone = await srv.agent("alice")
    laptop = await srv.agent("alice")
    await phone.register(600)
    await laptop.register(600)
    bad = await phone.register(600, contact="*")
    assert bad.status == 400
    cleared = await phone.register(0, contact="*")
    assert cleared.status == 200 and cleared.contacts == []
    assert await srv.store.lookup_bindings("alice", "127.0.0.1", now=int(time.time())) == []


async def test_out_of_order_cseq_on_the_same_call_id_is_refused(server: ServerFactory) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    call = {"call_id": "reg-fixed@host", "to_uri": ua.uri, "content_type": None}
    headers = [f"Contact: <{ua.contact}>", "Expires: 600"]
    ok = await ua.request("REGISTER", "sip:127.0.0.1", cseq=5, headers=headers, **call)
    stale = await ua.request("REGISTER", "sip:127.0.0.1", cseq=4, headers=headers, **call)
    newer = await ua.request("REGISTER", "sip:127.0.0.1", cseq=6, headers=headers, **call)
    assert (ok.status, stale.status, newer.status) == (200, 400, 200)


async def test_instance_id_replaces_the_old_contact_of_the_same_device(
    server: ServerFactory,
) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    await ua.register(600, contact=f"<sip:alice@127.0.0.1:7001>;{instance}")
    reply = await ua.register(600, contact=f"<sip:alice@127.0.0.1:7002>;{instance}")
    assert list(_contact_expiries(reply)) == ["sip:alice@127.0.0.1:7002"]


async def test_a_query_lists_bindings_without_changing_them(server: ServerFactory) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    await ua.register(600)
    reply = await ua.request(
        "REGISTER", "sip:127.0.0.1", to_uri=ua.uri, content_type=None, call_id="q@x"
    )
    assert reply.status == 200 and list(_contact_expiries(reply)) == [ua.contact]


async def test_concurrent_registers_of_one_user_all_land(server: ServerFactory) -> None:
    srv = await server()
    devices = [await srv.agent("alice") for _ in range(8)]
    replies = await asyncio.gather(*(d.register(600) for d in devices))
    assert all(r.status == 200 for r in replies)
    bindings = await srv.store.lookup_bindings("alice", "127.0.0.1", now=int(time.time()))
    assert {b.contact for b in bindings} == {d.contact for d in devices}


async def test_silo_mode_answers_register_without_keeping_bindings(server: ServerFactory) -> None:
    srv = await server("server.mode=silo")
    ua = await srv.agent("alice")
    assert (await ua.register(600)).status == 200
    assert await srv.store.lookup_bindings("alice", "127.0.0.1", now=int(time.time())) == []


def _contacts(ua: object, n: int, start: int = 0) -> str:
    port = ua.port  # type: ignore[attr-defined]
    return ", ".join(
        f"<sip:alice-device-{i:04d}-with-a-long-name@127.0.0.1:{port};transport=udp>"
        for i in range(start, start + n)
    )


async def test_max_contacts_refuses_a_register_that_would_exceed_it(
    server: ServerFactory,
) -> None:
    srv = await server("registrar.max_contacts=3")
    ua = await srv.agent("alice")
    too_many = await ua.register(600, contact=_contacts(ua, 4))  # in one request
    assert (too_many.status, too_many.reason) == (403, "Too Many Contacts")
    assert await srv.store.lookup_bindings("alice", "127.0.0.1", now=int(time.time())) == []
    assert (await ua.register(600, contact=_contacts(ua, 3))).status == 200
    refused = await ua.register(600, contact=_contacts(ua, 1, start=3))  # a fourth one
    assert (refused.status, refused.reason) == (403, "Too Many Contacts")
    refresh = await ua.register(600, contact=_contacts(ua, 2))  # refreshing is fine
    assert refresh.status == 200 and len(refresh.contacts) == 3
    # Removing one makes room for another, in the same request.
    first = _contacts(ua, 1).split(">")[0] + ">;expires=0"
    swap = await ua.register(600, contact=f"{first}, {_contacts(ua, 1, start=3)}")
    assert swap.status == 200 and len(swap.contacts) == 3


async def test_the_default_limit_is_10_contacts(server: ServerFactory) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    assert (await ua.register(600, contact=_contacts(ua, 11))).status == 403
    assert (await ua.register(600, contact=_contacts(ua, 10))).status == 200


async def test_a_200_over_udp_never_exceeds_a_datagram(server: ServerFactory) -> None:
    # 40 long contacts registered (over TCP, or before the limit was lowered): a small
    # REGISTER over UDP -- whose source nobody verified -- must not get a 5 KB answer.
    srv = await server("registrar.max_contacts=50")
    ua = await srv.agent("alice")
    for start in range(0, 40, 10):
        assert (await ua.register(600, contact=_contacts(ua, 10, start=start))).status == 200
    data, branch = ua.build(
        "REGISTER", "sip:127.0.0.1", to_uri=ua.uri, content_type=None,
        headers=[f"Contact: <{ua.contact}>", "Expires: 600"], call_id="small@x",
    )  # fmt: skip
    raw: list[bytes] = []
    original = ua._datagram
    ua._datagram = lambda d, a: (raw.append(d), original(d, a))  # type: ignore[method-assign]
    reply = await ua.send_and_wait(data, branch)
    assert reply.status == 200
    assert len(raw[-1]) <= 1300
    assert [c.uri for c in reply.contacts] == [ua.contact]  # its own binding, listed
    # Over TCP the answer lists every binding (RFC 3261 §10.3 step 8).
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        port = writer.get_extra_info("sockname")[1]
        writer.write(
            f"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKt1"
            f"\r\nFrom: <{ua.uri}>;tag=t1\r\nTo: <{ua.uri}>\r\nCall-ID: tcp@x\r\nCSeq: 1 REGISTER"
            f"\r\nContent-Length: 0\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"SIP/2.0 200") and head.count(b"\r\nContact: ") == 41
        assert len(head) > 3 * 1300  # what a spoofed UDP REGISTER would have sent its victim
    finally:
        writer.close()
