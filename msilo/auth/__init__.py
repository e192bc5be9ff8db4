"""Digest authentication (RFC 3261 §22, RFC 7616, RFC 8760) and AoR ownership (spec D14).

The routing layer builds one ``Authenticator`` per worker and calls ``check`` on a REGISTER
(``proxy=False``) or, with ``auth.message``, a MESSAGE (``proxy=True``); on acceptance it
checks ownership with ``require_registrar_owner`` / ``require_sender``.
"""

from __future__ import annotations

from msilo.auth.credentials import ALGORITHMS, DigestCredentials, parse_credentials
from msilo.auth.digest import (
    Authenticator,
    AuthOutcome,
    CredentialStore,
    Verdict,
    compute_ha1,
    compute_response,
)
from msilo.auth.ownership import owns_aor, require_registrar_owner, require_sender

__all__ = [
    "ALGORITHMS",
    "AuthOutcome",
    "Authenticator",
    "CredentialStore",
    "DigestCredentials",
    "Verdict",
    "compute_ha1",
    "compute_response",
    "owns_aor",
    "parse_credentials",
    "require_registrar_owner",
    "require_sender",
]
