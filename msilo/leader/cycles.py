"""The timer cycles the leader runs: lease recovery, expiry, reminders (§7, D6, D10).

Every cycle is idempotent (a brief overlap of two leaders is harmless) and each
run is independent: an error is logged once and the next run tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from msilo.errors import ParseError, StorageError
from msilo.routing.delivery import Deliverer, Hop
from msilo.routing.notify import ExpirySettings, expiry_notice, send_notification
from msilo.sip.parser import parse_uri
from msilo.storage.base import Store, StoredMessage
from msilo.storage.location import Binding
from msilo.transport.base import Target

log = logging.getLogger("msilo.leader")

Lookup = Callable[[str, str], Awaitable[list[Binding]]]
HopFor = Callable[[Binding], Hop]

# Expired rows taken (and their senders told) per round trip when expiry notices are on.
EXPIRY_BATCH = 500
# Otherwise expired rows go ``Store.expiry_batch`` per statement, with this pause between
# two statements: a cycle that finds 200,000 expired rows runs a hundred (PostgreSQL) short
# deletes, and the stores' group commits go through between them instead of waiting behind
# one long one.
EXPIRY_PAUSE = 0.005


async def delete_expired_in_batches(
    store: Store,
    now: int,
    *,
    batch: int | None = None,
    pause: float = EXPIRY_PAUSE,
    count: Callable[[int], None] | None = None,
) -> int:
    """Delete every row with ``exp_time <= now``, ``batch`` (default: the store's
    ``expiry_batch``) rows per statement, sleeping ``pause`` seconds between statements;
    returns how many rows went.

    ``count`` hears of each batch as it commits, so a later batch's failure does not hide
    the rows already gone.
    """
    batch = store.expiry_batch if batch is None else batch
    deleted = 0
    while True:
        n = await store.delete_expired(now, batch)
        deleted += n
        if n and count is not None:
            count(n)
        if n < batch:
            return deleted
        await asyncio.sleep(pause)


@dataclass(frozen=True, slots=True)
class CycleSettings:
    """Periods from ``[msilo]`` (seconds) and what reminders need."""

    check_time: int = 30
    clean_period: int = 5
    send_time: int = 0
    reminder: str | None = None
    mode: str = "registrar"
    reminder_batch: int = 100

    @property
    def reminders_on(self) -> bool:
        """Reminders run only with a period and a From address (§2.4 step 8)."""
        return self.send_time > 0 and self.reminder is not None


class TimerCycles:
    """Runs the cycles while this process is the leader."""

    def __init__(
        self,
        store: Store,
        deliverer: Deliverer,
        settings: CycleSettings,
        *,
        count: Callable[[str, int], None],
        lookup: Lookup,
        hop_for: HopFor,
        purge_bindings: Callable[[int], Awaitable[int]] | None = None,
        expiry: ExpirySettings | None = None,
    ) -> None:
        self.store = store
        self.deliverer = deliverer
        self.settings = settings
        self._count = count
        self._lookup = lookup
        self._hop_for = hop_for
        self._purge_bindings = purge_bindings
        self._expiry = expiry  # tell senders about messages that expired undelivered
        self._cycle = 0

    async def run(self) -> None:
        """Run every cycle until cancelled (the leader cancels it when it loses the lock)."""
        loops = [self._every(self.settings.check_time, self.clean_once)]
        if self.settings.reminders_on:
            loops.append(self._every(self.settings.send_time, self.reminders_once))
        await asyncio.gather(*loops)

    async def _every(self, period: int, job: Callable[[], Awaitable[object]]) -> None:
        # The first run is one period after election, as the reference's timers do.
        while True:
            await asyncio.sleep(period)
            started = time.monotonic()
            try:
                await job()
            except StorageError as exc:
                log.error("event=cycle_failed job=%s error=%s", job.__name__, exc)
            elapsed = time.monotonic() - started
            if elapsed > period:
                log.warning("event=cycle_slow job=%s seconds=%.1f", job.__name__, elapsed)

    async def clean_once(self) -> None:
        """Recover expired delivery leases; every ``clean_period`` runs, delete expired rows."""
        now = int(time.time())
        self._cycle += 1
        recovered = await self.store.recover_expired_leases(now)
        if recovered:
            self._count("leases_recovered", recovered)
            log.info("event=leases_recovered count=%d", recovered)
        if self._cycle % self.settings.clean_period == 0:
            await self.expire_once(now)

    async def expire_once(self, now: int | None = None) -> int:
        """Delete the messages whose lifetime is over (and stale bindings and nonces)."""
        now = int(time.time()) if now is None else now
        if self._expiry is None:
            expired = await delete_expired_in_batches(
                self.store, now, count=lambda n: self._count("expired_messages", n)
            )
        else:
            expired = await self._expire_and_tell(now, self._expiry)
        if expired:
            log.info("event=expired count=%d", expired)
        if self._purge_bindings is not None:
            await self._purge_bindings(now)
        # Digest nonce-counts of nonces that can no longer be used (D14).
        await self.store.delete_expired_nonces(now)
        # Devices not heard of for device_memory, and ledger rows of messages now gone.
        forgotten = await self.store.forget_old_devices(now - self.deliverer.settings.device_memory)
        if forgotten:
            log.info("event=devices_forgotten count=%d", forgotten)
        await self.store.delete_expired_auth_failures(now)
        return expired

    async def _expire_and_tell(self, now: int, settings: ExpirySettings) -> int:
        """Take expired rows a batch at a time and tell each sender; rows taken."""
        taken = 0
        while True:
            rows = await self.store.take_expired(now, EXPIRY_BATCH)
            taken += len(rows)
            if rows:  # counted per batch: a later batch's failure does not hide these
                self._count("expired_messages", len(rows))
            for row in rows:
                self._tell_sender(row, settings)
            if len(rows) < EXPIRY_BATCH:
                return taken

    def _tell_sender(self, row: StoredMessage, settings: ExpirySettings) -> None:
        note = expiry_notice(row, settings)
        if note is None:
            return
        outbound = self.deliverer.settings.outbound_proxy
        if send_notification(self.deliverer.requester, note, outbound):
            self._count("expiry_notices_sent", 1)
            log.info("event=expiry_notice mid=%d to=%s", row.mid, note.uri)

    async def reminders_once(self) -> int:
        """Send the due reminders, each row on its own (D10, §10 Q11); returns how many."""
        settings = self.settings
        assert settings.reminder is not None
        rows = await self.store.claim_due_reminders(
            now=int(time.time()),
            lease_owner=self.deliverer.lease_owner,
            lease_seconds=self.deliverer.settings.lease_seconds,
            limit=settings.reminder_batch,
        )
        for row in rows:
            try:
                await self._remind(row, settings.reminder)
            except (StorageError, ParseError, OSError) as exc:
                log.error("event=reminder_error mid=%d error=%s", row.mid, exc)
        return len(rows)

    async def _remind(self, row: StoredMessage, reminder: str) -> None:
        aor_uri = f"sip:{row.username}@{row.domain}"
        targets: list[tuple[str, Hop]] = []
        if self.settings.mode == "registrar":
            for binding in await self._lookup(row.username, row.domain):
                targets.append((binding.contact, self._hop_for(binding)))
        else:
            targets.append((aor_uri, Hop(Target.from_uri(parse_uri(aor_uri)))))
        delivered = False
        if targets:
            results = await asyncio.gather(
                *(
                    self.deliverer.send_row(
                        row,
                        uri,
                        hop.target,
                        reminder=True,
                        from_=reminder,
                        to=aor_uri,
                        route=hop.route,
                    )
                    for uri, hop in targets
                )
            )
            delivered = any(r.success for r in results)
        if delivered:
            await self.store.delete_delivered([row.mid])
            self._count("dumped_reminders", 1)
            log.info("event=reminder_sent mid=%d aor=%s@%s", row.mid, row.username, row.domain)
        else:
            # D10: a failed reminder becomes an ordinary offline message.
            await self.store.reset_reminder([row.mid])
            self._count("failed_reminders", 1)
            log.info(
                "event=reminder_failed mid=%d aor=%s@%s contacts=%d",
                row.mid,
                row.username,
                row.domain,
                len(targets),
            )
