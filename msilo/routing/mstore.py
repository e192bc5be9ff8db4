"""m_store's decisions: whose mailbox, which fields, how long (D3, D4, D10, D12).

Pure functions over a parsed request; the route hands the result to the batch
writer and answers only after the commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

from msilo.errors import AddressIncomplete, ParseError
from msilo.sip.message import SipRequest, SipURI
from msilo.sip.parser import normalize_aor, parse_uri
from msilo.storage.base import SRC_DST_LIMIT, NewMessage
from msilo.storage.values import OWNER_LIMIT, text_problem


def check_field(field: str, value: str | None, limit: int | None = None) -> None:
    """Raise 400 naming the SIP ``field`` when ``value`` cannot be stored (issue 14).

    A value the database cannot hold (NUL, bytes that are not UTF-8, longer than the
    column) is the request's fault: it must be answered 400 before it reaches a table,
    never fail there as a database error (503 and a false outage alarm).  The reason
    names the field, never the value (a reason phrase is shown to users).
    """
    if value is None:
        return
    problem = text_problem(value, limit)
    if problem is not None:
        raise ParseError(f"{field} {problem}", reason=f"Bad Request: {field} {problem}")


def check_owner(aor: str, where: str) -> None:
    """400 unless the owner ``user@host`` fits the owner columns (``where``: its source)."""
    user, host = split_owner(aor)
    check_field(f"{where} user", user, OWNER_LIMIT)
    check_field(f"{where} host", host, OWNER_LIMIT)


def split_owner(aor: str) -> tuple[str, str]:
    """``user@host`` -> (user, host)."""
    user, _, host = aor.rpartition("@")
    return user, host


def owner_of(
    request: SipRequest,
    explicit: str | None,
    domains: Collection[str],
    ruri: SipURI | None = None,
) -> str:
    """The normalised owner AoR ``user@host`` of a MESSAGE (D3).

    The explicit owner (custom route) wins; otherwise the Request-URI when it
    is a complete AoR in one of our domains (any domain when ``domains`` is
    empty); otherwise the To URI, as the admin guide documents.
    """
    if explicit is not None:
        aor = _aor(explicit, "owner")
        check_owner(aor, "owner")
        return aor
    if ruri is None:
        try:
            ruri = parse_uri(request.uri)
        except ParseError:
            ruri = None
    if (
        ruri is not None
        and ruri.scheme in ("sip", "sips")
        and ruri.user
        and (not domains or ruri.host.lower() in domains)
    ):
        aor = normalize_aor(ruri)
        check_owner(aor, "Request-URI")
        return aor
    if request.to is None:
        raise ParseError("missing To header")
    aor = _aor(request.to.uri, "To URI")
    check_owner(aor, "To")
    return aor


def _aor(uri: str, what: str) -> str:
    try:
        return normalize_aor(uri)
    except ParseError as exc:
        raise AddressIncomplete(f"{what} {uri!r} is not a user@host address ({exc})") from None


def lifetime(request: SipRequest, expire_time: int) -> int:
    """Seconds to keep the message: ``min(expire_time, Expires)`` when Expires > 0 (§3.3)."""
    expires = request.expires
    if expires is not None and expires > 0:
        return min(expire_time, expires)
    return expire_time


def dedupe_key(request: SipRequest, owner: str) -> str | None:
    """Idempotency key of a MESSAGE for one owner: Call-ID, CSeq and From-tag (D12).

    Hashed to a fixed width so an enormous Call-ID cannot bloat the unique
    index; the owner is included so that one request stored for two owners
    (a custom route may do that) is two rows, not a duplicate.
    """
    if request.call_id is None or request.cseq is None:
        return None
    tag = request.from_.tag if request.from_ is not None else None
    raw = f"{request.call_id}\x1f{request.cseq.number}\x1f{tag or ''}\x1f{owner}"
    return hashlib.blake2b(raw.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def new_message(
    request: SipRequest,
    owner: str,
    *,
    now: int,
    expire_time: int,
    snd_time: int = 0,
    unless_online: bool = False,
) -> NewMessage:
    """The row to store for ``request`` (D4): full Content-Type, body byte for byte.

    ``exp_time = inc_time + lifetime``; a scheduled message's lifetime counts
    from its send time, so a reminder is never expired before it is due (§10 Q14).
    """
    if request.from_ is None or request.to is None:
        raise ParseError("missing From or To header")
    check_field("From URI", request.from_.uri, SRC_DST_LIMIT)
    check_field("To URI", request.to.uri, SRC_DST_LIMIT)
    if request.content_type is not None:
        check_field("Content-Type", request.content_type.raw)
    user, host = split_owner(owner)
    keep = lifetime(request, expire_time)
    start = snd_time if snd_time > now else now
    return NewMessage(
        username=user,
        domain=host,
        src_addr=request.from_.uri,
        dst_addr=request.to.uri,
        body=bytes(request.body),
        ctype=request.content_type.raw if request.content_type is not None else None,
        inc_time=now,
        exp_time=start + keep,
        snd_time=snd_time,
        dedupe_key=dedupe_key(request, owner),
        unless_online=unless_online,
        # A Call-ID no text column holds (not UTF-8) is not a reason to refuse the message:
        # its deliveries then carry a Call-ID made from the row id (stable as well).
        callid=request.call_id if text_problem(request.call_id, None) is None else None,
    )
