"""Read coalescing: concurrent single-key reads answered by one multi-key query.

Every MESSAGE in registrar mode asks "where is this user?" before it is stored or
relayed.  One query per message costs a pooled connection, a round trip and the
driver's per-query overhead; under load many of those questions are in flight at
once.  The coalescer works like the batch writer: when no query is running the key
is read at once (no added latency when idle); while one runs, keys queue up and all
of them go in the next query as soon as it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """``get(key)`` answered by ``fetch_many(keys)`` for every key waiting at the time.

    ``fetch_many`` returns a value for the keys it found; the others get ``missing()``.
    A failed query fails exactly the callers whose keys it held; the next one tries again.
    """

    def __init__(
        self,
        fetch_many: Callable[[list[K]], Awaitable[dict[K, V]]],
        missing: Callable[[], V],
        *,
        max_batch: int = 256,
    ) -> None:
        if max_batch <= 0:
            raise ValueError("max_batch is expected to be greater than zero")
        self._fetch_many = fetch_many
        self._missing = missing
        self.max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._task: asyncio.Task[None] | None = None
        #: Statistics: queries run, keys asked in them.
        self.queries = 0
        self.keys = 0

    async def get(self, key: K) -> V:
        """The value for ``key`` from the next query."""
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.get(key)
        if waiters is None:
            self._waiting[key] = [future]
        else:
            waiters.append(future)  # the same key twice in one batch is asked once
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch = self._take()
                if batch:
                    await self._query(batch)
        finally:
            self._task = None

    def _take(self) -> dict[K, list[asyncio.Future[V]]]:
        batch: dict[K, list[asyncio.Future[V]]] = {}
        waiting = self._waiting
        for key in list(waiting)[: self.max_batch]:
            # A caller that gave up (timeout, cancelled) is not asked for.
            live = [f for f in waiting.pop(key) if not f.done()]
            if live:
                batch[key] = live
        return batch

    async def _query(self, batch: dict[K, list[asyncio.Future[V]]]) -> None:
        self.queries += 1
        self.keys += len(batch)
        try:
            found = await self._fetch_many(list(batch))
        except Exception as exc:
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        except BaseException:
            # Cancelled: the loop is going away; nobody must wait forever.
            for futures in batch.values():
                for future in futures:
                    future.cancel()
            raise
        for key, futures in batch.items():
            value = found.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(self._missing() if value is None else value)
