"""Liveness of child processes: a heartbeat stamped from each child's own event loop.

A thread answering pings would keep answering while the event loop is stuck in a
blocking call; a stamp written by a task *on* the loop stops the moment the loop
stops turning.  The stamps live in named shared memory (one cell pair per slot):
the supervisor reads them without any message passing.  Times are
``time.monotonic()``, which is one system-wide clock on Linux, so a parent and its
children compare them directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from multiprocessing import shared_memory

log = logging.getLogger("msilo.supervisor")

_WIDTH = 2  # per slot: last beat (monotonic seconds), flags
FLAG_LEADER = 1.0


class Heartbeats:
    """One heartbeat cell per child slot; the supervisor creates, children attach by name."""

    def __init__(self, slots: int, *, name: str | None = None) -> None:
        self.slots = slots
        size = slots * _WIDTH * 8
        if name is None:
            self._shm = shared_memory.SharedMemory(create=True, size=size)
        else:
            self._shm = shared_memory.SharedMemory(name=name)
        buf = self._shm.buf
        assert buf is not None
        if name is None:
            buf[:size] = bytes(size)
        self._owner = name is None
        self._cells = buf[:size].cast("d")

    @property
    def name(self) -> str:
        """The shared-memory name children attach to."""
        return self._shm.name

    def beat(self, slot: int, *, leader: bool = False) -> None:
        """Stamp ``slot`` as alive now (called by the child, from its event loop)."""
        base = slot * _WIDTH
        self._cells[base + 1] = FLAG_LEADER if leader else 0.0
        self._cells[base] = time.monotonic()

    def reset(self, slot: int) -> None:
        """Start a new child's clock in ``slot``: booting counts as alive until the timeout."""
        base = slot * _WIDTH
        self._cells[base + 1] = 0.0
        self._cells[base] = time.monotonic()

    def age(self, slot: int) -> float:
        """Seconds since the last beat in ``slot``."""
        return time.monotonic() - self._cells[slot * _WIDTH]

    def is_leader(self, slot: int) -> bool:
        """What the child in ``slot`` last said about holding the leader lock."""
        return self._cells[slot * _WIDTH + 1] == FLAG_LEADER

    def close(self) -> None:
        """Detach (and, for the creator, free) the shared memory."""
        self._cells.release()
        self._shm.close()
        if self._owner:
            self._shm.unlink()


async def keep_beating(
    beats: Heartbeats,
    slot: int,
    *,
    parent_pid: int,
    on_orphan: Callable[[], None],
    interval: float,
    is_leader: Callable[[], bool] = lambda: False,
) -> None:
    """Beat every ``interval`` s until cancelled; call ``on_orphan`` once if the parent dies.

    A child whose supervisor disappeared (SIGKILL, crash) is re-parented; without this
    check it would keep its sockets and serve unsupervised forever.
    """
    orphaned = False
    while True:
        beats.beat(slot, leader=is_leader())
        if not orphaned and os.getppid() != parent_pid:
            orphaned = True
            log.warning("event=orphaned parent_pid=%d action=stop", parent_pid)
            on_orphan()
        await asyncio.sleep(interval)
