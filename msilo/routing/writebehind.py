"""``registrar.write_behind``: a refresh that changes nothing but the expiry, answered from
a read and written later (what Kamailio's usrloc ``db_mode 2`` does).

A device refreshes its binding every few minutes with the same Call-ID, a higher CSeq and
the same contact (RFC 3261 §10.3); a registrar sees that more than anything else.  Written
through, each one is a transaction: the user's lock, the row rewritten, a WAL flush.  With
``write_behind`` seconds the worker reads the user's bindings and the "anything stored?"
probe instead (one read-only query, shared by concurrent refreshes), answers 200 from
them, and writes the new expiry with the others of the last ``write_behind`` seconds in
one transaction.

What it trades: a crash (not a graceful stop, which writes them) forgets the refreshes of
the last ``write_behind`` seconds; those bindings then expire at their previous expiry,
earlier than the device was told, and a message for them is stored until the device
registers again.  No message is lost.  The database stays the truth for every worker and
host: the read sees what any of them wrote, the deferred write lands only where the
binding is still the one refreshed (same contact and Call-ID, lower CSeq), and a refresh
is deferred only while its stored expiry outlives the next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

from msilo.errors import StorageError
from msilo.storage.base import Store
from msilo.storage.location import Binding, RegisterOutcome, live_bindings

log = logging.getLogger("msilo.registrar")

# Deferred refreshes written per transaction (each holds its users' locks).
FLUSH_CHUNK = 500


def _same_but_expiry(stored: Binding, new: Binding) -> bool:
    return (
        stored.callid == new.callid
        and stored.cseq < new.cseq
        and stored.received == new.received
        and stored.path == new.path
        and stored.q == new.q
        and stored.methods == new.methods
        and stored.instance == new.instance
        and stored.transport == new.transport
    )


class RefreshWriteBehind:
    """One worker's deferred refreshes: ``register`` in place of
    ``Store.register_contact``; ``start`` the writer, ``aclose`` writes what is left."""

    def __init__(
        self, store: Store, window: float, *, count: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.window = window
        self._count = count or (lambda _name: None)
        self._queue: dict[tuple[str, str, str], tuple[Binding, str | None]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Refreshes answered and not yet written."""
        return len(self._queue)

    async def register(
        self, binding: Binding, *, now: int, device: str | None, max_contacts: int = 0
    ) -> RegisterOutcome | None:
        """As ``Store.register_contact``; a pure refresh of a live binding is deferred."""
        key = (binding.username, binding.domain, binding.contact)
        # A refresh has a CSeq above the stored one, so never 1: a device's first REGISTER
        # of a Call-ID (CSeq 1 in practice) is written at once, without a read for nothing.
        # Any worker may get any refresh (UDP is spread by content), so nothing this worker
        # remembers could say more.
        if binding.cseq > 1:
            outcome = await self._deferred(key, binding, now=now, device=device)
            if outcome is not None:
                return outcome
        outcome = await self.store.register_contact(
            binding, now=now, device=device, max_contacts=max_contacts
        )
        if outcome is not None:
            self._queue.pop(key, None)  # written through: a queued older one would not land
        return outcome

    async def _deferred(
        self, key: tuple[str, str, str], binding: Binding, *, now: int, device: str | None
    ) -> RegisterOutcome | None:
        state = await self.store.registration_state(binding.username, binding.domain, now=now)
        if state is None:
            return None
        bindings, pending = state
        stored = next((b for b in bindings if b.contact == binding.contact), None)
        if (
            stored is None
            or not _same_but_expiry(stored, binding)
            or binding.expires < stored.expires
            # The stored expiry must outlive the write: until then it is what others see.
            or stored.expires <= now + self.window + 1
        ):
            return None
        self._queue[key] = (binding, device)
        self._count("refreshes_deferred")
        others = [b for b in bindings if b.contact != binding.contact]
        return RegisterOutcome(bindings=live_bindings([*others, binding], now), pending=pending)

    def start(self) -> None:
        """Start writing deferred refreshes every ``window`` seconds."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.window)
            try:
                await self.flush()
            except Exception:  # the timer must outlive any one write's surprise
                log.exception("event=refresh_write_failed refreshes=%d", self.pending)

    async def flush(self) -> int:
        """Write every deferred refresh now; bindings updated.  A failed write keeps its
        refreshes for the next try (unless a newer one for the binding came meanwhile)."""
        written = 0
        while self._queue:
            keys = list(itertools.islice(self._queue, FLUSH_CHUNK))
            chunk = {key: self._queue.pop(key) for key in keys}
            try:
                written += await self.store.refresh_bindings(list(chunk.values()))
            except StorageError as exc:
                for key, value in chunk.items():
                    self._queue.setdefault(key, value)
                log.error("event=refresh_write_failed refreshes=%d error=%s", len(self._queue), exc)
                break
        return written

    async def aclose(self) -> None:
        """Stop the timer and write what is left (a graceful stop forgets nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = self.pending
        await self.flush()
        if self.pending:
            log.error("event=refreshes_lost refreshes=%d of %d", self.pending, left)
