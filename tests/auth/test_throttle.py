"""Failed-authentication throttling (msilo.auth.throttle) on SQLite and PostgreSQL.

Separate stores stand for workers in separate processes or hosts: the counts live in the
database, so what one worker counted holds on every other.
"""

from __future__ import annotations

import uuid

import pytest

from msilo.auth import Authenticator, Verdict
from msilo.auth.throttle import Admission, AuthThrottle, identity_key, source_key
from msilo.errors import InvalidRecord
from msilo.storage import Store

from .conftest import ManualClock, StoreFactory
from .sipauth import DigestClient, challenge_params
from .test_authenticate import PASSWORD, alice, challenge_for, header_of, register

__all__ = ["alice"]  # the fixture, shared with test_authenticate


def _ip() -> str:
    """A source address no other test uses (the PostgreSQL table is shared)."""
    b = uuid.uuid4().bytes
    return f"10.{b[0]}.{b[1]}.{b[2]}"


async def test_a_source_is_banned_after_its_failures_on_every_worker(
    make_store: StoreFactory, store: Store, realm: str, clock: ManualClock
) -> None:
    other = await make_store()
    one = AuthThrottle(store, source_failures=3, user_failures=0, window=60, clock=clock)
    two = AuthThrottle(other, source_failures=3, user_failures=0, window=60, clock=clock)
    ip = _ip()
    seen = [await (one, two)[n % 2].admit(ip, f"user{n}", realm) for n in range(5)]
    assert seen == [Admission.JUDGE] * 3 + [Admission.DROP] * 2
    assert one.banned(ip) and two.banned(ip)  # each learnt it from the database
    assert not one.banned(_ip())
    clock.now += 61  # the window is over: judged again, and forgotten locally
    assert not one.banned(ip)
    assert await one.admit(ip, "user0", realm) is Admission.JUDGE


async def test_an_identity_under_attack_is_judged_only_from_fresh_sources(
    store: Store, realm: str, clock: ManualClock
) -> None:
    throttle = AuthThrottle(store, source_failures=100, user_failures=2, window=60, clock=clock)
    guesser = _ip()
    seen = [await throttle.admit(guesser, "alice", realm) for _ in range(4)]
    assert seen == [Admission.JUDGE, Admission.JUDGE, Admission.CHALLENGE, Admission.CHALLENGE]
    # The user's own phone, from an address that has not been guessing, is still judged.
    assert await throttle.admit(_ip(), "alice", realm) is Admission.JUDGE
    assert await throttle.admit(guesser, "bob", realm) is Admission.JUDGE  # another identity


async def test_a_success_takes_its_count_back(store: Store, realm: str, clock: ManualClock) -> None:
    throttle = AuthThrottle(store, source_failures=2, user_failures=0, window=60, clock=clock)
    ip = _ip()
    for _ in range(5):  # a phone that gets in every time is never banned
        assert await throttle.admit(ip, "alice", realm) is Admission.JUDGE
        await throttle.succeeded(ip, "alice", realm)


async def test_ended_windows_are_deleted(store: Store, realm: str, clock: ManualClock) -> None:
    throttle = AuthThrottle(store, window=60, clock=clock)
    await throttle.admit(_ip(), "alice", realm)
    assert await store.delete_expired_auth_failures(int(clock.now)) == 0
    assert await store.delete_expired_auth_failures(int(clock.now) + 60) == 2  # source + user


async def test_wrong_answers_are_counted_and_right_ones_are_not(
    store: Store, realm: str, clock: ManualClock, alice: DigestClient
) -> None:
    throttle = AuthThrottle(store, source_failures=2, user_failures=0, window=60, clock=clock)
    auth = Authenticator(store, realm, "k" * 16, clock=clock, throttle=throttle)
    ip, uri = _ip(), f"sip:{realm}"
    for _ in range(3):  # right answers: never banned
        ch = header_of(await challenge_for(auth, realm), "SHA-256")
        good = alice.authorization(ch, method="REGISTER", uri=uri)
        assert (await auth.check(register(realm, auth=good), proxy=False, source=ip)).accepted
    verdicts = []
    for _ in range(3):
        ch = header_of(await challenge_for(auth, realm), "SHA-256")
        bad = alice.authorization(ch, method="REGISTER", uri=uri, password="guess")
        outcome = await auth.check(register(realm, auth=bad), proxy=False, source=ip)
        verdicts.append((outcome.verdict, outcome.judged))
    assert verdicts == [(Verdict.CHALLENGE, True)] * 2 + [(Verdict.DROPPED, False)]
    # Banned: even the right password is not judged, until the window ends.
    ch = header_of(await challenge_for(auth, realm), "SHA-256")
    good = alice.authorization(ch, method="REGISTER", uri=uri)
    assert (await auth.check(register(realm, auth=good), proxy=False, source=ip)).verdict is (
        Verdict.DROPPED
    )
    # Forged nonces cost an HMAC, not a database write: they are not counted.
    forged = ch.replace(challenge_params(ch)["nonce"], "A" * 44)
    other = _ip()
    for _ in range(5):
        bad = alice.authorization(forged, method="REGISTER", uri=uri, password="x")
        outcome = await auth.check(register(realm, auth=bad), proxy=False, source=other)
        assert outcome.verdict is Verdict.CHALLENGE and not outcome.judged
    assert await throttle.admit(other, "alice", realm) is Admission.JUDGE
    assert alice.password == PASSWORD  # the right answers above used the real password


async def test_keys_the_table_cannot_hold_are_refused(store: Store) -> None:
    with pytest.raises(InvalidRecord):
        await store.count_auth_failures("s:1.2.3.4", "s:1.2.3.4", now=0, window=60)
    with pytest.raises(InvalidRecord):
        await store.count_auth_failures("s:1.2.3.4", "u:ä", now=0, window=60)
    with pytest.raises(InvalidRecord):
        await store.forgive_auth_failures("s:" + "9" * 80, "u:x", now=0)


def test_keys_fit_the_column_whatever_the_client_sent() -> None:
    long_v6 = "fe80::1234:5678:9abc:def0%" + "very-long-interface-name" * 4
    assert len(source_key(long_v6)) <= 80 and source_key(long_v6).isascii()
    assert source_key("192.0.2.1") == "s:192.0.2.1"
    weird = identity_key("\udcff\x00" + "a" * 500, "realm")
    assert len(weird) <= 80 and weird.isascii()
    assert identity_key("alice", "a.example") != identity_key("alice", "b.example")
