"""The storage side of authentication on both backends: subscribers and nonce counts."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from msilo.errors import InvalidRecord
from msilo.storage import Store
from msilo.storage.subscriber import NONCE_TABLE, Subscriber

from .conftest import StoreFactory


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def test_a_subscriber_is_created_read_updated_and_removed(store: Store, realm: str) -> None:
    assert await store.get_subscriber("alice", realm) is None
    assert await store.set_subscriber("alice", realm, password="pw", ha1="a" * 32) is True
    assert await store.get_subscriber("alice", realm) == Subscriber(
        "alice", realm, password="pw", ha1="a" * 32
    )
    # Replaced as a whole: the old password and MD5 HA1 do not outlive the change.
    assert await store.set_subscriber("alice", realm, ha1_sha256="b" * 64) is False
    assert await store.get_subscriber("alice", realm) == Subscriber(
        "alice", realm, ha1_sha256="b" * 64
    )
    assert await store.remove_subscriber("alice", realm) is True
    assert await store.remove_subscriber("alice", realm) is False
    assert await store.get_subscriber("alice", realm) is None


async def test_subscribers_are_matched_by_exact_username_and_domain(
    store: Store, realm: str
) -> None:
    await store.set_subscriber("alice", realm, password="pw")
    assert await store.get_subscriber("Alice", realm) is None
    assert await store.get_subscriber("alice", "other." + realm) is None


async def test_a_subscriber_repr_shows_no_secret(realm: str) -> None:
    text = repr(Subscriber("alice", realm, password="hunter2", ha1="f" * 32))
    assert "hunter2" not in text and "f" * 32 not in text and "password" in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"password": "x" * 26},  # OpenSIPS's VARCHAR(25)
        {"ha1": "a" * 65},
        {"password": "a\x00b"},
    ],
)
async def test_credentials_that_do_not_fit_the_columns_are_refused(
    store: Store, realm: str, kwargs: dict[str, str]
) -> None:
    with pytest.raises(InvalidRecord):
        await store.set_subscriber("alice", realm, **kwargs)
    assert await store.get_subscriber("alice", realm) is None


async def test_nonce_counts_must_increase(store: Store) -> None:
    nonce = unique("n")
    assert await store.use_nonce(nonce, 1, expires=100)
    assert not await store.use_nonce(nonce, 1, expires=100)
    assert await store.use_nonce(nonce, 3, expires=100)
    assert not await store.use_nonce(nonce, 2, expires=100)
    assert await store.use_nonce(unique("other"), 1, expires=100)


async def test_concurrent_uses_of_one_count_from_several_processes_accept_exactly_one(
    make_store: StoreFactory,
) -> None:
    stores = [await make_store() for _ in range(3)]
    await stores[0].create_schema()
    for round_ in range(10):
        nonce = unique(f"race-{round_}")
        results = await asyncio.gather(
            *(s.use_nonce(nonce, 1, expires=100) for s in stores for _ in range(3))
        )
        assert results.count(True) == 1, results


async def test_expired_nonce_counts_are_deleted(store: Store) -> None:
    # Far-future expiry times: on PostgreSQL other tests' rows share the table.
    old, new = unique("old"), unique("new")
    await store.use_nonce(old, 1, expires=9_000_001_000)
    await store.use_nonce(new, 1, expires=9_000_002_000)
    await store.delete_expired_nonces(9_000_000_999)
    assert not await store.use_nonce(old, 1, expires=9_000_001_000)  # kept
    assert await store.delete_expired_nonces(9_000_001_000) >= 1
    assert await store.use_nonce(old, 1, expires=9_000_001_000)  # forgotten
    assert not await store.use_nonce(new, 1, expires=9_000_002_000)  # kept


async def test_the_nonce_table_is_created_once_and_upgrade_stays_idempotent(
    make_store: StoreFactory,
) -> None:
    s = await make_store()
    await s.create_schema()
    assert await s.upgrade_schema() == []
    await s.create_schema()  # a second worker starting
    assert await s.upgrade_schema() == []
    assert await s.use_nonce(unique("created"), 1, expires=1)


async def test_a_bad_nonce_record_is_refused_before_the_database(store: Store) -> None:
    with pytest.raises(InvalidRecord):
        await store.use_nonce("", 1, expires=1)
    with pytest.raises(InvalidRecord):
        await store.use_nonce("n" * 200, 1, expires=1)
    with pytest.raises(InvalidRecord):
        await store.use_nonce("n", 2**32, expires=1)


def test_the_nonce_table_name_is_ours() -> None:
    assert NONCE_TABLE.startswith("msilo_")
