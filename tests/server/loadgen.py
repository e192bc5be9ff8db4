"""Load for the supervisor tests: many UAs (many source ports) that retransmit like real ones.

A MESSAGE is resent on RFC 3261 Timer E (T1 = 500 ms, doubling, capped at T2 = 4 s)
until a final response arrives or ``give_up`` seconds have passed, so a request
lost in the socket buffer of a worker that went away is answered by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from msilo.sip.message import SipResponse
from tests.service.sipua import UserAgent

T1 = 0.5
T2 = 4.0


class RetransmittingUA(UserAgent):
    """A :class:`UserAgent` whose requests are retransmitted until answered."""

    async def send_reliably(self, data: bytes, branch: str, give_up: float) -> SipResponse | None:
        """Send, resend on Timer E, return the final response (None if never answered)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SipResponse] = loop.create_future()
        self._responses[branch] = future
        deadline = loop.time() + give_up
        interval = T1
        try:
            while True:
                self.send_raw(data)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), min(interval, remaining))
                interval = min(interval * 2, T2)
        finally:
            self._responses.pop(branch, None)


@dataclass
class LoadResult:
    """What each numbered MESSAGE got: its final status, or None."""

    statuses: dict[int, int | None] = field(default_factory=dict)

    def with_status(self, status: int) -> set[int]:
        return {n for n, s in self.statuses.items() if s == status}

    @property
    def unanswered(self) -> set[int]:
        return {n for n, s in self.statuses.items() if s is None}


async def start_agents(server: tuple[str, int], count: int) -> list[RetransmittingUA]:
    """``count`` UAs, each on its own ephemeral port."""
    return [
        await RetransmittingUA(server, user=f"load{i}", domain="127.0.0.1").start()
        for i in range(count)
    ]


def body_for(tag: str, n: int) -> str:
    return f"load {tag} #{n}#"


async def send_load(
    agents: list[RetransmittingUA],
    *,
    tag: str,
    count: int,
    rate: float,
    to: str | Callable[[int], str] = "sip:offline@127.0.0.1",
    give_up: float = 8.0,
) -> LoadResult:
    """Send ``count`` MESSAGEs at ``rate`` per second, round-robin over ``agents``."""
    result = LoadResult()

    async def one(n: int) -> None:
        ua = agents[n % len(agents)]
        uri = to(n) if callable(to) else to
        data, branch = ua.build("MESSAGE", uri, body=body_for(tag, n).encode())
        reply = await ua.send_reliably(data, branch, give_up)
        result.statuses[n] = reply.status if reply is not None else None

    tasks = []
    started = time.monotonic()
    for n in range(count):
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n)))
    await asyncio.gather(*tasks)
    return result
