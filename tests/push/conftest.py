"""Fixtures: the fake push services of tests/push/fakes.py, running, one per test.

Other test packages use them by importing the fixtures (``from tests.push.conftest import
fake_fcm, push_tls``) or the context managers (``FakeFcm.running(tls)``) directly."""

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
def clock() -> Clock:
    """A clock the test can move forward, shared by a provider and its fake."""
    return Clock()


@pytest.fixture
async def fake_fcm(push_tls: TlsFiles, clock: Clock) -> AsyncIterator[FakeFcm]:
    """A running fake FCM (token endpoint + messages:send), HTTP/2 over TLS."""
    async with FakeFcm.running(push_tls, clock=clock) as fake:
        yield fake


@pytest.fixture
async def fake_apns(push_tls: TlsFiles, clock: Clock) -> AsyncIterator[FakeApns]:
    """A running fake APNs, HTTP/2 over TLS."""
    async with FakeApns.running(push_tls, clock=clock) as fake:
        yield fake


@pytest.fixture
async def fake_webhook(clock: Clock) -> AsyncIterator[FakeWebhook]:
    """A running webhook receiver, plain HTTP/1.1."""
    async with FakeWebhook.running(None, clock=clock) as fake:
        yield fake


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """Where a test writes its service-account and .p8 keys."""
    path = tmp_path / "keys"
    path.mkdir()
    return path
