"""What a client sees from ``Authenticator.check``, on SQLite and PostgreSQL.

Authenticators built on separate stores stand for workers in separate processes or hosts:
they share only the secret and the database.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from msilo.auth import (
    Authenticator,
    AuthOutcome,
    Verdict,
    compute_ha1,
    require_registrar_owner,
    require_sender,
)
from msilo.errors import Forbidden
from msilo.sip.message import SipRequest
from msilo.storage import Store

from .conftest import ManualClock, StoreFactory
from .sipauth import DigestClient, challenge_params, sip_request

PASSWORD = "Secret, or not?"
MakeAuth = Callable[..., Authenticator]


@pytest.fixture
async def alice(store: Store, realm: str) -> DigestClient:
    await store.set_subscriber("alice", realm, password=PASSWORD)
    return DigestClient("alice", PASSWORD)


def register(realm: str, *, to: str | None = None, auth: str | None = None) -> SipRequest:
    headers = [("Authorization", auth)] if auth else []
    return sip_request("REGISTER", domain=realm, to=to or f"alice@{realm}", headers=headers)


def message(realm: str, *, sender: str, auth: str | None = None) -> SipRequest:
    headers = [("Proxy-Authorization", auth)] if auth else []
    return sip_request("MESSAGE", domain=realm, to=f"bob@{realm}", from_=sender, headers=headers)


async def challenge_for(auth: Authenticator, realm: str, *, proxy: bool = False) -> AuthOutcome:
    req = message(realm, sender=f"alice@{realm}") if proxy else register(realm)
    outcome = await auth.check(req, proxy=proxy)
    assert outcome.verdict is Verdict.CHALLENGE
    return outcome


def header_of(outcome: AuthOutcome, algorithm: str) -> str:
    for _name, value in outcome.headers:
        if challenge_params(value)["algorithm"] == algorithm:
            return value
    raise AssertionError(f"no {algorithm} challenge in {outcome.headers}")


# --- challenges ---------------------------------------------------------------------------


async def test_register_without_credentials_gets_401_with_one_challenge_per_algorithm(
    make_auth: MakeAuth, realm: str
) -> None:
    auth = make_auth(algorithms=("MD5", "SHA-256", "SHA-512-256"))  # any configured order
    outcome = await auth.check(register(realm), proxy=False)
    assert (outcome.status, outcome.reason) == (401, "Unauthorized")
    assert [name for name, _ in outcome.headers] == ["WWW-Authenticate"] * 3
    params = [challenge_params(value) for _, value in outcome.headers]
    assert [p["algorithm"] for p in params] == ["SHA-512-256", "SHA-256", "MD5"]  # strongest first
    for p in params:
        assert p["realm"] == realm and p["qop"] == "auth" and "stale" not in p
    assert len({p["nonce"] for p in params}) == 1
    assert not outcome.accepted and outcome.identity is None


async def test_message_without_credentials_gets_407_proxy_authenticate(
    make_auth: MakeAuth, realm: str
) -> None:
    outcome = await make_auth(algorithms=("SHA-256", "MD5")).check(
        message(realm, sender=f"alice@{realm}"), proxy=True
    )
    assert (outcome.status, outcome.reason) == (407, "Proxy Authentication Required")
    assert [n for n, _ in outcome.headers] == ["Proxy-Authenticate"] * 2
    assert [challenge_params(v)["algorithm"] for _, v in outcome.headers] == ["SHA-256", "MD5"]


async def test_authorization_for_a_message_is_ignored_proxy_authorization_is_needed(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    auth = make_auth()
    ch = await challenge_for(auth, realm, proxy=True)
    creds = alice.authorization(header_of(ch, "SHA-256"), method="MESSAGE", uri=f"sip:bob@{realm}")
    req = sip_request(
        "MESSAGE", domain=realm, to=f"bob@{realm}", from_=f"alice@{realm}",
        headers=[("Authorization", creds)],
    )  # fmt: skip
    assert (await auth.check(req, proxy=True)).status == 407


# --- acceptance ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["SHA-512-256", "SHA-256", "MD5"])
async def test_right_credentials_are_accepted_with_the_subscriber_identity(
    make_auth: MakeAuth, realm: str, alice: DigestClient, algorithm: str
) -> None:
    auth = make_auth()
    ch = await challenge_for(auth, realm)
    creds = alice.authorization(header_of(ch, algorithm), method="REGISTER", uri=f"sip:{realm}")
    outcome = await auth.check(register(realm, auth=creds), proxy=False)
    assert outcome.accepted, outcome.detail
    assert outcome.identity == f"alice@{realm}"
    assert (outcome.username, outcome.domain) == ("alice", realm)
    assert outcome.status == 0 and outcome.headers == ()


async def test_a_message_with_right_proxy_credentials_is_accepted(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    auth = make_auth()
    ch = await challenge_for(auth, realm, proxy=True)
    creds = alice.authorization(header_of(ch, "SHA-256"), method="MESSAGE", uri=f"sip:bob@{realm}")
    outcome = await auth.check(message(realm, sender=f"alice@{realm}", auth=creds), proxy=True)
    assert outcome.identity == f"alice@{realm}"


async def test_a_nonce_from_one_worker_is_accepted_by_another(
    make_store: StoreFactory, make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    other_process = await make_store()
    worker_a, worker_b = make_auth(), make_auth(other_process)
    ch = await challenge_for(worker_a, realm)
    creds = alice.authorization(header_of(ch, "SHA-256"), method="REGISTER", uri=f"sip:{realm}")
    outcome = await worker_b.check(register(realm, auth=creds), proxy=False)
    assert outcome.identity == f"alice@{realm}"


async def test_increasing_nonce_counts_are_accepted_on_any_worker(
    make_store: StoreFactory, make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    workers = [make_auth(), make_auth(await make_store())]
    ch = header_of(await challenge_for(workers[0], realm), "SHA-256")
    for nc in range(1, 7):
        creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=nc)
        outcome = await workers[nc % 2].check(register(realm, auth=creds), proxy=False)
        assert outcome.accepted, (nc, outcome.detail)


async def test_credentials_for_another_proxy_realm_are_skipped(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    # RFC 3261 §22.3: a MESSAGE may carry Proxy-Authorization for other proxies too.
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm, proxy=True), "SHA-256")
    mine = alice.authorization(ch, method="MESSAGE", uri=f"sip:bob@{realm}")
    theirs = alice.authorization(ch, method="MESSAGE", uri=f"sip:bob@{realm}", realm="edge.example")
    req = sip_request(
        "MESSAGE", domain=realm, to=f"bob@{realm}", from_=f"alice@{realm}",
        headers=[("Proxy-Authorization", theirs), ("Proxy-Authorization", mine)],
    )  # fmt: skip
    assert (await auth.check(req, proxy=True)).accepted
    only_theirs = sip_request(
        "MESSAGE", domain=realm, to=f"bob@{realm}", from_=f"alice@{realm}",
        headers=[("Proxy-Authorization", theirs)],
    )  # fmt: skip
    assert (await auth.check(only_theirs, proxy=True)).status == 407


async def test_an_rfc2069_client_without_qop_is_accepted_once_per_nonce(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "MD5")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", qop=False)
    assert (await auth.check(register(realm, auth=creds), proxy=False)).accepted
    again = await auth.check(register(realm, auth=creds), proxy=False)
    assert again.status == 401 and again.stale


# --- refusals -----------------------------------------------------------------------------


async def test_wrong_password_gets_a_fresh_challenge(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", password="guess")
    outcome = await auth.check(register(realm, auth=creds), proxy=False)
    assert outcome.verdict is Verdict.CHALLENGE and outcome.status == 401
    assert not outcome.stale
    assert challenge_params(header_of(outcome, "SHA-256"))["nonce"] != challenge_params(ch)["nonce"]
    assert "wrong password" in outcome.detail and "guess" not in outcome.detail


async def test_a_wrong_answer_uses_up_its_nonce(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    # A guesser cannot go on with one nonce (higher counts included): every guess costs a
    # challenge.  The right answer with that nonce is then told stale=true, so a phone that
    # mistyped retries on the fresh nonce without asking for the password again.
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    bad = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=1, password="x")
    assert (await auth.check(register(realm, auth=bad), proxy=False)).status == 401
    later = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=2)
    stale = await auth.check(register(realm, auth=later), proxy=False)
    assert stale.verdict is Verdict.CHALLENGE and stale.stale
    fresh = header_of(stale, "SHA-256")
    good = alice.authorization(fresh, method="REGISTER", uri=f"sip:{realm}", nc=1)
    assert (await auth.check(register(realm, auth=good), proxy=False)).accepted


def _shape(outcome: AuthOutcome) -> tuple[object, ...]:
    """What a client can see of an outcome, nonces left out."""
    headers = [
        (name, {k: v for k, v in challenge_params(value).items() if k != "nonce"})
        for name, value in outcome.headers
    ]
    return outcome.verdict, outcome.status, outcome.reason, headers


async def test_every_failed_check_gets_the_same_fresh_challenge(
    store: Store, make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    # Unknown user, wrong password, a nonce we never issued, another realm, a user with no
    # credentials at all: one answer, so it never tells who exists (svwar-style enumeration).
    await store.set_subscriber("erin", realm, ha1="", ha1_sha256="")  # nothing usable
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    uri = f"sip:{realm}"
    forged = ch.replace(challenge_params(ch)["nonce"], "A" * 44)
    attempts = {
        "wrong password": register(
            realm, auth=alice.authorization(ch, method="REGISTER", uri=uri, password="x")
        ),
        "unknown user": register(
            realm,
            to=f"mallory@{realm}",
            auth=DigestClient("mallory", "pw").authorization(ch, method="REGISTER", uri=uri),
        ),
        "no credentials stored": register(
            realm,
            to=f"erin@{realm}",
            auth=DigestClient("erin", "pw").authorization(ch, method="REGISTER", uri=uri),
        ),
        "another realm": register(
            realm, auth=alice.authorization(ch, method="REGISTER", uri=uri, realm="elsewhere.org")
        ),
        "forged nonce": register(
            realm, auth=alice.authorization(forged, method="REGISTER", uri=uri)
        ),
    }
    shapes = {why: _shape(await auth.check(req, proxy=False)) for why, req in attempts.items()}
    expected = _shape(await challenge_for(auth, realm))
    assert expected[:3] == (Verdict.CHALLENGE, 401, "Unauthorized")
    assert shapes == dict.fromkeys(attempts, expected)


@pytest.mark.parametrize(
    "value",
    [
        'Digest username="alice", realm="REALM"',
        'Digest username="alice", realm="REALM", nonce="n", uri="u", response="not-hex"',
        'Digest username="alice", realm="REALM, nonce="n"',
    ],
)
async def test_malformed_credentials_get_400(make_auth: MakeAuth, realm: str, value: str) -> None:
    outcome = await make_auth().check(
        register(realm, auth=value.replace("REALM", realm)), proxy=False
    )
    assert (outcome.verdict, outcome.status, outcome.reason) == (
        Verdict.REFUSED, 400, "Bad Request",
    )  # fmt: skip


async def test_basic_credentials_are_ignored_and_challenged(
    make_auth: MakeAuth, realm: str
) -> None:
    outcome = await make_auth().check(register(realm, auth="Basic YWxpY2U6cHc="), proxy=False)
    assert outcome.status == 401


async def test_a_nonce_we_did_not_issue_gets_a_fresh_challenge(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    foreign = make_auth(secret="another deployment")
    ch = header_of(await challenge_for(foreign, realm), "SHA-256")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}")
    outcome = await make_auth().check(register(realm, auth=creds), proxy=False)
    assert outcome.status == 401 and not outcome.stale


async def test_an_algorithm_not_offered_is_not_accepted(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    # No downgrade: MD5 credentials when only SHA-256 is configured get a SHA-256 challenge.
    md5_too = make_auth(algorithms=("SHA-256", "MD5"))
    sha_only = make_auth(algorithms=("SHA-256",))
    ch = header_of(await challenge_for(md5_too, realm), "MD5")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}")
    outcome = await sha_only.check(register(realm, auth=creds), proxy=False)
    assert outcome.status == 401
    assert [challenge_params(v)["algorithm"] for _, v in outcome.headers] == ["SHA-256"]


# --- replay and expiry --------------------------------------------------------------------


async def test_a_replayed_nonce_count_is_refused_with_stale(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=1)
    assert (await auth.check(register(realm, auth=creds), proxy=False)).accepted
    replay = await auth.check(register(realm, auth=creds), proxy=False)
    assert (replay.verdict, replay.status, replay.stale) == (Verdict.CHALLENGE, 401, True)
    assert all(challenge_params(v)["stale"] == "true" for _, v in replay.headers)
    assert "replayed" in replay.detail


async def test_a_replay_on_another_worker_is_refused(
    make_store: StoreFactory, make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    worker_a, worker_b = make_auth(), make_auth(await make_store())
    ch = header_of(await challenge_for(worker_a, realm), "SHA-256")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=5)
    assert (await worker_a.check(register(realm, auth=creds), proxy=False)).accepted
    replay = await worker_b.check(register(realm, auth=creds), proxy=False)
    assert replay.status == 401 and replay.stale
    lower = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=3)
    assert (await worker_b.check(register(realm, auth=lower), proxy=False)).stale
    higher = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=6)
    assert (await worker_b.check(register(realm, auth=higher), proxy=False)).accepted


async def test_an_expired_nonce_with_the_right_password_gets_stale_true(
    make_auth: MakeAuth, realm: str, alice: DigestClient, clock: ManualClock
) -> None:
    auth = make_auth(nonce_expires=300)
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    clock.now += 300
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=1)
    assert (await auth.check(register(realm, auth=creds), proxy=False)).accepted
    clock.now += 1
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", nc=2)
    outcome = await auth.check(register(realm, auth=creds), proxy=False)
    assert (outcome.status, outcome.stale) == (401, True)
    assert all(challenge_params(v).get("stale") == "true" for _, v in outcome.headers)
    # The fresh nonce in the stale challenge works at once.
    retry = alice.authorization(
        header_of(outcome, "SHA-256"), method="REGISTER", uri=f"sip:{realm}"
    )
    assert (await auth.check(register(realm, auth=retry), proxy=False)).accepted


async def test_an_expired_nonce_with_a_wrong_password_is_not_stale(
    make_auth: MakeAuth, realm: str, alice: DigestClient, clock: ManualClock
) -> None:
    # RFC 7616 §3.3: stale=true only when the digest itself was valid.
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    clock.now += 1000
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}", password="nope")
    outcome = await auth.check(register(realm, auth=creds), proxy=False)
    assert outcome.status == 401 and not outcome.stale


async def test_a_nonce_from_the_future_is_refused(
    make_auth: MakeAuth, realm: str, alice: DigestClient, clock: ManualClock
) -> None:
    auth = make_auth()
    clock.now += 3600
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    clock.now -= 3600
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}")
    outcome = await auth.check(register(realm, auth=creds), proxy=False)
    assert outcome.status == 401 and not outcome.accepted


async def test_expired_nonce_counts_are_cleaned_up(
    store: Store, make_auth: MakeAuth, realm: str, alice: DigestClient, clock: ManualClock
) -> None:
    auth = make_auth(nonce_expires=300)
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}")
    assert (await auth.check(register(realm, auth=creds), proxy=False)).accepted
    assert not await store.use_nonce(challenge_params(ch)["nonce"], 1, expires=0)  # recorded
    clock.now += 300 + 59
    await auth.delete_expired_nonces()
    assert not await store.use_nonce(challenge_params(ch)["nonce"], 1, expires=0)  # kept
    clock.now += 1  # lifetime + clock-skew margin
    # (>= 1: on PostgreSQL earlier tests' nonces share the table)
    assert await auth.delete_expired_nonces() >= 1
    assert await auth.delete_expired_nonces() == 0
    # Forgetting the count reopens nothing: the nonce itself is stale by now.
    assert (await auth.check(register(realm, auth=creds), proxy=False)).stale


# --- precomputed HA1 ----------------------------------------------------------------------


async def test_a_subscriber_with_only_a_sha256_ha1_authenticates_with_sha256_only(
    store: Store, make_auth: MakeAuth, realm: str
) -> None:
    await store.set_subscriber(
        "carol", realm, ha1_sha256=compute_ha1("SHA-256", "carol", realm, "pw").upper()
    )
    carol = DigestClient("carol", "pw")
    auth = make_auth()
    ch = await challenge_for(auth, realm)
    ok = carol.authorization(header_of(ch, "SHA-256"), method="REGISTER", uri=f"sip:{realm}")
    assert (await auth.check(register(realm, to=f"carol@{realm}", auth=ok), proxy=False)).accepted
    md5 = carol.authorization(header_of(ch, "MD5"), method="REGISTER", uri=f"sip:{realm}")
    outcome = await auth.check(register(realm, to=f"carol@{realm}", auth=md5), proxy=False)
    # Challenged again, offering only what carol can answer.
    assert outcome.status == 401
    assert [challenge_params(v)["algorithm"] for _, v in outcome.headers] == ["SHA-256"]


async def test_md5_ha1_only_subscriber_as_provisioned_by_opensips(
    store: Store, make_auth: MakeAuth, realm: str
) -> None:
    await store.set_subscriber("dave", realm, ha1=compute_ha1("MD5", "dave", realm, "pw"))
    dave = DigestClient("dave", "pw")
    auth = make_auth()
    ch = await challenge_for(auth, realm)
    ok = dave.authorization(header_of(ch, "MD5"), method="REGISTER", uri=f"sip:{realm}")
    assert (await auth.check(register(realm, to=f"dave@{realm}", auth=ok), proxy=False)).accepted
    sha = dave.authorization(header_of(ch, "SHA-512-256"), method="REGISTER", uri=f"sip:{realm}")
    assert (
        await auth.check(register(realm, to=f"dave@{realm}", auth=sha), proxy=False)
    ).status == 401


# --- ownership ----------------------------------------------------------------------------


async def test_registering_someone_elses_aor_is_forbidden(
    store: Store, make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    creds = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm}")
    req = register(realm, to=f"bob@{realm}", auth=creds)
    outcome = await auth.check(req, proxy=False)
    assert outcome.accepted  # alice is who she says ...
    with pytest.raises(Forbidden) as info:  # ... but bob's messages are not hers
        require_registrar_owner(req, outcome.identity or "")
    assert info.value.status == 403
    own = register(realm, to=f"alice@{realm.upper()}", auth=creds)
    assert require_registrar_owner(own, f"alice@{realm}") == f"alice@{realm}"


async def test_a_message_with_a_spoofed_from_is_forbidden(realm: str) -> None:
    spoofed = message(realm, sender=f"bob@{realm}")
    with pytest.raises(Forbidden):
        require_sender(spoofed, f"alice@{realm}")
    genuine = message(realm, sender=f"alice@{realm}")
    assert require_sender(genuine, f"alice@{realm}") == f"alice@{realm}"
    with pytest.raises(Forbidden):
        require_sender(genuine, f"Alice@{realm}")  # users are case-sensitive


async def test_a_subscriber_without_credentials_for_any_offered_algorithm_is_challenged(
    store: Store, make_auth: MakeAuth, realm: str
) -> None:
    await store.set_subscriber("erin", realm, ha1=compute_ha1("MD5", "erin", realm, "pw"))
    md5 = make_auth(algorithms=("SHA-256", "MD5"))
    ch = header_of(await challenge_for(md5, realm), "SHA-256")
    creds = DigestClient("erin", "pw").authorization(ch, method="REGISTER", uri=f"sip:{realm}")
    sha_only = make_auth(algorithms=("SHA-256",))
    outcome = await sha_only.check(register(realm, to=f"erin@{realm}", auth=creds), proxy=False)
    assert (outcome.verdict, outcome.status) == (Verdict.CHALLENGE, 401)  # as for nobody


async def test_a_digest_uri_that_is_not_the_request_uri_gets_400(
    make_auth: MakeAuth, realm: str, alice: DigestClient
) -> None:
    # RFC 7616 §3.4.6: a response computed for another resource is not accepted.
    auth = make_auth()
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    elsewhere = alice.authorization(ch, method="REGISTER", uri="sip:elsewhere.example.org")
    outcome = await auth.check(register(realm, auth=elsewhere), proxy=False)
    assert (outcome.verdict, outcome.status) == (Verdict.REFUSED, 400)
    # The same URI spelt with another host case is the same resource (RFC 3261 §19.1.4).
    same = alice.authorization(ch, method="REGISTER", uri=f"sip:{realm.upper()}")
    assert (await auth.check(register(realm, auth=same), proxy=False)).accepted
