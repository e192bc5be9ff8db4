"""Delivering stored messages: m_dump after a REGISTER, and reminders (D5, D6, D7, D10).

Rows are leased in the database before they are sent, so no row goes out
twice at once from any worker on any host; a 2xx deletes the row at once (the
DELETE runs while the next message goes out; the dump ends when every delete has
settled), any other final response or a timeout releases the lease and counts a failure.
Messages of one user go out one after the other, in arrival order: the next is
sent when the previous has its final response.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from msilo.errors import ParseError, StorageError
from msilo.routing.timefmt import date_prefix, has_date_prefix
from msilo.sip.message import SipURI
from msilo.sip.parser import parse_uri, route_uris
from msilo.storage.base import Store, StoredMessage
from msilo.storage.location import Binding
from msilo.transaction.client import ClientResult
from msilo.transport.base import Target

log = logging.getLogger("msilo.dump")


class Requester(Protocol):
    """What routing needs from the transaction layer: send a MESSAGE, await its outcome."""

    async def send_message(
        self,
        uri: str,
        target: Target,
        *,
        from_: str,
        to: str,
        body: bytes,
        content_type: str | None,
        headers: Sequence[tuple[str, str]] = (),
        date: int | None = None,
        **build: Any,
    ) -> ClientResult:
        """Send a MESSAGE in a new client transaction and return its final outcome."""
        ...

    def start_message(
        self,
        uri: str,
        target: Target,
        *,
        from_: str,
        to: str,
        body: bytes,
        content_type: str | None,
        headers: Sequence[tuple[str, str]] = (),
        date: int | None = None,
        **build: Any,
    ) -> object:
        """Send a MESSAGE in a new client transaction without waiting for it."""
        ...


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How stored messages are delivered."""

    add_date: bool = True
    tz: dt.tzinfo = dt.UTC
    outbound_proxy: Target | None = None
    timer_f: float = 32.0
    chunk: int = 16  # rows claimed per round trip (a typical mailbox in one claim)
    deliver_to: str = "all"  # "all": every device once (the ledger); "first": OpenSIPS
    device_memory: int = 2592000  # seconds a device is remembered after its REGISTER

    @property
    def lease_seconds(self) -> int:
        # Longer than every send of a chunk could take (each ends by Timer F), D6.
        return int(self.chunk * self.timer_f) + 10

    @property
    def per_device(self) -> bool:
        """True when each device gets each message (``deliver_to = "all"``)."""
        return self.deliver_to == "all"


_last_cseq = 0


def next_cseq() -> int:
    """A CSeq for one delivery attempt: rising with time (tenths of a second) and within
    the process, so the attempts of a message, which share its Call-ID, never repeat one
    (RFC 3261 §8.2.2.2: a device would answer a repeat 482 Loop Detected)."""
    global _last_cseq
    _last_cseq = max(_last_cseq + 1, int(time.time() * 10) % 2**31)
    return _last_cseq


def delivery_call_id(row: StoredMessage) -> str:
    """The Call-ID every delivery of ``row`` carries: the one it arrived with (stored
    with it), or for a row written without one (an OpenSIPS row) one made from its id --
    stable across attempts either way, so a device that already showed it drops a repeat."""
    return row.callid or f"msilo-{row.mid}-{row.inc_time}"


def is_text_plain(ctype: str | None) -> bool:
    """True when the stored Content-Type is text/plain, parameters allowed (§10 Q6)."""
    if not ctype:
        return False
    return ctype.split(";", 1)[0].strip().lower() == "text/plain"


def delivery_body(row: StoredMessage, settings: DeliverySettings, *, reminder: bool) -> bytes:
    """The body as delivered: with the date prefix for text/plain when ``add_date`` (D7)."""
    body = row.body
    if not settings.add_date or not is_text_plain(row.ctype) or has_date_prefix(body):
        return body
    when = row.snd_time if reminder else row.inc_time
    return date_prefix(when, settings.tz, reminder=reminder) + body


@dataclass(slots=True)
class DumpReport:
    """What one dump did."""

    delivered: int = 0
    failed: int = 0
    released: int = 0  # claimed but not attempted (the contact stopped answering)


class Deliverer:
    """Sends stored rows and settles them in the database."""

    def __init__(
        self,
        store: Store,
        requester: Requester,
        settings: DeliverySettings,
        *,
        lease_owner: str,
        count: Callable[[str], None],
    ) -> None:
        self.store = store
        self.requester = requester
        self.settings = settings
        self.lease_owner = lease_owner
        self._count = count

    def next_hop(self, contact_target: Target) -> Target:
        """``outbound_proxy`` when set, else the given target."""
        return self.settings.outbound_proxy or contact_target

    async def send_row(
        self,
        row: StoredMessage,
        uri: str,
        target: Target,
        *,
        reminder: bool = False,
        from_: str | None = None,
        to: str | None = None,
        route: Sequence[str] = (),
    ) -> ClientResult:
        """Send one stored row to ``uri`` via ``target`` and return the final outcome.

        ``route`` is the contact's Route set (its registered Path, RFC 3327).
        """
        return await self.requester.send_message(
            uri,
            self.next_hop(target),
            route=tuple(route),
            from_=from_ or row.src_addr,
            to=to or row.dst_addr,
            body=delivery_body(row, self.settings, reminder=reminder),
            content_type=row.ctype or None,
            # The Date header carries the arrival time (D7); reminders have none (§7.2).
            date=None if reminder else row.inc_time,
            call_id=delivery_call_id(row),
            cseq=next_cseq(),
        )

    async def dump(
        self,
        username: str,
        domain: str,
        uri: str,
        target: Target,
        *,
        limit: int | None = None,
        route: Sequence[str] = (),
        device: str | None = None,
    ) -> DumpReport:
        """Deliver the user's stored messages to the contact ``uri`` (D5, D6).

        ``route`` is the contact's Route set (the REGISTER's Path, RFC 3327).  With
        ``device`` (and ``deliver_to = "all"``) the rows that device has not had are leased
        for it alone and a 2xx settles the row for it (the row goes when every due device
        has it); without, a 2xx deletes the row (the OpenSIPS behaviour).
        """
        leases: _Leases = (
            _DeviceLeases(self, username, domain, device)
            if device is not None and self.settings.per_device
            else _RowLeases(self, username, domain)
        )
        report = DumpReport()
        remaining = limit
        try:
            while remaining is None or remaining > 0:
                size = (
                    self.settings.chunk
                    if remaining is None
                    else min(self.settings.chunk, remaining)
                )
                rows = await leases.claim(size)
                if not rows:
                    break
                if remaining is not None:
                    remaining -= len(rows)
                stopped = await self._send_rows(
                    rows, Hop(target, tuple(route)), uri, report, leases
                )
                if stopped or len(rows) < size:
                    break
        except StorageError as exc:
            # Leases run out by themselves and the leader recovers them (D6).
            log.error("event=dump_aborted aor=%s@%s error=%s", username, domain, exc)
        finally:
            await leases.finish()
        return report

    async def _send_rows(
        self,
        rows: list[StoredMessage],
        hop: Hop,
        uri: str,
        report: DumpReport,
        leases: _Leases,
    ) -> bool:
        for index, row in enumerate(rows):
            result = await self.send_row(row, uri, hop.target, route=hop.route)
            if result.success:
                leases.delivered(row)
                report.delivered += 1
                self._count("dumped_messages")
                log.info(
                    "event=dumped mid=%d aor=%s@%s status=%d%s",
                    row.mid,
                    row.username,
                    row.domain,
                    result.status,
                    leases.describe(),
                )
                continue
            report.failed += 1
            leases.failed(row)
            self._count("failed_messages")
            log.info(
                "event=dump_failed mid=%d aor=%s@%s status=%d reason=%r%s",
                row.mid,
                row.username,
                row.domain,
                result.status,
                result.reason,
                leases.describe(),
            )
            if result.local:
                # Timeout or transport error: the contact is not answering; keep the
                # rest for the next REGISTER instead of waiting Timer F for each.
                rest = rows[index + 1 :]
                if rest:
                    report.released += len(rest)
                    await leases.release(rest)
                return True
        return False

    async def _settle(self, pending: list[asyncio.Future[int]]) -> None:
        """Wait for the writes of delivered rows; a failed one leaves its row leased."""
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                # The lease runs out and the row is offered again: the device may see it
                # twice (same Call-ID: it can drop the repeat), but it is not lost.
                log.error("event=delete_failed error=%s", outcome)

    async def _release(self, mids: list[int], *, failed: bool) -> None:
        try:
            await self.store.release_lease(mids, failed=failed)
        except StorageError as exc:
            log.error("event=lease_release_failed mids=%s error=%s", mids, exc)


class _Leases:
    """How a dump leases rows and settles them: per row or per (row, device)."""

    def __init__(self, deliverer: Deliverer, username: str, domain: str) -> None:
        self.deliverer = deliverer
        self.store = deliverer.store
        self.username = username
        self.domain = domain
        self.kept: list[StoredMessage] = []  # failed: leased until the dump ends
        self.pending: list[asyncio.Future[int]] = []  # settling writes still in flight

    async def claim(self, size: int) -> list[StoredMessage]:
        raise NotImplementedError

    def delivered(self, row: StoredMessage) -> None:
        raise NotImplementedError

    def failed(self, row: StoredMessage) -> None:
        self.kept.append(row)

    async def release(self, rows: list[StoredMessage], *, failed: bool = False) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    async def finish(self) -> None:
        if self.pending:
            await self.deliverer._settle(self.pending)
        if self.kept:
            await self.release(self.kept, failed=True)


class _RowLeases(_Leases):
    """``deliver_to = "first"``: the row is leased; a 2xx deletes it for everyone."""

    async def claim(self, size: int) -> list[StoredMessage]:
        settings = self.deliverer.settings
        return await self.store.claim_for_dump(
            self.username,
            self.domain,
            lease_owner=self.deliverer.lease_owner,
            lease_seconds=settings.lease_seconds,
            now=int(time.time()),
            limit=size,
        )

    def delivered(self, row: StoredMessage) -> None:
        # Concurrent dumps' deletes share one DELETE (the store coalesces them).
        self.pending.append(asyncio.ensure_future(self.store.delete_delivered([row.mid])))

    async def release(self, rows: list[StoredMessage], *, failed: bool = False) -> None:
        await self.deliverer._release([r.mid for r in rows], failed=failed)


class _DeviceLeases(_Leases):
    """``deliver_to = "all"``: the (row, device) pair is leased; a 2xx settles it for
    this device, and the row goes when no due device lacks it."""

    def __init__(self, deliverer: Deliverer, username: str, domain: str, device: str) -> None:
        super().__init__(deliverer, username, domain)
        self.device = device

    async def claim(self, size: int) -> list[StoredMessage]:
        settings = self.deliverer.settings
        claimed = await self.store.claim_for_device(
            self.username,
            self.domain,
            self.device,
            lease_owner=self.deliverer.lease_owner,
            lease_seconds=settings.lease_seconds,
            now=int(time.time()),
            limit=size,
        )
        for _, first in claimed:
            if first:
                self.deliverer._count("devices_due")
        return [row for row, _ in claimed]

    def delivered(self, row: StoredMessage) -> None:
        memory = self.deliverer.settings.device_memory
        self.pending.append(
            asyncio.ensure_future(
                self.store.settle_delivered([(row.mid, self.device)], memory=memory)
            )
        )

    async def release(self, rows: list[StoredMessage], *, failed: bool = False) -> None:
        try:
            await self.store.release_device_leases(
                [(r.mid, self.device) for r in rows], failed=failed
            )
        except StorageError as exc:
            log.error(
                "event=lease_release_failed mids=%s device=%s error=%s",
                [r.mid for r in rows],
                self.device,
                exc,
            )

    def describe(self) -> str:
        return f" device={self.device}"


class Hop(NamedTuple):
    """How a request reaches a contact: the next hop and the Route set it carries."""

    target: Target
    route: tuple[str, ...] = ()


def path_route(path: str | Sequence[str] | None) -> tuple[str, ...]:
    """The Route set a Path gives (RFC 3327 §5.3), topmost first; () for none.

    A Path that does not parse (a row written by another registrar) is logged and
    ignored: the contact may still be reachable directly, and a delivery must not fail
    on it.
    """
    if not path:
        return ()
    try:
        return tuple(route_uris([path] if isinstance(path, str) else path))
    except ParseError as exc:
        log.warning("event=bad_path path=%r error=%s", path, exc)
        return ()


def route_hop(route: Sequence[str], fallback: Target) -> Hop:
    """The hop for a contact behind ``route``: its first URI (loose routing), else ``fallback``.

    With a Path the edge proxy that added it reaches the device (and handles its NAT), so
    the request goes there and not to the contact or the address the REGISTER came from.
    """
    if not route:
        return Hop(fallback)
    try:
        return Hop(Target.from_uri(parse_uri(route[0])), tuple(route))
    except ParseError as exc:
        log.warning("event=bad_path route=%r error=%s", route[0], exc)
        return Hop(fallback)


def binding_hop(binding: Binding) -> Hop:
    """How to reach a registered contact: its Path, its TCP/TLS/WS connection, or its URI
    (the address its REGISTER came from when the contact is behind NAT)."""
    received = received_target(binding.received)
    if binding.transport in ("tcp", "tls", "ws", "wss") and received is not None:
        direct = received
    else:
        direct = direct_target(parse_uri(binding.contact), received)
    return route_hop(path_route(binding.path), direct)


# What a device behind NAT puts in its Contact: RFC 1918, RFC 6598 (carrier-grade NAT) and
# RFC 4193 (unique local) addresses, which nobody outside its own network can reach.
_NAT_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def direct_target(contact: SipURI, source: Target | None) -> Target:
    """The contact's own address; over UDP, ``source`` when the contact is behind NAT.

    A UDP contact naming a private address other than the one its REGISTER came from is
    behind NAT: only the mapping that REGISTER opened reaches it, so the request goes to
    the REGISTER's source address and port (Part A Q4 "honour received", as a proxy's
    ``fix_nated_register`` does). A contact on our own network, or one that registered
    from its own address, is reached directly.
    """
    target = Target.from_uri(contact)
    if source is None or target.transport != "UDP" or source.transport != "UDP":
        return target
    try:
        named = ipaddress.ip_address(target.host)
        seen = ipaddress.ip_address(source.host)
    except ValueError:
        return target  # a host name: nothing to compare
    if named != seen and any(named in net for net in _NAT_NETWORKS):
        return Target(source.host, source.port, "UDP", True)
    return target


def received_target(received: str | None) -> Target | None:
    """The ``transport:ip:port`` a binding came from, as a Target."""
    if not received:
        return None
    transport, _, rest = received.partition(":")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return Target(host.strip("[]"), int(port), transport.upper(), True)


def format_received(transport: str, ip: str, port: int) -> str:
    """``transport:ip:port`` for a binding's source (IPv6 in brackets)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"{transport.lower()}:{host}:{port}"


__all__ = [
    "Deliverer",
    "DeliverySettings",
    "DumpReport",
    "Hop",
    "Requester",
    "binding_hop",
    "delivery_body",
    "direct_target",
    "format_received",
    "is_text_plain",
    "path_route",
    "received_target",
    "route_hop",
]
