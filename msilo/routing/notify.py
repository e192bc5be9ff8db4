"""Offline notifications to the sender of a stored message (D11, §3.9, §10 Q1/Q3).

Sent after the commit, only when ``from_address`` and ``offline_message`` are
set.  ``contact_hdr`` is added (the reference drops it).  Loop guard: never
notify about a message that comes from our own notification address, nor about
a message that is itself one of our notifications (marked ``X-Msilo: notify``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from msilo.errors import ParseError
from msilo.routing.delivery import Requester
from msilo.routing.pv import row_pv_values
from msilo.routing.templates import Template
from msilo.sip.message import SipRequest
from msilo.sip.parser import normalize_aor, parse_uri
from msilo.storage.base import StoredMessage
from msilo.transport.base import Target

log = logging.getLogger("msilo.notify")

MARK_HEADER = "X-Msilo"
MARK_NOTIFY = "notify"


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """The compiled notification templates and where notifications go."""

    from_address: Template
    offline_message: Template
    content_type_hdr: Template | None = None
    contact_hdr: Template | None = None
    use_contact: bool = True


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification ready to send."""

    uri: str
    to: str
    from_: str
    body: bytes
    content_type: str | None
    headers: tuple[tuple[str, str], ...]


def _same_aor(a: str, b: str) -> bool:
    try:
        return normalize_aor(a) == normalize_aor(b)
    except ParseError:
        return a.strip().lower() == b.strip().lower()


def _header_value(line: str) -> tuple[str, str]:
    name, _, value = line.rstrip("\r\n").partition(":")
    return name.strip(), value.strip()


def is_notification(request: SipRequest) -> bool:
    """True for a request that is one of our own notifications."""
    mark = request.get_header(MARK_HEADER)
    return mark is not None and mark.strip().lower() == MARK_NOTIFY


def notification_for(
    request: SipRequest, values: Mapping[str, str], settings: NotifySettings
) -> Notification | None:
    """The notification for a stored ``request``, or None when none must be sent."""
    if request.from_ is None or is_notification(request):
        return None
    sender = request.from_.uri
    from_address = settings.from_address.expand(values).strip()
    body = settings.offline_message.expand(values)
    if not from_address or not body or _same_aor(sender, from_address):
        return None
    uri = sender
    if settings.use_contact and request.contacts:
        first = request.contacts[0].uri
        if first[:4].lower() == "sip:" or first[:5].lower() == "sips:":
            uri = first
    headers: list[tuple[str, str]] = [(MARK_HEADER, MARK_NOTIFY)]
    if settings.contact_hdr is not None:
        name, value = _header_value(settings.contact_hdr.expand(values))
        if value:
            headers.append((name, value))
    return _notification(
        uri, sender, from_address, body, settings.content_type_hdr, values, headers
    )


def _notification(
    uri: str,
    sender: str,
    from_address: str,
    body: str,
    content_type_hdr: Template | None,
    values: Mapping[str, str],
    headers: list[tuple[str, str]],
) -> Notification:
    content_type = None
    if content_type_hdr is not None:
        content_type = _header_value(content_type_hdr.expand(values))[1] or None
    return Notification(
        uri=uri,
        to=sender,
        from_=from_address,
        body=body.encode("utf-8", "surrogateescape"),
        content_type=content_type,
        headers=tuple(headers),
    )


@dataclass(frozen=True, slots=True)
class ExpirySettings:
    """The compiled templates of the notice about a message that expired undelivered."""

    from_address: Template
    message: Template
    content_type_hdr: Template | None = None


def expiry_notice(row: StoredMessage, settings: ExpirySettings) -> Notification | None:
    """The notice to the sender of ``row``, which expired undelivered; None when none is due
    (no sender address, or the row is itself one of our own notices)."""
    values = row_pv_values(row)
    from_address = settings.from_address.expand(values).strip()
    body = settings.message.expand(values)
    sender = row.src_addr
    if not sender or not from_address or not body or _same_aor(sender, from_address):
        return None
    headers = [(MARK_HEADER, MARK_NOTIFY)]
    return _notification(
        sender, sender, from_address, body, settings.content_type_hdr, values, headers
    )


def send_notification(
    requester: Requester, note: Notification, outbound_proxy: Target | None
) -> bool:
    """Send ``note`` without waiting for its answer (through ``outbound_proxy`` when set);
    False, logged, when it cannot even start."""
    try:
        target = outbound_proxy or Target.from_uri(parse_uri(note.uri))
        requester.start_message(
            note.uri,
            target,
            from_=note.from_,
            to=note.to,
            body=note.body,
            content_type=note.content_type,
            headers=note.headers,
        )
    except (ParseError, OSError) as exc:
        log.warning("event=notify_failed to=%s error=%s", note.uri, exc)
        return False
    return True
