"""Fixtures: the fake push services of tests/push/fakes.py, running, one per test.

tests/push/conftest.py imports them; another test package does the same in its conftest.py
(``from tests.push.fixtures import fake_fcm, push_clock, push_tls  # noqa: F401``), or uses the
context managers (``async with FakeFcm.running(tls) as fcm:``) directly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.push.fakes import Clock, FakeApns, FakeFcm, FakeWebhook, TlsFiles, make_tls


@pytest.fixture(scope="session")
def push_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA and a certificate for 127.0.0.1, shared by every fake of the session."""
    return make_tls(tmp_path_factory.mktemp("push-tls"))


@pytest.fixture
def push_clock() -> Clock:
    """A clock the test can move forward, shared by a provider and its fake."""
    return Clock()


@pytest.fixture
async def fake_fcm(push_tls: TlsFiles, push_clock: Clock) -> AsyncIterator[FakeFcm]:
    """A running fake FCM (token endpoint + messages:send), HTTP/2 over TLS."""
    async with FakeFcm.running(push_tls, clock=push_clock) as fake:
        yield fake


@pytest.fixture
async def fake_apns(push_tls: TlsFiles, push_clock: Clock) -> AsyncIterator[FakeApns]:
    """A running fake APNs, HTTP/2 over TLS."""
    async with FakeApns.running(push_tls, clock=push_clock) as fake:
        yield fake


@pytest.fixture
async def fake_webhook(push_clock: Clock) -> AsyncIterator[FakeWebhook]:
    """A running webhook receiver, plain HTTP/1.1."""
    async with FakeWebhook.running(None, clock=push_clock) as fake:
        yield fake


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """Where a test writes its service-account and .p8 keys."""
    path = tmp_path / "keys"
    path.mkdir()
    return path
