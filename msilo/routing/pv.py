"""Values of the pseudo-variables of one request, for templates (D11)."""

from __future__ import annotations

from collections.abc import Mapping

from msilo.errors import ParseError
from msilo.sip.message import SipRequest, SipURI
from msilo.sip.parser import parse_uri
from msilo.storage.base import StoredMessage


def _uri(text: str | None) -> SipURI | None:
    if not text:
        return None
    try:
        return parse_uri(text)
    except ParseError:
        return None


def pv_values(
    request: SipRequest,
    source: tuple[str, int],
    local: tuple[str, int] | None = None,
    avp: Mapping[str, str] | None = None,
    original_uri: str | None = None,
) -> dict[str, str]:
    """Every variable of :data:`msilo.routing.templates.VARIABLES` for ``request``."""
    values: dict[str, str] = {"ru": request.uri, "ou": original_uri or request.uri}
    ruri = _uri(request.uri)
    if ruri is not None:
        values["rU"] = ruri.user or ""
        values["rd"] = ruri.host
        values["rp"] = str(ruri.port) if ruri.port is not None else ""
    for prefix, addr in (("f", request.from_), ("t", request.to)):
        if addr is None:
            continue
        values[f"{prefix}u"] = addr.uri
        values[f"{prefix}n"] = addr.display or ""
        parsed = _uri(addr.uri)
        if parsed is not None:
            values[f"{prefix}U"] = parsed.user or ""
            values[f"{prefix}d"] = parsed.host
    values["ci"] = request.call_id or ""
    values["cs"] = str(request.cseq.number) if request.cseq is not None else ""
    values["rm"] = request.method
    values["si"], values["sp"] = source[0], str(source[1])
    if local is not None:
        values["Ri"], values["Rp"] = local[0], str(local[1])
    values["ua"] = request.get_header("user-agent") or ""
    values["ct"] = request.get_header("contact") or ""
    for name, value in (avp or {}).items():
        values[f"avp:{name}"] = value
    return values


def row_pv_values(row: StoredMessage) -> dict[str, str]:
    """The variables a stored row can give: ``$f*`` its sender, ``$t*``/``$r*`` its
    recipient (the owner), ``$rm`` MESSAGE; what only a live request has is left out."""
    owner = f"sip:{row.username}@{row.domain}"
    values = {"ru": owner, "ou": owner, "rU": row.username, "rd": row.domain, "rm": "MESSAGE"}
    for prefix, uri in (("f", row.src_addr), ("t", row.dst_addr)):
        values[f"{prefix}u"] = uri
        parsed = _uri(uri)
        if parsed is not None:
            values[f"{prefix}U"] = parsed.user or ""
            values[f"{prefix}d"] = parsed.host
    return values
