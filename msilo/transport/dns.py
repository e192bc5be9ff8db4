"""Locating a SIP server by name (RFC 3263 §4.2 without NAPTR, RFC 2782 ordering).

A host name in a URI without a port is looked up as ``_sip._udp`` / ``_sip._tcp`` /
``_sips._tcp`` SRV records for the transport the request uses; the records are tried by
priority, weighted at random within one priority, each at its A/AAAA addresses.  Without
SRV records (or with a port in the URI) the name's own A/AAAA records are used on the
port.  NAPTR is not consulted: the transport is the URI's, or the one RFC 3261 §18.1.1
picks by size.

Answers are cached for their TTL (dnspython's cache), so the retransmissions of one
request and the requests to one proxy do not each cost a lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.resolver

from msilo.errors import TransportError
from msilo.transport.base import TCP, TLS, UDP, Target

log = logging.getLogger("msilo.transport")

Address = tuple[str, int]

# How long one lookup may take before the send fails (the client transaction then
# answers itself 503, and the sender or the next REGISTER tries again).
LOOKUP_TIMEOUT = 5.0


def parse_nameserver(text: str) -> Address:
    """``"ip"`` or ``"ip:port"`` / ``"[ipv6]:port"`` → (ip, port); ValueError when not."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"bad port in {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def srv_order(records: Sequence[tuple[int, int, int, str]], rng: random.Random) -> list[Address]:
    """(priority, weight, port, target) records in the order to try them (RFC 2782).

    Lowest priority first; within one priority a weighted random draw, repeated over
    what is left, so a weight-0 record comes last only by chance of the draw.
    """
    ordered: list[Address] = []
    for priority in sorted({r[0] for r in records}):
        group = [r for r in records if r[0] == priority]
        while group:
            total = sum(r[1] for r in group)
            pick = rng.uniform(0, total) if total else 0.0
            running = 0
            chosen = group[0]
            for record in sorted(group, key=lambda r: r[1]):
                running += record[1]
                if running >= pick:
                    chosen = record
                    break
            group.remove(chosen)
            ordered.append((chosen[3], chosen[2]))
    return ordered


class Resolver:
    """Finds the addresses to try for a :class:`Target` whose host is a name."""

    def __init__(self, nameservers: Sequence[str] = (), *, rng: random.Random | None = None):
        self._custom = bool(nameservers)
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            servers = [parse_nameserver(item) for item in nameservers]
            resolver.nameservers = [host for host, _ in servers]
            resolver.port = servers[0][1]  # dnspython takes one port for every server
        else:
            try:
                resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.lifetime = LOOKUP_TIMEOUT
        resolver.cache = dns.resolver.Cache()
        self._resolver = resolver
        self._rng = rng or random.Random()

    async def locate(self, target: Target) -> list[Address]:
        """The (ip, port) pairs to try for ``target``, best first; TransportError if none."""
        if target.srv:
            service = (
                "_sips._tcp"
                if target.transport == TLS
                else ("_sip._tcp" if target.transport == TCP else "_sip._udp")
            )
            servers = await self._srv(f"{service}.{target.host}")
            if servers is not None:
                found: list[Address] = []
                for name, port in servers:
                    try:
                        found.extend((ip, port) for ip in await self._addresses(name, target))
                    except TransportError as exc:  # the next target may resolve
                        log.warning("event=srv_target_unresolved target=%s error=%s", name, exc)
                if not found:
                    raise TransportError(f"no address for the SRV targets of {target.host}")
                return found
        ips = await self._addresses(target.host, target)
        if not ips:
            raise TransportError(f"cannot resolve {target.host}")
        return [(ip, target.port) for ip in ips]

    async def _srv(self, name: str) -> list[Address] | None:
        """SRV targets in the order to try, None when the name has no SRV records."""
        try:
            answer = await self._resolver.resolve(name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            # A DNS server that fails (timeout, SERVFAIL, refused) is not "no such service":
            # the host's own address may still work, as it did before SRV existed.
            log.warning("event=srv_lookup_failed name=%s error=%s", name, exc)
            return None
        records = [
            (r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True)) for r in answer
        ]
        if len(records) == 1 and records[0][3] in ("", "."):
            raise TransportError(f"{name}: the service is not offered (SRV target '.')")
        return srv_order(records, self._rng)

    async def _addresses(self, name: str, target: Target) -> list[str]:
        if not self._custom:
            # The system's resolver: /etc/hosts and resolv.conf, as every other program.
            kind = socket.SOCK_DGRAM if target.transport == UDP else socket.SOCK_STREAM
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(name, None, type=kind)
            except OSError as exc:
                raise TransportError(f"cannot resolve {name}: {exc}") from None
            return list(dict.fromkeys(str(info[4][0]) for info in infos))
        ips: list[str] = []
        failure: dns.exception.DNSException | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                failure = exc  # the other family may still answer
                continue
            ips.extend(r.address for r in answer)
        if not ips and failure is not None:
            raise TransportError(f"cannot resolve {name}: {failure}")
        return ips


__all__ = ["LOOKUP_TIMEOUT", "Resolver", "parse_nameserver", "srv_order"]
