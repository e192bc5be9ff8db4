"""A multi-host db_url whose hosts are all standbys for the moment (a failover or a
switchover under way): every call fails fast as "unavailable", after one connection
attempt (two for a call safe to retry), instead of opening a pool's worth."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import pytest

from msilo.errors import DatabaseUnavailable
from msilo.storage.postgres import PostgresStore


class CountingProxy:
    """TCP relay to the real server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize(("call", "attempts"), [("count", 2), ("purge", 2)])
async def test_no_primary_among_the_hosts_is_unavailable_after_few_attempts(
    pg_dsn: str, call: str, attempts: int
) -> None:
    parts = urlsplit(pg_dsn)
    proxy = CountingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    # The shared server is a primary: "standby" makes it the wrong kind, as a standby is
    # for read-write during a failover.
    url = f"postgres://{parts.username}@127.0.0.1:{port},127.0.0.1:{port}{parts.path}"
    store = PostgresStore(f"{url}?target_session_attrs=standby", min_size=0, max_size=8)
    await store.open()
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            await getattr(store, call)("alice", "example.com")
    finally:
        await store.close()
        await proxy.close()
    assert f"127.0.0.1:{port},127.0.0.1:{port}/" in str(caught.value)
    # Two hosts per attempt (both tried, neither matches); at most ``attempts`` attempts.
    assert proxy.connections <= 2 * attempts, proxy.connections
