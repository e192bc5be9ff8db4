"""Digest authentication in the service (D14), over real SIP on both backends."""

from __future__ import annotations

from tests.auth.sipauth import DigestClient
from tests.service.conftest import Running, ServerFactory

AUTH = (
    'server.domains=["127.0.0.1"]',
    "auth.enabled=true",
    'auth.secret="s3cret-shared-by-every-host"',
)


async def _subscriber(srv: Running, user: str, password: str) -> None:
    from msilo.auth import compute_ha1

    realm = "127.0.0.1"
    await srv.store.set_subscriber(
        user, realm,
        ha1=compute_ha1("MD5", user, realm, password),
        ha1_sha256=compute_ha1("SHA-256", user, realm, password),
    )  # fmt: skip


async def test_register_needs_credentials_of_the_aor(server: ServerFactory) -> None:
    srv = await server(*AUTH)
    await _subscriber(srv, "alice", "wonderland")
    await _subscriber(srv, "mallory", "evil")
    alice = await srv.agent("alice")
    challenge = await alice.register(600)
    assert challenge.status == 401
    offered = challenge.get_headers("WWW-Authenticate")
    assert [h.split("algorithm=")[1].split(",")[0] for h in offered] == ["SHA-256", "MD5"]
    client = DigestClient("alice", "wonderland")
    credentials = client.authorization(offered[0], method="REGISTER", uri="sip:127.0.0.1")
    accepted = await alice.register(600, headers=[f"Authorization: {credentials}"])
    assert accepted.status == 200
    wrong = DigestClient("alice", "guess").authorization(
        offered[0], method="REGISTER", uri="sip:127.0.0.1"
    )
    assert (await alice.register(600, headers=[f"Authorization: {wrong}"])).status == 401
    replay = await alice.register(600, headers=[f"Authorization: {credentials}"])
    assert replay.status == 401  # the same nonce-count again: stale
    assert "stale=true" in (replay.get_header("WWW-Authenticate") or "")
    # mallory authenticates as herself (on a fresh nonce) but registers alice's AoR.
    fresh = (await alice.register(600)).get_headers("WWW-Authenticate")[0]
    thief = DigestClient("mallory", "evil").authorization(
        fresh, method="REGISTER", uri="sip:127.0.0.1"
    )
    stolen = await alice.register(600, headers=[f"Authorization: {thief}"])
    assert stolen.status == 403


async def test_message_auth_binds_the_sender(server: ServerFactory) -> None:
    srv = await server(*AUTH, "auth.message=true", "server.mode=silo")
    await _subscriber(srv, "alice", "wonderland")
    alice = await srv.agent("alice")
    challenge = await alice.message("sip:bob@127.0.0.1", "hi")
    assert challenge.status == 407
    offer = challenge.get_headers("Proxy-Authenticate")[0]
    client = DigestClient("alice", "wonderland")
    creds = client.authorization(offer, method="MESSAGE", uri="sip:bob@127.0.0.1")
    ok = await alice.message("sip:bob@127.0.0.1", "hi", headers=[f"Proxy-Authorization: {creds}"])
    assert ok.status == 202
    spoof = client.authorization(offer, method="MESSAGE", uri="sip:bob@127.0.0.1")
    spoofed = await alice.message(
        "sip:bob@127.0.0.1", "from the boss", from_uri="sip:boss@127.0.0.1",
        headers=[f"Proxy-Authorization: {spoof}"],
    )  # fmt: skip
    assert spoofed.status == 403
    rows = await srv.store.list("bob", "127.0.0.1")
    assert [(r.src_addr, r.body) for r in rows] == [("sip:alice@127.0.0.1", b"hi")]


async def test_without_auth_message_a_message_needs_no_credentials(server: ServerFactory) -> None:
    srv = await server(*AUTH, "server.mode=silo")
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "hi")).status == 202
