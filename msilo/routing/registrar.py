"""Registrar rules (RFC 3261 §10.3): what a REGISTER does to a user's bindings.

``plan_register`` checks what can be checked without the database (wildcard
rules, 423 Interval Too Brief) and returns a plan function that the storage
layer runs inside its per-user transaction against the current bindings
(Call-ID / CSeq ordering needs them).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from msilo.errors import ParseError, SipError
from msilo.routing.mstore import check_field
from msilo.sip.message import Contact, SipRequest
from msilo.sip.parser import parse_uri, route_uris
from msilo.storage.location import Binding, BindingPlan, PlanFunction
from msilo.storage.values import OWNER_LIMIT
from msilo.transport.base import UDP_SIZE_LIMIT

# RFC 3261 has no code for "too many bindings".  403: the registrar understood and refuses,
# and the same request "SHOULD NOT be repeated" (§21.4.3) -- a UA must remove bindings
# first.  Not 503 (Kamailio's choice): that tells RFC 3263 clients to fail over and retry,
# and reads as an outage on dashboards.  The reason phrase says why (as OpenSIPS's 403).
TOO_MANY_CONTACTS = (403, "Too Many Contacts")


class IntervalTooBrief(SipError):
    """A contact asked for an expiry shorter than ``min_expires`` (RFC 3261 §10.3 step 7)."""

    status = 423
    reason = "Interval Too Brief"


@dataclass(frozen=True, slots=True)
class RegistrarPolicy:
    """Binding lifetimes from ``[registrar]``."""

    default_expires: int = 3600
    min_expires: int = 60
    max_expires: int = 86400
    max_contacts: int = 10  # bindings per AoR; 0 = no limit


@dataclass(frozen=True, slots=True)
class RequestedBinding:
    """One Contact of a REGISTER with its effective expiry (seconds; 0 = remove)."""

    contact: Contact
    expires: int


def requested_bindings(request: SipRequest, policy: RegistrarPolicy) -> list[RequestedBinding]:
    """Each Contact with its effective expiry; raises 400 / 423 as §10.3 steps 6-7 say."""
    if request.contact_star:
        # "*" is only allowed alone and with Expires: 0 (§10.3 step 6).
        if request.contacts or request.expires != 0:
            raise SipError(
                "Contact: * needs Expires: 0 and no other contact", status=400, reason="Bad Request"
            )
        return []
    result = []
    for contact in request.contacts:
        if contact.expires is not None:
            expires = contact.expires
        elif request.expires is not None:
            expires = request.expires
        else:
            expires = policy.default_expires
        if expires < 0:
            raise SipError("negative expires", status=400, reason="Bad Request")
        if 0 < expires < policy.min_expires:
            raise IntervalTooBrief(f"expires {expires} < {policy.min_expires}")
        result.append(RequestedBinding(contact, min(expires, policy.max_expires)))
    return result


def path_lines(request: SipRequest) -> list[tuple[str, str]]:
    """The REGISTER's Path values for its 200, when the UA said it supports Path.

    RFC 3327 §5.3: the registrar returns the stored path to a UA that sent
    ``Supported: path`` (so it learns its route), and to no other.
    """
    path_values = request.get_headers("path")
    if not path_values:
        return []
    supported = {
        token.strip().lower()
        for value in request.get_headers("supported")
        for token in value.split(",")
    }
    if "path" not in supported:
        return []
    return [("Path", value) for value in path_values]


def plan_register(
    request: SipRequest,
    wanted: list[RequestedBinding],
    *,
    username: str,
    domain: str,
    now: int,
    received: str | None,
    transport: str | None,
    max_contacts: int = 0,
) -> PlanFunction:
    """The plan to apply to the user's current bindings for this REGISTER.

    Raises 400 naming the field for a value the location table cannot hold (RFC 4475
    §3.1.1.10 ``escnull`` is a valid REGISTER whose user holds a NUL): checked here, before
    the database, so it is never taken for a database failure.

    ``max_contacts`` > 0: a REGISTER that would leave the AoR with more bindings is
    refused with :data:`TOO_MANY_CONTACTS` and changes nothing.
    """
    if max_contacts and len(wanted) > max_contacts:
        # Refused before any database work: one datagram listing 2,000 contacts costs us
        # nothing but this count.
        status, reason = TOO_MANY_CONTACTS
        raise SipError(f"{len(wanted)} contacts > {max_contacts}", status=status, reason=reason)
    call_id = request.call_id or ""
    cseq = request.cseq.number if request.cseq is not None else 0
    allow = request.allow
    path_values = request.get_headers("path")
    # A Path that does not parse is the REGISTER's fault (400), not a delivery's later.
    route_uris(path_values)
    path = ", ".join(path_values) if path_values else None
    check_field("To user", username, OWNER_LIMIT)
    check_field("To host", domain, OWNER_LIMIT)
    check_field("Call-ID", call_id)
    check_field("Path", path)
    if allow is not None:
        check_field("Allow", ",".join(allow))
    for want in wanted:
        check_field("Contact", want.contact.uri)
        check_field("Contact +sip.instance", want.contact.instance)
        if want.contact.methods is not None:
            check_field("Contact methods", ",".join(want.contact.methods))

    def out_of_order(binding: Binding) -> bool:
        # Same Call-ID with a CSeq not higher than stored: an old or replayed request.
        return binding.callid == call_id and cseq <= binding.cseq

    def plan(existing: list[Binding]) -> BindingPlan:
        live = [b for b in existing if b.expires > now]
        if request.contact_star:
            if any(out_of_order(b) for b in live):
                return BindingPlan(error=(400, "Out-of-order CSeq"))
            return BindingPlan(removes=tuple(b.contact for b in existing))
        upserts: list[Binding] = []
        removes: list[str] = []
        for want in wanted:
            c = want.contact
            match = next(
                (
                    b
                    for b in live
                    if (c.instance is not None and b.instance == c.instance) or b.contact == c.uri
                ),
                None,
            )
            if match is not None and out_of_order(match):
                return BindingPlan(error=(400, "Out-of-order CSeq"))
            if match is not None and match.contact != c.uri:
                removes.append(match.contact)  # same device (instance), new contact URI
            if want.expires == 0:
                if match is not None:
                    removes.append(match.contact)
                removes.append(c.uri)
                continue
            upserts.append(
                Binding(
                    username=username,
                    domain=domain,
                    contact=c.uri,
                    expires=now + want.expires,
                    q=c.q,
                    callid=call_id,
                    cseq=cseq,
                    methods=c.methods if c.methods is not None else allow,
                    instance=c.instance,
                    received=received,
                    path=path,
                    transport=transport,
                    last_modified=now,
                )
            )
        if max_contacts:
            kept = {b.contact for b in live}.difference(removes)
            if len(kept.union(b.contact for b in upserts)) > max_contacts:
                return BindingPlan(error=TOO_MANY_CONTACTS)
        # Expired rows of this user go too: the table only holds what a lookup may return.
        removes.extend(b.contact for b in existing if b.expires <= now)
        return BindingPlan(upserts=tuple(upserts), removes=tuple(dict.fromkeys(removes)))

    return plan


def single_binding(
    request: SipRequest,
    wanted: list[RequestedBinding],
    *,
    username: str,
    domain: str,
    now: int,
    received: str | None,
    transport: str | None,
    max_contacts: int = 0,
) -> Binding | None:
    """The one binding a REGISTER adds or refreshes, when that is all it does (one contact,
    a positive expiry: a device's first REGISTER and every refresh); None otherwise.

    Such a REGISTER is what a registrar sees most, and storage may apply it in one round
    trip (``Store.register_contact``), judging in the database what the plan function
    judges in Python -- and handing anything else (a replayed CSeq, the instance at another
    contact, too many contacts) back to the plan.
    """
    if request.contact_star or len(wanted) != 1 or wanted[0].expires <= 0:
        return None
    [plan] = [
        plan_register(
            request, wanted, username=username, domain=domain, now=now,
            received=received, transport=transport, max_contacts=max_contacts,
        )([])
    ]  # fmt: skip
    return plan.upserts[0] if len(plan.upserts) == 1 else None


def contact_lines(
    bindings: list[Binding],
    now: int,
    *,
    budget: int = 0,
    own: Collection[str] = (),
) -> list[tuple[str, str]]:
    """Contact headers of the 200 OK: every current binding with its remaining expiry.

    ``budget`` > 0 (an answer over UDP, whose source nobody verified): when every binding
    does not fit in that many bytes, only the contacts of this REGISTER (``own``) are
    listed, as many as fit.  Else one spoofed 265-byte REGISTER would send 15 KB to its
    victim.  This departs from RFC 3261 §10.3 step 8 (list every binding) only when the
    list is too long for a datagram; over TCP/TLS the whole list is always sent.
    """
    lines = _contact_lines(bindings, now)
    if not budget or _size(lines) <= budget:
        return lines
    mine = _contact_lines([b for b in bindings if b.contact in own], now)
    fitted: list[tuple[str, str]] = []
    for line in mine:
        if _size([*fitted, line]) > budget:
            break
        fitted.append(line)
    return fitted


def udp_contact_budget(request: SipRequest, others: list[tuple[str, str]]) -> int:
    """Bytes left for Contact lines in a 200 over UDP that must stay within
    ``UDP_SIZE_LIMIT`` (RFC 3261 §18.1.1's 1300): what the response copies from the
    request (§8.2.6), ``others`` and room for the status line, To tag and received/rport."""
    copied = sum(
        len(name) + len(value) + 4
        for name in ("via", "from", "to", "call-id", "cseq")
        for value in request.get_headers(name)
    )
    return max(UDP_SIZE_LIMIT - copied - _size(others) - 120, 1)


def _size(lines: list[tuple[str, str]]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in lines)  # "Name: value\r\n"


def _contact_lines(bindings: list[Binding], now: int) -> list[tuple[str, str]]:
    lines = []
    for b in bindings:
        remaining = b.expires - now
        if remaining <= 0:
            continue
        params = f";expires={remaining}"
        if b.q is not None:
            params += f";q={b.q:g}"
        if b.instance is not None:
            params += f';+sip.instance="{b.instance}"'
        lines.append(("Contact", f"<{b.contact}>{params}"))
    return lines


def dump_target(wanted: list[RequestedBinding], allow: tuple[str, ...] | None) -> Contact | None:
    """The contact of this REGISTER that receives the stored messages (D5).

    Only a contact with a positive expiry that takes MESSAGE (its RFC 3840
    ``methods``, else the REGISTER's Allow, else assumed) qualifies; among
    several, the highest ``q`` wins, then the first listed.
    """
    best: Contact | None = None
    for want in wanted:
        if want.expires <= 0:
            continue
        c = want.contact
        methods = c.methods if c.methods is not None else allow
        if methods is not None and "MESSAGE" not in methods:
            continue
        if best is None or (c.q or 0.0) > (best.q or 0.0):
            best = c
    return best


def device_key(instance: str | None, contact: str) -> str:
    """The device a binding belongs to: its ``+sip.instance`` (RFC 5626 §4.1), else its
    Contact URI normalised (scheme, user, lower-case host, port, transport).

    Two contacts of one UA that differ only in parameters or in host case are one
    device; a UA without an instance that moves to another address is a new device
    (RFC 5626 §6 says as much of bindings without an instance).
    """
    if instance:
        # urn:uuid values compare case-insensitively (RFC 4122 §3).
        return instance.strip().strip("<>").lower()
    try:
        uri = parse_uri(contact)
    except ParseError:
        return contact
    port = uri.port if uri.port is not None else (5061 if uri.scheme == "sips" else 5060)
    transport = (uri.params.get("transport") or "").lower()
    key = f"{uri.scheme}:{uri.user + '@' if uri.user else ''}{uri.host.lower()}:{port}"
    return f"{key};transport={transport}" if transport and transport != "udp" else key


def takes_message(contact: Contact, allow: tuple[str, ...] | None) -> bool:
    """True unless the contact's ``methods`` (RFC 3840), else the REGISTER's Allow, leave
    MESSAGE out (D5)."""
    methods = contact.methods if contact.methods is not None else allow
    return methods is None or "MESSAGE" in methods


def device_changes(
    request: SipRequest, wanted: list[RequestedBinding]
) -> tuple[list[str], list[str] | None]:
    """(devices this REGISTER keeps, devices it forgets; None = all of the user's).

    A contact registered with a positive expiry that takes MESSAGE is a device that reads
    messages; ``Expires: 0`` on a contact (or ``*``) is a log-out there and forgets it.
    """
    if request.contact_star:
        return [], None
    keep: list[str] = []
    forget: list[str] = []
    for want in wanted:
        key = device_key(want.contact.instance, want.contact.uri)
        if want.expires <= 0:
            forget.append(key)
        elif takes_message(want.contact, request.allow):
            keep.append(key)
    return list(dict.fromkeys(keep)), list(dict.fromkeys(forget))
