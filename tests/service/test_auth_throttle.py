"""Online password guessing against a running server, over real UDP, on both backends.

The attacker answers a real challenge with wrong passwords as fast as it can, from one
address and then from 20 (127.0.0.x), against two workers sharing the database.  Judged
guesses are what the server counts as ``auth_failures``; the others were dropped (a banned
source) or answered with a fresh challenge without a password check.
"""

from __future__ import annotations

import asyncio

from msilo.auth import compute_ha1
from tests.auth.sipauth import DigestClient
from tests.service.conftest import Running, ServerFactory
from tests.service.sipua import UserAgent

AUTH = (
    'server.domains=["127.0.0.1"]',
    "auth.enabled=true",
    'auth.secret="s3cret-shared-by-every-host"',
    'auth.algorithms=["MD5"]',
)
REALM = "127.0.0.1"


async def _subscriber(srv: Running, user: str, password: str) -> None:
    await srv.store.set_subscriber(user, REALM, ha1=compute_ha1("MD5", user, REALM, password))


def _judged(*servers: Running) -> int:
    return sum(s.stats()["auth_failures"] for s in servers)


def _handled(*servers: Running) -> int:
    return sum(s.stats()["requests_register"] for s in servers)


async def _guess(ua: UserAgent, challenge: str, count: int, tag: str) -> None:
    """Send ``count`` REGISTERs for alice with wrong answers to the server, not waiting."""
    client = DigestClient("alice", "not-her-password")
    for n in range(count):
        creds = client.authorization(challenge, method="REGISTER", uri=f"sip:{REALM}")
        data, _ = ua.build(
            "REGISTER", f"sip:{REALM}", to_uri="sip:alice@127.0.0.1", content_type=None,
            headers=[f"Contact: <{ua.contact}>", f"Authorization: {creds}"],
            call_id=f"guess-{tag}-{n}@x",
        )  # fmt: skip
        ua.send_raw(data)
        if n % 20 == 19:
            await asyncio.sleep(0.01)  # keep within the socket buffers: every guess arrives


async def _settle(servers: tuple[Running, ...], expected: int, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def pending() -> int:
        return sum(s.worker.layer.pending for s in servers if s.worker.layer is not None)

    while _handled(*servers) < expected or pending():
        assert loop.time() < deadline, f"handled {_handled(*servers)} of {expected}"
        await asyncio.sleep(0.05)


async def _register(srv: Running, host: str, password: str) -> int | None:
    """alice registers from ``host``: the final status, None when nothing came back."""
    ua = await srv.agent("alice", domain=REALM, bind_host=host)
    try:
        challenge = await ua.register(600, timeout=2)
    except TimeoutError:
        return None
    assert challenge.status == 401
    offer = challenge.get_headers("WWW-Authenticate")[0]
    creds = DigestClient("alice", password).authorization(
        offer, method="REGISTER", uri=f"sip:{REALM}"
    )
    try:
        reply = await ua.register(600, headers=[f"Authorization: {creds}"], timeout=2)
    except TimeoutError:
        return None
    return reply.status


async def test_guessing_from_one_source_is_cut_off(server: ServerFactory) -> None:
    srv = await server(*AUTH)
    await _subscriber(srv, "alice", "wonderland")
    attacker = await srv.agent("alice", domain=REALM, bind_host="127.0.0.2")
    challenge = (await attacker.register(600)).get_headers("WWW-Authenticate")[0]
    await _guess(attacker, challenge, 1000, "one")
    await _settle((srv,), 1001)
    assert _judged(srv) < 50
    assert srv.stats()["auth_dropped"] > 900  # banned: dropped without an answer
    # Banned: even the right password from there is not answered ...
    assert await _register(srv, "127.0.0.2", "wonderland") is None
    # ... but alice from her own address gets in.
    assert await _register(srv, "127.0.0.99", "wonderland") == 200


async def test_guessing_from_20_sources_on_two_workers_is_cut_off(
    server: ServerFactory,
) -> None:
    one = await server(*AUTH)
    two = await server(*AUTH)  # another worker (or host) on the same database
    await _subscriber(one, "alice", "wonderland")
    attackers = [
        await (one, two)[n % 2].agent("alice", domain=REALM, bind_host=f"127.0.0.{10 + n}")
        for n in range(20)
    ]
    challenges = [(await a.register(600)).get_headers("WWW-Authenticate")[0] for a in attackers]
    await asyncio.gather(
        *(
            _guess(a, c, 50, f"many{n}")
            for n, (a, c) in enumerate(zip(attackers, challenges, strict=True))
        )
    )
    await _settle((one, two), 20 + 1000)
    assert _judged(one, two) < 50
    assert await _register(one, "127.0.0.99", "wonderland") == 200
    assert await _register(two, "127.0.0.98", "wonderland") == 200


async def test_failures_are_logged_a_few_lines_a_second(
    server: ServerFactory, caplog: object
) -> None:
    import logging

    import pytest

    assert isinstance(caplog, pytest.LogCaptureFixture)
    srv = await server(*AUTH, "auth.source_failures=0", "auth.user_failures=0")
    await _subscriber(srv, "alice", "wonderland")
    attacker = await srv.agent("alice", domain=REALM, bind_host="127.0.0.3")
    challenge = (await attacker.register(600)).get_headers("WWW-Authenticate")[0]
    with caplog.at_level(logging.INFO, logger="msilo.route"):
        await _guess(attacker, challenge, 200, "log")
        await _settle((srv,), 201)
    assert _judged(srv) == 200  # no limit configured: every guess judged ...
    lines = [r for r in caplog.records if "event=auth_challenge" in r.getMessage()]
    assert 1 <= len(lines) < 50  # ... but not one log line each
