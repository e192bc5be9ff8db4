"""Does the authenticated identity own the address-of-record it acts for? (spec D14)

Authentication says who sent the request; these checks say whether that user may do what
it asks: register bindings for the To AoR (RFC 3261 §10.3 step 3: "the registrar ... MUST
determine if the authenticated user is authorized to modify registrations for this
address-of-record"), or send a MESSAGE whose From -- stored as ``src_addr`` -- names it.
"""

from __future__ import annotations

from msilo.errors import Forbidden, ParseError
from msilo.sip.message import SipRequest
from msilo.sip.parser import normalize_aor


def owns_aor(identity: str, aor: str) -> bool:
    """True when ``identity`` (``user@domain``) and ``aor`` (``user@host``, as
    ``normalize_aor`` gives it) are the same address: user case-sensitive, host not
    (RFC 3261 §19.1.4)."""
    user, at, domain = identity.rpartition("@")
    aor_user, aor_at, aor_host = aor.rpartition("@")
    return bool(at and aor_at) and user == aor_user and domain.lower() == aor_host.lower()


def _aor_of(uri: str | None, header: str) -> str:
    if not uri:
        raise Forbidden(f"no {header} address to authorize")
    try:
        return normalize_aor(uri)
    except ParseError as exc:  # tel:, no user part: nobody owns it
        raise Forbidden(
            f"{header} names no address-of-record ({exc.detail or exc.reason})"
        ) from None


def require_registrar_owner(request: SipRequest, identity: str) -> str:
    """The To AoR of a REGISTER, if ``identity`` owns it; raises ``Forbidden`` (403)."""
    aor = _aor_of(request.to.uri if request.to is not None else None, "To")
    if not owns_aor(identity, aor):
        raise Forbidden(f"{identity} may not register {aor}")
    return aor


def require_sender(request: SipRequest, identity: str) -> str:
    """The From AoR of a MESSAGE, if ``identity`` owns it; raises ``Forbidden`` (403).

    With ``auth.message`` the stored ``src_addr`` is then the authenticated identity's.
    """
    aor = _aor_of(request.from_.uri if request.from_ is not None else None, "From")
    if not owns_aor(identity, aor):
        raise Forbidden(f"{identity} may not send as {aor}")
    return aor
