"""The lab a real-client test works in: one msilo and the clients started against it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TypeVar

import asyncpg

from tests.clients.baresip import Baresip
from tests.clients.linphone import Linphonec
from tests.clients.process import ClientProcess
from tests.server.conftest import Instance

C = TypeVar("C", Baresip, Linphonec)


class Clients:
    """Starts baresip and linphonec instances against one msilo; all are killed at the end."""

    def __init__(self, server: Instance, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.started: list[ClientProcess] = []

    def _dir(self, kind: str, user: str) -> Path:
        return self.tmp_path / f"{kind}-{user}-{len(self.started)}"

    async def baresip(
        self,
        user: str,
        *,
        peers: tuple[str, ...] = (),
        instance: str | None = None,
        expires: int = 600,
        register: bool = True,
    ) -> Baresip:
        """A started baresip for ``user``; waits for its registration unless told not to.
        ``instance`` makes it the same device as an earlier one (its +sip.instance)."""
        client = Baresip(
            self._dir("baresip", user),
            user,
            self.server.address,
            peers=peers,
            instance=instance,
            regint=expires,
        )
        return await self._start(client, register)

    async def linphonec(
        self,
        user: str,
        *,
        instance: str | None = None,
        expires: int = 600,
        register: bool = True,
    ) -> Linphonec:
        """A started linphonec for ``user``; waits for its registration unless told not to."""
        client = Linphonec(
            self._dir("linphonec", user),
            user,
            self.server.address,
            instance=instance,
            expires=expires,
        )
        return await self._start(client, register)

    async def _start(self, client: C, register: bool) -> C:
        self.started.append(client)
        await client.start()
        if register:
            await client.wait_registered()
        return client

    async def close(self) -> None:
        for client in self.started:
            await client.close()


async def _count(db_url: str, query: str) -> int:
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            return int(conn.execute(query).fetchone()[0])
    if db_url.startswith("mysql://"):
        from tests.conftest import mysql_script

        return int((await mysql_script(db_url, query))[0][0])
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


async def stored_rows(db_url: str) -> int:
    """How many messages the silo table holds (any backend)."""
    return await _count(db_url, "SELECT count(*) FROM silo")


async def live_bindings(db_url: str, user: str) -> int:
    """How many unexpired bindings ``user`` has in msilo's ``location`` table."""
    assert user.isalnum()  # it goes into the SQL text
    return await _count(
        db_url,
        f"SELECT count(*) FROM location WHERE username = '{user}' AND expires > {int(time.time())}",
    )
