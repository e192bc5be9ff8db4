"""Value types produced by both SIP parsers (the C one and its pure-Python twin).

This module is the contract: ``msilo._fastparse`` and ``msilo.sip._parse_py``
return instances with exactly these public attributes, and the rest of msilo
(transactions, routing) reads only these attributes.  Header names are matched
case-insensitively; compact forms (RFC 3261 §7.3.3) are expanded to their full
canonical lower-case names in ``headers``.

Values are ``str`` (decoded as UTF-8 with ``surrogateescape`` so no byte is lost)
except the body, which stays ``bytes``.
"""

from __future__ import annotations

from typing import Any, Final


class _Value:
    """Slots-based value object with equality and a readable repr (for tests and logs)."""

    __slots__: tuple[str, ...] = ()

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """Names of every public field, base classes first."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            # a class with deferred fields lists its public names in _fields
            names.extend(klass.__dict__.get("_fields", klass.__dict__.get("__slots__", ())))
        return tuple(names)

    def as_dict(self) -> dict[str, Any]:
        """Return the public fields as a plain dict (nested values converted too)."""
        return {name: _plain(getattr(self, name, None)) for name in self.fields()}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self.fields())
        return f"{type(self).__name__}({fields})"


def _plain(value: Any) -> Any:
    if isinstance(value, _Value):
        return value.as_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Pending:
    """Marks a field the C parser has checked but not built yet (see ``SipMessage``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Any = _Pending()
# What the C parser leaves in a deferred field of From / To (and PENDING for the Via):
# the marker itself tells the parse's _source which value to build, so a copy works too.
PENDING_FROM: Any = _Pending()
PENDING_TO: Any = _Pending()


class SipURI(_Value):
    """A parsed sip:, sips: or tel: URI (RFC 3261 §19.1.1, RFC 3966)."""

    __slots__ = ("headers", "host", "params", "password", "port", "raw", "scheme", "user")

    scheme: str  # "sip", "sips" or "tel", lower-case
    user: str | None  # as written (escapes not resolved); tel: the number
    password: str | None
    host: str  # as written; IPv6 references keep their brackets; tel: ""
    port: int | None
    params: dict[str, str | None]  # names lower-cased; a flag parameter maps to None
    headers: dict[str, str]  # ?name=value part
    raw: str  # the URI text exactly as given


class NameAddr(_Value):
    """From / To / Route style value: ``"Display" <uri>;params`` (RFC 3261 §20.20)."""

    __slots__ = ("_display", "_params", "_source", "tag", "uri")
    _fields = ("display", "params", "tag", "uri")

    _display: Any  # unquoted display name (str), None, or a _Pending marker (C parser)
    uri: str  # the URI text (without <>)
    tag: str | None  # the tag parameter
    _params: Any  # the params dict, or a _Pending marker (C parser)
    _source: Any  # what builds a PENDING _params (C parser only)

    @property
    def params(self) -> dict[str, str | None]:
        """Header parameters (tag included), names lower-cased.

        The C parser checks them while parsing and captures ``tag``, but builds the
        dict on first read (see ``SipMessage``); the twin assigns it.
        """
        value = self._params
        if value.__class__ is _Pending:
            value = self._params = self._source.params_of(value)
        result: dict[str, str | None] = value
        return result

    @params.setter
    def params(self, value: dict[str, str | None]) -> None:
        self._params = value

    @property
    def display(self) -> str | None:
        """Unquoted display name, or None (built on first read by the C parser)."""
        value = self._display
        if value.__class__ is _Pending:
            value = self._display = self._source.display_of(value)
        result: str | None = value
        return result

    @display.setter
    def display(self, value: str | None) -> None:
        self._display = value


class Via(_Value):
    """One Via value (RFC 3261 §20.42, RFC 3581)."""

    __slots__ = (
        "_params",
        "_raw",
        "_source",  # what builds the PENDING fields (C parser only)
        "branch",
        "host",
        "port",
        "protocol",
        "received",
        "rport",
        "transport",
    )
    _fields = (
        "branch",
        "host",
        "params",
        "port",
        "protocol",
        "raw",
        "received",
        "rport",
        "transport",
    )

    protocol: str  # "SIP/2.0"
    transport: str  # upper-case: "UDP", "TCP", "TLS", ...
    host: str  # sent-by host (IPv6 with brackets)
    port: int | None  # sent-by port
    branch: str | None
    received: str | None
    rport: int | None  # the rport value; see params["rport"] for a bare flag
    _params: Any  # the params dict, or a _Pending marker (C parser)
    _raw: Any  # the raw str, or a _Pending marker (C parser)
    _source: Any

    @property
    def params(self) -> dict[str, str | None]:
        """All parameters, names lower-cased.

        The C parser checks them while parsing and captures branch, received and
        rport as it goes, but builds the dict on first read (see ``SipMessage``).
        """
        value = self._params
        if value.__class__ is _Pending:
            value = self._params = self._source.params_of(value)
        result: dict[str, str | None] = value
        return result

    @params.setter
    def params(self, value: dict[str, str | None]) -> None:
        self._params = value

    @property
    def raw(self) -> str:
        """The value exactly as received (built on first read by the C parser)."""
        value = self._raw
        if value.__class__ is _Pending:
            value = self._raw = self._source.raw_of(value)
        result: str = value
        return result

    @raw.setter
    def raw(self, value: str) -> None:
        self._raw = value


class CSeq(_Value):
    """CSeq value (RFC 3261 §20.16)."""

    __slots__ = ("method", "number")

    number: int
    method: str


class ContentType(_Value):
    """Content-Type value (RFC 3261 §20.15): media type plus parameters."""

    __slots__ = ("params", "raw", "subtype", "type")

    type: str  # lower-case, e.g. "text"
    subtype: str  # lower-case, e.g. "plain"
    params: dict[str, str]  # names lower-cased, values unquoted
    raw: str  # the full header value as received (D4 stores this)

    @property
    def mime(self) -> str:
        """``type/subtype`` in lower case."""
        return f"{self.type}/{self.subtype}"


class Contact(_Value):
    """One Contact value (RFC 3261 §20.10, RFC 3840, RFC 5626)."""

    __slots__ = ("display", "expires", "instance", "methods", "params", "q", "uri")

    display: str | None
    uri: str
    expires: int | None  # the expires parameter, if present and numeric
    q: float | None
    methods: tuple[str, ...] | None  # RFC 3840 methods="..." list, upper-case; None if absent
    instance: str | None  # +sip.instance value, unquoted
    params: dict[str, str | None]


# The headers a response copies from its request (RFC 3261 §8.2.6.2).
RESPONSE_COPIED: Final = frozenset({"via", "from", "to", "call-id", "cseq"})


class SipMessage(_Value):
    """Fields common to requests and responses.

    ``headers``, ``content_type``, ``contacts`` and ``allow`` are properties over
    private slots.  The C parser checks those headers while parsing (a bad one is
    still a ParseError from ``parse_message``) but builds their objects on first
    read, from ``_source``: a transaction retransmission, a response matched to a
    client transaction or a MESSAGE never reads Contact or Allow, and building the
    (name, value) list and the typed values eagerly was about a third of the C parse
    (bench/bench_parse.py).  The twin assigns them like any other field.
    """

    __slots__ = (
        "_allow",
        "_contacts",
        "_content_type",
        "_headers",
        "_source",  # what builds the PENDING fields (C parser only)
        "body",
        "call_id",
        "contact_star",
        "content_length",
        "cseq",
        "expires",
        "from_",
        "max_forwards",
        "to",
        "via",
    )
    _fields = (
        "headers",
        "body",
        "via",
        "from_",
        "to",
        "call_id",
        "cseq",
        "max_forwards",
        "expires",
        "content_type",
        "content_length",
        "contacts",
        "contact_star",
        "allow",
    )

    # Every header in order of appearance: (canonical lower-case full name, value).
    # Comma-joined values of list headers stay one entry here; typed fields split them.
    _headers: list[tuple[str, str]]
    body: bytes
    via: Via | None  # the top Via
    from_: NameAddr | None
    to: NameAddr | None
    call_id: str | None
    cseq: CSeq | None
    max_forwards: int | None
    expires: int | None
    _content_type: ContentType | None
    content_length: int | None
    _contacts: list[Contact]
    contact_star: bool  # Contact: *
    _allow: tuple[str, ...] | None  # upper-case methods; None if no Allow header
    _source: Any

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Every header in order: (canonical lower-case full name, value)."""
        value = self._headers
        if value is PENDING:
            value = self._headers = self._source.headers()
        return value

    @headers.setter
    def headers(self, value: list[tuple[str, str]]) -> None:
        self._headers = value

    @property
    def content_type(self) -> ContentType | None:
        value = self._content_type
        if value is PENDING:
            value = self._content_type = self._source.content_type()
        return value

    @content_type.setter
    def content_type(self, value: ContentType | None) -> None:
        self._content_type = value

    @property
    def contacts(self) -> list[Contact]:
        value = self._contacts
        if value is PENDING:
            value = self._contacts = self._source.contacts()
        return value

    @contacts.setter
    def contacts(self, value: list[Contact]) -> None:
        self._contacts = value

    @property
    def allow(self) -> tuple[str, ...] | None:
        """Upper-case methods of every Allow header; None if there is none."""
        value = self._allow
        if value is PENDING:
            value = self._allow = self._source.allow()
        return value

    @allow.setter
    def allow(self, value: tuple[str, ...] | None) -> None:
        self._allow = value

    def response_headers(self) -> list[tuple[str, str]]:
        """Every Via, From, To, Call-ID and CSeq in order: what a response copies
        (RFC 3261 §8.2.6.2).  Unlike ``headers`` it builds none of the others."""
        value = self._headers
        if value is PENDING:
            return self._source.response_headers()  # type: ignore[no-any-return]
        return [(name, v) for name, v in value if name in RESPONSE_COPIED]

    def get_header(self, name: str) -> str | None:
        """First value of a header (case-insensitive; compact forms accepted), or None."""
        from msilo.sip.headers import canonical_name

        key = canonical_name(name)
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def get_headers(self, name: str) -> list[str]:
        """Every value of a header, in order (case-insensitive; compact forms accepted)."""
        from msilo.sip.headers import canonical_name

        key = canonical_name(name)
        return [value for hname, value in self.headers if hname == key]


class SipRequest(SipMessage):
    """A parsed request: ``Method SP Request-URI SP SIP-Version`` (RFC 3261 §7.1)."""

    __slots__ = ("method", "uri", "version")

    method: str
    uri: str  # Request-URI text
    version: str

    is_request = True


class SipResponse(SipMessage):
    """A parsed response: ``SIP-Version SP Status-Code SP Reason-Phrase`` (RFC 3261 §7.2)."""

    __slots__ = ("reason", "status", "version")

    status: int
    reason: str
    version: str

    is_request = False
