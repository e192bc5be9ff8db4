"""Digest authentication of SIP requests (RFC 3261 §22, RFC 7616, RFC 8760).

``Authenticator.check`` answers one question for the routing layer: is this request
authenticated, and as whom?  It never raises for anything the client sent; the outcome says
what to answer:

* accepted -- with the identity ``user@domain`` from the ``subscriber`` table;
* a challenge -- 401 (``WWW-Authenticate``, REGISTER) or 407 (``Proxy-Authenticate``,
  MESSAGE), one header per offered algorithm, strongest first (RFC 8760 §2.4, RFC 7616
  §3.7), ``stale=true`` when the digest was right but the nonce is used up or expired.
  Every failed check gets one (unknown user and wrong password alike: no enumeration);
* refused -- 400 (malformed credentials);
* dropped -- the source is banned by the throttle (``throttle.AuthThrottle``): no answer.

Nonces are stateless (``nonce.NonceSigner``); only their *use* is stored: the highest
nonce-count seen per nonce lives in the database, and "nc must increase" is one atomic
statement there, so a replay is refused whichever worker or host receives it.  A wrong
answer uses its nonce up.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from msilo.auth.credentials import (
    ALGORITHMS,
    DigestCredentials,
    auth_scheme,
    parse_credentials,
)
from msilo.auth.nonce import NonceSigner
from msilo.auth.throttle import Admission, AuthThrottle
from msilo.errors import BadCredentials, ParseError
from msilo.sip.message import SipRequest
from msilo.sip.parser import parse_uri
from msilo.storage.subscriber import Subscriber

_MAX_NC: Final = 0xFFFFFFFF  # nonce-count = 8LHEX (RFC 3261 §25.1)
#: Seconds a peer's clock may be ahead of ours (nonces "from the future") and the margin
#: kept before a nonce-count row is deleted (a peer whose clock lags still honours it).
CLOCK_SKEW: Final = 60

# hashlib names of the digest algorithms (RFC 8760 §2.2: SHA-512-256 is SHA-512/256 of
# FIPS 180-4, not SHA-512 cut to 256 bits).
_HASHLIB: Final = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
# Where the subscriber table keeps each algorithm's HA1 (OpenSIPS auth_db columns).
_HA1_COLUMN: Final = {"MD5": "ha1", "SHA-256": "ha1_sha256", "SHA-512-256": "ha1_sha512t256"}


def _h(algorithm: str, text: str) -> str:
    # Header values were decoded with surrogateescape: encode back to the bytes received.
    data = text.encode("utf-8", "surrogateescape")
    return hashlib.new(_HASHLIB[algorithm], data).hexdigest()


def compute_ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """``H(username ":" realm ":" password)`` in lower-case hex (RFC 7616 §3.4.2)."""
    return _h(algorithm, f"{username}:{realm}:{password}")


def compute_response(
    algorithm: str,
    ha1: str,
    *,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str = "",
    cnonce: str = "",
) -> str:
    """The request-digest (RFC 7616 §3.4.1; RFC 2069 form when ``qop`` is None).

    ``HA2 = H(method ":" digest-uri)``; with ``qop=auth`` the response is
    ``H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)``, without it
    ``H(HA1 ":" nonce ":" HA2)``.
    """
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop is None:
        return _h(algorithm, f"{ha1}:{nonce}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def subscriber_ha1(sub: Subscriber, algorithm: str, realm: str) -> str | None:
    """The subscriber's HA1 for ``algorithm``, or None when it has no credential for it.

    A plain password serves every algorithm and wins over a stored HA1 (it stays right
    when the realm changes); otherwise only the algorithm whose HA1 column is set works.
    """
    if sub.password:
        return compute_ha1(algorithm, sub.username, realm, sub.password)
    value: str = getattr(sub, _HA1_COLUMN[algorithm])
    return value.strip().lower() or None


def same_resource(digest_uri: str, request_uri: str) -> bool:
    """True when a digest ``uri`` names the Request-URI (RFC 7616 §3.4.6).

    Clients copy the Request-URI, so the usual test is string equality; otherwise the
    two must be the same SIP URI by RFC 3261 §19.1.4 (scheme, user, host in any case,
    port; parameters are not compared, a proxy on the way may have added some).
    """
    if digest_uri == request_uri:
        return True
    try:
        a, b = parse_uri(digest_uri), parse_uri(request_uri)
    except ParseError:
        return False
    return (a.scheme, a.user, a.host.lower(), a.port) == (b.scheme, b.user, b.host.lower(), b.port)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class CredentialStore(Protocol):
    """What the authenticator needs from storage (``msilo.storage.base.Store`` has it)."""

    async def get_subscriber(self, username: str, domain: str) -> Subscriber | None: ...

    async def use_nonce(self, nonce: str, nc: int, *, expires: int) -> bool: ...

    async def delete_expired_nonces(self, now: int) -> int: ...


class Verdict(enum.Enum):
    """The kind of an ``AuthOutcome``."""

    ACCEPTED = "accepted"
    CHALLENGE = "challenge"
    REFUSED = "refused"
    DROPPED = "dropped"  # a banned source: send nothing back


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What ``Authenticator.check`` decided.

    For CHALLENGE and REFUSED, answer with ``status`` / ``reason`` and the extra
    ``headers``; ``detail`` says why, for one log line (never a secret).
    """

    verdict: Verdict
    status: int = 0
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    username: str = ""
    domain: str = ""
    detail: str = ""
    stale: bool = False
    judged: bool = False  # the password was checked
    judged_right: bool = False  # ... and was right (even if the nonce was stale)
    throttled: bool = False  # the throttle answered without checking the password

    @property
    def accepted(self) -> bool:
        """True when the request is authenticated."""
        return self.verdict is Verdict.ACCEPTED

    @property
    def identity(self) -> str | None:
        """``user@domain`` of the authenticated subscriber, or None."""
        return f"{self.username}@{self.domain}" if self.accepted else None


class Authenticator:
    """Checks digest credentials against the ``subscriber`` table (one per worker; any number
    of instances on any hosts agree as long as they share ``secret`` and the database).

    ``realm`` is both the challenge realm and, unless ``check`` is given another, the
    ``domain`` subscribers are looked up in (OpenSIPS's convention: realm = domain).
    """

    def __init__(
        self,
        store: CredentialStore,
        realm: str,
        secret: str | bytes,
        *,
        nonce_expires: int = 300,
        algorithms: Sequence[str] = ("SHA-256", "MD5"),
        clock: Callable[[], float] = time.time,
        throttle: AuthThrottle | None = None,
    ) -> None:
        if not realm:
            raise ValueError("realm must not be empty")
        if nonce_expires <= 0:
            raise ValueError("nonce_expires is expected to be greater than zero")
        unknown = [a for a in algorithms if a not in _HASHLIB]
        if unknown or not algorithms:
            raise ValueError(
                f"algorithms must be a non-empty subset of {', '.join(ALGORITHMS)}, "
                f"got {list(algorithms)!r}"
            )
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not key:
            # A per-process random key would make other workers refuse our nonces.
            raise ValueError("secret must not be empty (and must be the same on every host)")
        self.store = store
        self.realm = realm
        self.nonce_expires = nonce_expires
        # Strongest first whatever the configured order (RFC 7616 §3.7: by preference).
        self.algorithms = tuple(a for a in ALGORITHMS if a in algorithms)
        self._clock = clock
        self._nonces = NonceSigner(key, realm)
        self.throttle = throttle

    def _now(self) -> int:
        return int(self._clock())

    # --- outcomes -------------------------------------------------------------------------

    def challenge(
        self,
        *,
        proxy: bool,
        stale: bool = False,
        algorithms: Sequence[str] | None = None,
        detail: str = "no credentials",
        judged: bool = False,
        right: bool = False,
        throttled: bool = False,
    ) -> AuthOutcome:
        """A fresh 401 / 407 challenge, one header per algorithm (RFC 3261 §22.1, §22.3)."""
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self._nonces.issue(self._now())
        tail = ", stale=true" if stale else ""
        offered = self.algorithms if algorithms is None else algorithms
        headers = tuple(
            (
                name,
                f"Digest realm={_quote(self.realm)}, nonce={_quote(nonce)}, "
                f'algorithm={algorithm}, qop="auth"{tail}',
            )
            for algorithm in offered
        )
        return AuthOutcome(
            Verdict.CHALLENGE,
            status=407 if proxy else 401,
            reason="Proxy Authentication Required" if proxy else "Unauthorized",
            headers=headers,
            detail=detail,
            stale=stale,
            judged=judged,
            judged_right=right,
            throttled=throttled,
        )

    @staticmethod
    def _refuse(status: int, detail: str) -> AuthOutcome:
        return AuthOutcome(Verdict.REFUSED, status=status, reason="Bad Request", detail=detail)

    # --- the check ------------------------------------------------------------------------

    def _find_credentials(self, request: SipRequest, proxy: bool) -> DigestCredentials | str:
        """Our realm's credentials; else "none" or "other-realm"."""
        header = "proxy-authorization" if proxy else "authorization"
        found = "none"
        for value in request.get_headers(header):
            # Basic and other schemes are not for us (RFC 3261 §22.1 forbids Basic).
            if auth_scheme(value) != "digest":
                continue
            creds = parse_credentials(value)
            # RFC 3261 §22.4: use the credentials whose realm is ours; others may belong
            # to other proxies on the path (§22.3).
            if creds.realm == self.realm:
                return creds
            found = "other-realm"
        return found

    async def check(
        self,
        request: SipRequest,
        *,
        proxy: bool,
        domain: str | None = None,
        source: str | None = None,
    ) -> AuthOutcome:
        """Authenticate ``request``.

        ``proxy=False``: Authorization, answered 401 (REGISTER, RFC 3261 §22.2);
        ``proxy=True``: Proxy-Authorization, answered 407 (MESSAGE, §22.3).  ``domain``:
        where to look the username up (default: the realm).  ``source``: the sender's
        address, for the throttle.  Raises only ``StorageError``.

        Every failed check -- unknown user, wrong password, a nonce we did not issue,
        another realm, an algorithm not offered -- gets the same answer: a fresh challenge,
        so the answer never tells whether a user exists (only malformed credentials get
        400, and a nonce past its lifetime ``stale=true``, for a right digest only).
        """
        try:
            found = self._find_credentials(request, proxy)
        except BadCredentials as exc:
            return self._refuse(400, f"malformed credentials: {exc}")
        if isinstance(found, str):
            return self.challenge(proxy=proxy, detail=f"credentials: {found}")
        creds = found
        if not same_resource(creds.uri, request.uri):
            # RFC 7616 §3.4.6: the "uri" must designate the Request-URI's resource, or a
            # response captured for one request could be replayed on another; "SHOULD
            # return a 400".  Decided before any password check: it says nothing of users.
            return self._refuse(400, "digest uri is not the Request-URI")
        if creds.algorithm not in self.algorithms:
            # Not offered (e.g. MD5 when only SHA-256 is allowed): no downgrade.
            return self.challenge(proxy=proxy, detail=f"algorithm {creds.algorithm} not offered")
        now = self._now()
        # The nonce first: it costs an HMAC, the subscriber a database round trip.
        issued = self._nonces.verify(creds.nonce)
        if issued is None or issued.issued > now + CLOCK_SKEW:
            return self.challenge(proxy=proxy, detail="nonce not issued by us")
        lookup_domain = domain or self.realm
        throttle = self.throttle
        if throttle is not None and source is not None:
            admission = await throttle.admit(source, creds.username, lookup_domain)
            if admission is Admission.DROP:
                return AuthOutcome(Verdict.DROPPED, detail="source banned")
            if admission is Admission.CHALLENGE:
                return self.challenge(proxy=proxy, detail="identity throttled", throttled=True)
        outcome = await self._judge(request, creds, issued.issued, now, lookup_domain, proxy)
        if throttle is not None and source is not None and outcome.judged == outcome.judged_right:
            # Not a wrong password (right, or not checked at all): take the count back.
            await throttle.succeeded(source, creds.username, lookup_domain)
        return outcome

    async def _judge(
        self,
        request: SipRequest,
        creds: DigestCredentials,
        issued: int,
        now: int,
        domain: str,
        proxy: bool,
    ) -> AuthOutcome:
        """Check the password (the nonce's MAC already verified)."""
        expires = issued + self.nonce_expires + CLOCK_SKEW
        sub = await self.store.get_subscriber(creds.username, domain)
        ha1 = subscriber_ha1(sub, creds.algorithm, self.realm) if sub is not None else None
        if sub is not None and ha1 is None:
            usable = [a for a in self.algorithms if subscriber_ha1(sub, a, self.realm)]
            if usable:
                # Offer only what this user can answer, or a client that picks the first
                # challenge would never get in.  (Only a table without every HA1 column
                # filled, e.g. an old OpenSIPS one, makes this differ from the challenge
                # an unknown user gets.)
                await self._use_up(creds.nonce, expires)
                return self.challenge(
                    proxy=proxy,
                    algorithms=usable,
                    detail=f"no {creds.algorithm} credentials for {sub.aor}",
                )
        right = False
        if ha1 is not None:
            expected = compute_response(
                creds.algorithm,
                ha1,
                nonce=creds.nonce,
                method=request.method,
                uri=creds.uri,
                qop=creds.qop,
                nc=creds.nc_text,
                cnonce=creds.cnonce,
            )
            right = hmac.compare_digest(expected, creds.response)
        if not right:
            # The same fresh challenge whether the user exists or not (no enumeration), and
            # the nonce is used up: a guesser cannot go on with it (nor with higher counts).
            await self._use_up(creds.nonce, expires)
            who = "unknown user" if sub is None else f"wrong password for {sub.aor}"
            return self.challenge(proxy=proxy, detail=who, judged=True)
        # RFC 7616 §3.3: stale=true only for a valid digest with a nonce no longer good.
        if now - issued > self.nonce_expires:
            return self.challenge(
                proxy=proxy, stale=True, detail="nonce expired", judged=True, right=True
            )
        # Without qop (RFC 2069) there is no count: the nonce is good for one request.
        if not await self.store.use_nonce(creds.nonce, creds.nc, expires=expires):
            return self.challenge(
                proxy=proxy, stale=True, detail="nonce used up or replayed", judged=True, right=True
            )
        return AuthOutcome(
            Verdict.ACCEPTED,
            username=sub.username,  # type: ignore[union-attr]
            domain=sub.domain,  # type: ignore[union-attr]
            detail=creds.algorithm,
            judged=True,
            judged_right=True,
        )

    async def _use_up(self, nonce: str, expires: int) -> None:
        # The highest count there is: every later count with this nonce is a replay.
        await self.store.use_nonce(nonce, _MAX_NC, expires=expires)

    async def delete_expired_nonces(self) -> int:
        """Forget the nonce-counts of nonces that can no longer be used (run periodically)."""
        return await self.store.delete_expired_nonces(self._now())
