"""Request policy applied before any route: the checks of the admin guide's sample script.

Max-Forwards exhausted → 483; a method we do not serve → 405 with Allow; a
Require naming an extension we do not implement → 420 with Unsupported; a
MESSAGE whose Request-URI has no user → 484; a REGISTER whose To is not a SIP
URI → 400; a domain we do not serve → 403; in silo mode, a source outside
``server.trusted`` → 403.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence

from msilo.errors import AddressIncomplete, Forbidden, ParseError, SipError, TooManyHops
from msilo.sip.message import SipRequest, SipURI
from msilo.sip.parser import parse_uri

METHODS = ("REGISTER", "MESSAGE", "OPTIONS")
ALLOW = "Allow: " + ", ".join(METHODS)
#: Option tags (RFC 3261 §19.2) of the extensions we implement: Path (RFC 3327).
SUPPORTED = frozenset({"path"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class MethodNotAllowed(SipError):
    """A method msilo does not serve (RFC 3261 §21.4.6); the reply carries Allow."""

    status = 405
    reason = "Method Not Allowed"


class BadExtension(SipError):
    """A Require names an extension we do not implement (RFC 3261 §8.2.2.3)."""

    status = 420
    reason = "Bad Extension"


def check_require(request: SipRequest) -> None:
    """Raise 420 listing in Unsupported every option tag of Require we do not implement."""
    required = [
        tag.strip()
        for value in request.get_headers("require")
        for tag in value.split(",")
        if tag.strip()
    ]
    unknown = [tag for tag in required if tag.lower() not in SUPPORTED]
    if unknown:
        raise BadExtension(
            f"unsupported extensions {unknown}", headers=(("Unsupported", ", ".join(unknown)),)
        )


def trusted_networks(items: Sequence[str]) -> tuple[Network, ...]:
    """``server.trusted`` as network objects (validated by the config already)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def check_source(ip: str, trusted: Sequence[Network]) -> None:
    """Raise 403 unless ``ip`` is in one of ``trusted`` (empty = anyone)."""
    if not trusted:
        return
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise Forbidden(f"source {ip!r} is not an IP address") from None
    if not any(addr in net for net in trusted):
        raise Forbidden(f"source {ip} is not trusted")


def check_request(request: SipRequest, domains: Collection[str]) -> SipURI | None:
    """Raise the SipError that answers ``request``; else return its parsed Request-URI
    (None for OPTIONS), so the route does not parse it again."""
    method = request.method
    if method not in METHODS:
        raise MethodNotAllowed(method)
    check_require(request)
    # RFC 3261 §11.2: an OPTIONS is answered by the element it reaches, whatever Max-Forwards.
    if request.max_forwards is not None and request.max_forwards <= 0 and method != "OPTIONS":
        raise TooManyHops()
    if method == "OPTIONS":
        return None
    uri = parse_uri(request.uri)
    if method == "MESSAGE" and not uri.user:
        raise AddressIncomplete(f"no user in {request.uri}")
    if method == "REGISTER" and request.to is not None:
        scheme = request.to.uri.partition(":")[0].lower()
        if scheme not in ("sip", "sips"):
            # RFC 3261 §10.3 step 5: the To of a REGISTER is the address-of-record, a SIP
            # or SIPS URI.  Another scheme is a bad request (RFC 4475 §3.3.3 unksm2: 400);
            # 416 is about the Request-URI (§21.4.16).
            raise ParseError(f"the To of a REGISTER is not a SIP URI: {request.to.uri[:40]!r}")
    if domains:
        host = uri.host.lower()
        if method == "REGISTER" and request.to is not None:
            try:
                host = parse_uri(request.to.uri).host.lower()
            except ParseError as exc:
                # A To that is no SIP URI is the request's fault (RFC 4475 §3.3.3: 400).
                raise ParseError(f"To URI: {exc.detail or exc.reason}") from None
        if host not in domains:
            raise Forbidden(f"domain {host} is not served here")
    return uri
