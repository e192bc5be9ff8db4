"""Push wake-up end to end (RFC 8599): a sleeping phone gets its messages.

A real worker on SQLite and PostgreSQL, real UDP UAs, and the fake FCM / APNs / webhook
services of tests/push/fakes.py over real sockets (FCM and APNs over HTTP/2 with TLS, as
the real ones; the fakes check the JWTs and the request shapes the real ones check).  A
device registers with its push parameters, its binding lapses (the phone sleeps), alice's
MESSAGE is stored (202), the fake gets one push, the device registers and gets the message.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from msilo.sip.message import SipResponse
from tests.push.fakes import Clock, FakeApns, FakeFcm, FakeServer, FakeWebhook, TlsFiles, make_tls
from tests.service.conftest import Running, ServerFactory, rename_table, start_worker, stop_worker
from tests.service.sipua import UserAgent

DOMAIN = "127.0.0.1"
APNS_TOKEN = "ab" * 32  # 64 hex digits, as APNs wants


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("push-tls"))


@pytest.fixture(params=["fcm", "apns", "webhook"])
async def fake(request: pytest.FixtureRequest, tls: TlsFiles) -> AsyncIterator[FakeServer]:
    """One running fake push service of each kind."""
    kinds: dict[str, Callable[..., Any]] = {
        "fcm": lambda: FakeFcm.running(tls, clock=Clock()),
        "apns": lambda: FakeApns.running(tls, clock=Clock()),
        "webhook": lambda: FakeWebhook.running(None, clock=Clock()),
    }
    async with kinds[request.param]() as running:
        yield running


@pytest.fixture
async def fcm(tls: TlsFiles) -> AsyncIterator[FakeFcm]:
    async with FakeFcm.running(tls, clock=Clock()) as running:
        yield running


def push_overrides(fake: FakeServer, directory: Path, **push: object) -> list[str]:
    """``--set`` lines that enable ``fake``'s provider (pointed at the fake) and ``[push]``."""
    table = fake.settings(directory)  # type: ignore[attr-defined]
    lines = [f"push.{fake.name}.{k}={json.dumps(v)}" for k, v in table.items()]
    return lines + [f"push.{k}={json.dumps(v)}" for k, v in push.items()]


def token_for(fake: FakeServer) -> str:
    return APNS_TOKEN if fake.name == "apns" else f"tok-{uuid.uuid4().hex[:12]}"


def param_for(fake: FakeServer) -> str:
    return {"fcm": "msilo-test", "apns": "TEAM123456.com.example.msilo"}.get(fake.name, "x")


class Phone:
    """A UA with its +sip.instance and RFC 8599 parameters in its Contact URI."""

    def __init__(self, ua: UserAgent, provider: str, prid: str, param: str) -> None:
        self.ua = ua
        self.instance = f"urn:uuid:{uuid.uuid4()}"
        self.provider, self.prid, self.param = provider, prid, param

    @property
    def contact(self) -> str:
        pn = f";pn-provider={self.provider};pn-prid={self.prid};pn-param={self.param}"
        return f'<{self.ua.contact}{pn}>;+sip.instance="<{self.instance}>"'

    async def register(self, expires: int = 600) -> SipResponse:
        return await self.ua.register(expires, contact=self.contact)


async def _phone(srv: Running, fake: FakeServer, user: str = "bob") -> Phone:
    return Phone(await srv.agent(user, DOMAIN), fake.name, token_for(fake), param_for(fake))


async def _eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _sleeps(srv: Running, phone: Phone) -> None:
    """The phone's registration lapses (it sleeps), once its push target is kept."""

    async def kept() -> bool:
        got = await srv.store.claim_push_targets(
            "bob", DOMAIN, now_ms=0, window_ms=0, since=0, exclude=()
        )
        return bool(got)  # now_ms = 0: a claim that marks nothing in the future

    await _eventually(kept)
    await srv.store.delete_expired_bindings(int(time.time()) + 10**7)


def _pushes(fake: FakeServer) -> list[Any]:
    """The push requests a fake got (FCM's token exchanges are elsewhere)."""
    return list(fake.requests)


async def _quiet(fake: FakeServer, expected: int, wait: float = 0.5) -> None:
    await asyncio.sleep(wait)
    assert len(_pushes(fake)) == expected


def _payload(fake: FakeServer, request: Any) -> dict[str, Any]:
    body = request.json()
    if fake.name == "fcm":
        return dict(body["message"]["data"])
    if fake.name == "apns":
        return dict(body["msilo"])
    return dict(body)


async def test_a_sleeping_phone_is_pushed_once_then_registers_and_gets_its_message(
    server: ServerFactory, fake: FakeServer, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fake, tmp_path))
    phone = await _phone(srv, fake)
    ok = await phone.register()
    assert ok.status == 200
    # RFC 8599 §5.2: the registrar says which push services it serves.
    assert f'+sip.pns="{fake.name}"' in (ok.get_header("feature-caps") or "")
    await _sleeps(srv, phone)

    alice = await srv.agent("alice", DOMAIN)
    sent = await alice.message(f"sip:bob@{DOMAIN}", "wake up", call_id="wake-1@alice")
    assert sent.status == 202
    [push] = await fake.wait_for(1, timeout=1.0)  # within a second of the 202
    assert push.status == 200
    if fake.name == "fcm":
        assert push.json()["message"]["token"] == phone.prid
    elif fake.name == "apns":
        assert push.path == f"/3/device/{phone.prid}"
    else:
        assert push.path == f"/push/{phone.prid}"
    payload = _payload(fake, push)
    assert str(payload["count"]) == "1"
    assert payload["call_id"] == "wake-1@alice"
    assert payload["from"] == alice.uri
    assert "body" not in payload and b"wake up" not in push.body  # no text by default

    assert (await phone.register()).status == 200  # woken by the push
    [got] = await phone.ua.wait_requests(1)
    assert got.request.body == b"wake up"
    await _eventually(lambda: _gone(srv))
    stats = srv.stats()
    assert stats["pushes_sent"] == 1 and stats["pushes_failed"] == 0
    hist = _histogram(srv, "push_delivery_seconds")
    assert hist["count"] == 1  # push -> REGISTER -> delivered, timed once


async def _gone(srv: Running) -> bool:
    return await srv.store.count("bob", DOMAIN) == 0


def _histogram(srv: Running, name: str) -> dict[str, float]:
    from msilo.server.stats import histogram_families

    for family, _doc, buckets, total in histogram_families(srv.worker.stats.histogram_total()):
        if family == name:
            return {"count": buckets[-1][1], "sum": total}
    raise AssertionError(f"no histogram {name}")


async def test_a_burst_of_ten_messages_is_one_push(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path))
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    for n in range(10):
        assert (await alice.message(f"sip:bob@{DOMAIN}", f"m{n}")).status == 202
    await fcm.wait_for(1, timeout=1.0)
    await _quiet(fcm, 1)  # push.coalesce = 10 s: one push for the burst
    assert srv.stats()["pushes_sent"] == 1
    assert (await phone.register()).status == 200
    await phone.ua.wait_requests(10)


async def test_after_the_window_the_next_message_pushes_again_with_the_count_waiting(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path, coalesce=0.3))
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "one")).status == 202
    await fcm.wait_for(1, timeout=1.0)
    await asyncio.sleep(0.4)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "two")).status == 202
    await fcm.wait_for(2, timeout=1.0)
    assert _payload(fcm, fcm.requests[1])["count"] == "2"  # both still wait


async def test_a_dead_token_is_forgotten_and_not_pushed_again(
    server: ServerFactory, fake: FakeServer, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fake, tmp_path, coalesce=0.1))
    phone = await _phone(srv, fake)
    fake.dead_tokens.add(phone.prid)  # type: ignore[attr-defined]
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "one")).status == 202
    await fake.wait_for(1, timeout=1.0)
    await _eventually(lambda: _stat(srv, "push_tokens_removed", 1))
    await asyncio.sleep(0.2)  # past the window
    assert (await alice.message(f"sip:bob@{DOMAIN}", "two")).status == 202
    await _quiet(fake, 1)  # the device has no push parameters any more
    assert srv.stats()["pushes_failed"] == 1 and srv.stats()["pushes_sent"] == 0
    assert await srv.store.count("bob", DOMAIN) == 2  # nothing lost: both wait for bob


async def _stat(srv: Running, name: str, value: int) -> bool:
    return srv.stats()[name] == value


async def test_a_push_service_that_keeps_failing_never_fails_the_store(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path, max_attempts=2))
    fcm.fail_next = [503, 503]
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "still here")).status == 202
    await fcm.wait_for(2, timeout=3.0)  # the retry, after back-off
    await _eventually(lambda: _stat(srv, "pushes_failed", 1))
    await _quiet(fcm, 2, wait=0.2)  # max_attempts = 2
    assert (await phone.register()).status == 200
    [got] = await phone.ua.wait_requests(1)
    assert got.request.body == b"still here"


async def test_a_retried_push_that_gets_through_counts_as_sent(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path))
    fcm.fail_next = [429]
    fcm.retry_after = "0"
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "again")).status == 202
    await fcm.wait_for(2, timeout=3.0)
    await _eventually(lambda: _stat(srv, "pushes_sent", 1))
    assert [r.status for r in fcm.requests] == [429, 200]


async def test_no_push_for_non_urgent_or_transient_messages(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server(
        "msilo.add_date=false",
        'msilo.transient_types=["application/im-iscomposing+xml"]',
        *push_overrides(fcm, tmp_path),
    )
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    quiet = await alice.message(f"sip:bob@{DOMAIN}", "later", headers=["Priority: non-urgent"])
    assert quiet.status == 202  # stored, but not worth waking the phone
    typing = await alice.request(
        "MESSAGE", f"sip:bob@{DOMAIN}", body=b"<isComposing/>",
        content_type="application/im-iscomposing+xml",
    )  # fmt: skip
    assert typing.status == 480  # transient: never stored, never pushed
    await _quiet(fcm, 0)


async def test_the_body_is_in_the_push_only_when_configured(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path, include_body=1))
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "see you at 8")).status == 202
    [push] = await fcm.wait_for(1, timeout=1.0)
    assert _payload(fcm, push)["body"] == "see you at 8"


async def test_an_unknown_push_service_is_refused_with_555_and_the_ones_we_serve(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server(*push_overrides(fcm, tmp_path))
    phone = Phone(await srv.agent("bob", DOMAIN), "webpush", "https://push.example/x", "")
    refused = await phone.register()
    assert (refused.status, refused.reason) == (555, "Push Notification Service Not Supported")
    assert refused.get_header("feature-caps") == '*;+sip.pns="fcm"'
    assert await srv.store.lookup_bindings("bob", DOMAIN, now=0) == []  # nothing saved


async def test_without_push_configured_push_parameters_are_ignored(
    server: ServerFactory, tmp_path: Path
) -> None:
    srv = await server()
    ua = await srv.agent("bob", DOMAIN)
    ok = await ua.register(contact=f"<{ua.contact};pn-provider=fcm;pn-prid=t;pn-param=p>")
    assert ok.status == 200  # a registrar without RFC 8599, as before
    assert ok.get_header("feature-caps") is None


async def test_a_device_whose_relay_branch_fails_is_pushed(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path))
    phone = await _phone(srv, fcm)
    desk = await srv.agent("bob", DOMAIN)  # online, answers
    phone.ua.answer = lambda req: (480, "Temporarily Unavailable")  # asleep behind its NAT
    assert (await phone.register()).status == 200
    desk_contact = f'<{desk.contact}>;+sip.instance="<urn:uuid:{uuid.uuid4()}>"'
    assert (await desk.register(contact=desk_contact)).status == 200
    alice = await srv.agent("alice", DOMAIN)
    sent = await alice.message(f"sip:bob@{DOMAIN}", "hi both")
    assert sent.status == 200  # the desk took it at once
    [push] = await fcm.wait_for(1, timeout=2.0)
    assert push.json()["message"]["token"] == phone.prid  # the phone only, not the desk
    await _quiet(fcm, 1)


async def test_two_workers_push_a_device_once_per_window(
    db_url: str, fcm: FakeFcm, tmp_path: Path
) -> None:
    overrides = ("msilo.add_date=false", *push_overrides(fcm, tmp_path))
    one = await start_worker(db_url, *overrides)
    two = await start_worker(db_url, *overrides)
    try:
        phone = await _phone(one, fcm)
        assert (await phone.register()).status == 200
        await _sleeps(one, phone)
        alices = [await one.agent("alice", DOMAIN), await two.agent("alice", DOMAIN)]
        answers = await asyncio.gather(
            *(a.message(f"sip:bob@{DOMAIN}", f"from {n}") for n, a in enumerate(alices * 3))
        )
        assert [a.status for a in answers] == [202] * 6
        await fcm.wait_for(1, timeout=1.0)
        await _quiet(fcm, 1)
        assert one.stats()["pushes_sent"] + two.stats()["pushes_sent"] == 1
    finally:
        await stop_worker(one)
        await stop_worker(two)


async def test_silo_mode_keeps_push_parameters_from_the_proxys_register_copies(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    srv = await server(
        'server.mode="silo"', 'server.trusted=["127.0.0.0/8"]', *push_overrides(fcm, tmp_path)
    )
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200  # the proxy's copy
    await _sleeps(srv, phone)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "offline, says the proxy")).status == 202
    [push] = await fcm.wait_for(1, timeout=1.0)
    assert push.json()["message"]["token"] == phone.prid


async def test_a_stalled_provider_does_not_pile_up_pushes_without_bound(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path
) -> None:
    import dataclasses

    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path))
    push = srv.worker.push
    assert push is not None
    push.settings = dataclasses.replace(push.settings, max_pending=1)
    fcm.delay = 1.0  # the service hangs
    bob, carol = await _phone(srv, fcm, "bob"), await _phone(srv, fcm, "carol")
    for phone in (bob, carol):
        assert (await phone.register()).status == 200
    await _sleeps(srv, bob)
    alice = await srv.agent("alice", DOMAIN)
    assert (await alice.message(f"sip:bob@{DOMAIN}", "one")).status == 202
    assert (await alice.message(f"sip:carol@{DOMAIN}", "two")).status == 202  # stored anyway
    await _eventually(lambda: _stat(srv, "pushes_failed", 1))  # carol's push was skipped
    await fcm.wait_for(1, timeout=3.0)
    await _eventually(lambda: _stat(srv, "pushes_sent", 1))
    assert await srv.store.count("carol", DOMAIN) == 1  # nothing lost


async def test_a_lost_push_table_fails_no_register_store_or_delivery(
    server: ServerFactory, fcm: FakeFcm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every statement on msilo_push fails (a broken table, a database that lost it): the
    REGISTER is answered 200, the MESSAGE 202 and delivered; no push goes out."""
    srv = await server("msilo.add_date=false", *push_overrides(fcm, tmp_path))
    phone = await _phone(srv, fcm)
    assert (await phone.register()).status == 200
    await _sleeps(srv, phone)
    await rename_table(srv, "msilo_push", broken=True)
    try:
        assert (await phone.register()).status == 200  # remembering fails, logged
        await srv.store.delete_expired_bindings(int(time.time()) + 10**7)
        alice = await srv.agent("alice", DOMAIN)
        assert (await alice.message(f"sip:bob@{DOMAIN}", "stored anyway")).status == 202
        await _eventually(lambda: _logged(caplog, "event=push_claim_failed"))
        assert (await phone.register()).status == 200
        [got] = await phone.ua.wait_requests(1)  # delivered; the push time is not known
        assert got.request.body == b"stored anyway"
        await _quiet(fcm, 0)
        assert "event=push_target_not_saved" in caplog.text
    finally:
        await rename_table(srv, "msilo_push", broken=False)


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text
