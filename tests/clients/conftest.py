"""Fixtures: a real ``msilo serve`` (registrar mode, two workers) and real SIP clients.

The server is the one tests/server runs (its ``Instance``), on SQLite, MariaDB and
PostgreSQL (the ``db_url`` parametrisation of tests/service). Clients are started by
the ``clients`` factory, each in its own directory under the test's tmp path, and
killed at teardown whatever happened.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.clients.lab import Clients
from tests.server.conftest import Instance
from tests.service.conftest import db_url  # noqa: F401  (the backends' parametrisation)


@pytest.fixture
def msilo_overrides() -> tuple[str, ...]:
    """Extra ``--set`` settings for ``msilo``; a test module overrides this fixture."""
    return ()


@pytest.fixture
async def msilo(
    db_url: str,  # noqa: F811
    tmp_path: Path,
    msilo_overrides: tuple[str, ...],
) -> AsyncIterator[Instance]:
    """``msilo serve``: registrar mode, two workers, on the parametrised database."""
    settings = ("server.workers=2", 'server.mode="registrar"', *msilo_overrides)
    instance = Instance(tmp_path, "msilo", db_url, settings)
    try:
        await instance.wait_ready(workers=2)
        yield instance
    finally:
        instance.kill_all()


@pytest.fixture
async def clients(msilo: Instance, tmp_path: Path) -> AsyncIterator[Clients]:
    """A factory of real SIP clients registered with ``msilo``."""
    # The Makefile's test-deps target installs them; missing is a failure, never a skip.
    for tool in ("baresip", "linphonec", "stdbuf"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed: make test-deps (Debian: baresip-core linphone-cli)"
            )
    factory = Clients(msilo, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()
