"""msilo's exception hierarchy.

SIP-facing errors carry the ``status`` and ``reason`` of the response that
answers them, so the transport can reply without a lookup table.  Library code
raises these; only the server layer logs.
"""

from __future__ import annotations


class MsiloError(Exception):
    """Base class of every error msilo raises on purpose."""


class ConfigError(MsiloError):
    """A configuration file, key or value is invalid; the message names the key and the rule."""


class SipError(MsiloError):
    """An error that is answered with a SIP response ``status`` / ``reason``."""

    status: int = 500
    reason: str = "Server Internal Error"
    #: Header lines the answer must carry (e.g. Unsupported for a 420).
    headers: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        detail: str = "",
        *,
        status: int | None = None,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        if headers:
            self.headers = headers


class ParseError(SipError):
    """The bytes are not a well-formed SIP message (RFC 3261 §25)."""

    status = 400
    reason = "Bad Request"


class MessageTooLarge(ParseError):
    """The message is larger than the configured or protocol limit (RFC 3261 §21.5.14)."""

    status = 513
    reason = "Message Too Large"


class UnsupportedURIScheme(ParseError):
    """The Request-URI scheme is not sip, sips or tel (RFC 3261 §21.4.16)."""

    status = 416
    reason = "Unsupported URI Scheme"


class InvalidURI(ParseError):
    """A URI is malformed, or cannot serve where it is used (e.g. as an address-of-record)."""

    status = 400
    reason = "Bad Request"


class IncompleteURI(InvalidURI):
    """A URI without a user part where one is needed (an AoR; RFC 3261 §21.4.22).

    The parse-time twin of :class:`AddressIncomplete`: it is a :class:`ParseError`, so
    parser callers catch one family, and it answers with the same 484.
    """

    status = 484
    reason = "Address Incomplete"


class TooManyHops(SipError):
    """Max-Forwards reached zero (RFC 3261 §16.3 step 3)."""

    status = 483
    reason = "Too Many Hops"


class AddressIncomplete(SipError):
    """The Request-URI has no user part (RFC 3261 §21.4.22)."""

    status = 484
    reason = "Address Incomplete"


class Forbidden(SipError):
    """The request is understood and refused (RFC 3261 §21.4.4): e.g. an authenticated user
    registering or sending for an address-of-record that is not theirs (spec D14)."""

    status = 403
    reason = "Forbidden"


class BadCredentials(ParseError):
    """An Authorization / Proxy-Authorization header that is not valid digest credentials
    (RFC 3261 §25.1 ``credentials``, RFC 7616 §3.4)."""

    status = 400
    reason = "Bad Request"


class SubscriberError(MsiloError):
    """A ``msilo subscriber`` command cannot do what was asked (no such user, user exists)."""


class StorageError(MsiloError):
    """The database failed; the request is answered 503 and nothing is acknowledged."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached right now (connection lost, server down)."""


class QueueFull(StorageError):
    """The batch writer's queue is full; the request is answered 503 with Retry-After."""


class SchemaError(StorageError):
    """The database schema is missing, foreign or of an unexpected version."""


class InvalidRecord(StorageError):
    """A value does not fit the silo table (too long, NUL character, not text).

    Raised before the row joins a batch, so only the request that carried it fails.
    ``field`` names the column (or record field) at fault.
    """

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.field = field


class TransportError(SipError):
    """A message could not be sent: unresolvable host, refused connection, socket error.

    A client transaction that meets one completes with a locally generated 503
    (RFC 3261 §8.1.3.1, §17.1.4).
    """

    status = 503
    reason = "Service Unavailable"
