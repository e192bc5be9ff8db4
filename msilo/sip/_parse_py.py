"""Pure-Python twin of ``msilo._fastparse``: the readable reference SIP parser.

Both implementations expose ``parse_message``, ``parse_uri`` and ``normalize_aor``
with the same results and the same exceptions (only ``msilo.errors`` classes ever
escape); ``tests/sip`` runs every parser test on both and checks that they agree on
generated and mutated messages.  The grammar quoted in comments is RFC 3261 §25.

Rules both implementations follow (the contract, beyond the grammar):

* Lines end with CRLF; a bare LF is tolerated as a line end (one trailing CR is
  dropped from each line).  CR/LF before the start line are skipped (§7.5).
* Folded lines (§7.3.1) are joined with one SP; header values are stripped of
  SP/HTAB on both ends.  Nothing else is stripped (``str.strip()`` would also eat
  Unicode spaces, which the C twin does not know about).
* Text is decoded as UTF-8 with ``surrogateescape``; every split happens on an ASCII
  delimiter, so decoding the whole head or a piece gives the same characters.
* Case folding is ASCII-only (header and parameter names, hosts, methods lists).
* Single-valued headers the server relies on (From, To, Call-ID, CSeq, Max-Forwards,
  Expires, Content-Length, Content-Type) appearing twice are a 400 (RFC 4475 §3.3.7,
  §3.3.8).  Generic parameter values keep their quotes; Content-Type parameters and
  ``+sip.instance`` are unquoted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from msilo.errors import (
    IncompleteURI,
    InvalidURI,
    MessageTooLarge,
    ParseError,
    UnsupportedURIScheme,
)
from msilo.sip.headers import COMPACT_FORMS
from msilo.sip.message import (
    Contact,
    ContentType,
    CSeq,
    NameAddr,
    SipRequest,
    SipResponse,
    SipURI,
    Via,
)

__all__ = ["MAX_MESSAGE_SIZE", "normalize_aor", "parse_message", "parse_uri", "route_uris"]

# Default size limit (RFC 3261 §18.1.1 only bounds UDP by the path MTU; 64 KiB is the
# largest datagram, and a stream message larger than that is abuse, not mail).
MAX_MESSAGE_SIZE = 65536

_SWS = " \t"
_CSEQ_MAX = 2**31 - 1  # §8.1.1.5: "MUST be less than 2**31"
_EXPIRES_MAX = 2**32 - 1  # §20.19: larger values are treated as 2**32-1
_PORT_MAX = 65535
_MAX_FORWARDS_MAX = 255  # §20.22

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
# The characters of an unquoted display-name: *(token LWS) (RFC 4475 §3.1.2.15).
_DISPLAY_TOKENS = re.compile(r"[A-Za-z0-9\-.!%*_+`'~ \t]*\Z")
# scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*\Z")
# Characters no URI may contain unescaped here: controls, SP, DEL, and the <>" that
# delimit it in a header (§25.1: they are neither reserved nor unreserved).
_URI_FORBIDDEN = re.compile(r'[\x00-\x20\x7f<>"]')
# hostname / IPv4address: we accept the characters, not the exact grammar; "_" is
# common in the wild.  IPv6reference = "[" IPv6address "]" (zone ids tolerated).
_HOST = re.compile(r"[A-Za-z0-9\-._]+\Z")
_IPV6_REF = re.compile(r"\[[A-Za-z0-9:.%]+\]\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ); we accept any
# DIGITS [ "." DIGITS ] and leave range checks to the registrar.
_QVALUE = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")
_HEX = re.compile(r"%([0-9A-Fa-f]{2})")

_SIP_SCHEMES = ("sip", "sips", "tel")
_UPPER = {c: c - 32 for c in range(ord("a"), ord("z") + 1)}
_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _lower(text: str) -> str:
    # ASCII-only, like the C twin: "İ".lower() would change the length.
    return text.lower() if text.isascii() else text.translate(_LOWER)


def _upper(text: str) -> str:
    return text.upper() if text.isascii() else text.translate(_UPPER)


def _number(text: str, limit: int, what: str, *, clamp: bool = False) -> int:
    """1*DIGIT as an int; over ``limit`` is clamped or a 400 (never int()'s surprises)."""
    if not _DIGITS.match(text):
        raise ParseError(f"{what} is not a number: {text!r}")
    significant = text.lstrip("0")
    # more than 10 significant digits is over every limit we use (and int() of a
    # huge digit string is slow, or refused past 4300 digits)
    if len(significant) > 10 or int(significant or "0") > limit:
        if clamp:
            return limit
        raise ParseError(f"{what} is too large: {text!r}")
    return int(significant or "0")


# --- quoted strings, lists and parameters ----------------------------------------------

# quoted-string = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# quoted-pair   = "\" (%x00-09 / %x0B-0C / %x0E-7F)


def _quoted_end(text: str, start: int) -> int:
    """Index just after the quoted string opening at ``start``; -1 if unterminated."""
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return -1


def _unquote(text: str) -> str:
    """The content of a quoted string with quoted-pairs resolved; other text unchanged."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if "\\" not in inner:
            return inner
        out = []
        i = 0
        while i < len(inner):
            c = inner[i]
            if c == "\\" and i + 1 < len(inner):
                i += 1
                c = inner[i]
            out.append(c)
            i += 1
        return "".join(out)
    return text


def _missing(labels: list[str]) -> ParseError:
    """400 naming every missing mandatory header, in the reason phrase too (the sender
    sees it: Kamailio's sanity module answers the same way)."""
    names = ", ".join(labels)
    plural = "s" if len(labels) > 1 else ""
    return ParseError(f"missing {names} header{plural}", reason=f"Missing {names}")


def _split(text: str, sep: str, *, first_only: bool = False) -> list[str]:
    """Split on ``sep`` outside quoted strings and ``<...>`` (RFC 3261 §7.3.1).

    ``Contact: "Doe, John" <sip:a@b;x=1,2>, <sip:c@d>`` holds two values.  An
    unterminated quote or angle bracket is a 400.
    """
    parts: list[str] = []
    begin = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            end = _quoted_end(text, i)
            if end < 0:
                raise ParseError("unterminated quoted string")
            i = end
            continue
        if c == "<":
            end = text.find(">", i + 1)
            if end < 0:
                raise ParseError("unterminated <")
            i = end + 1
            continue
        if c == sep:
            parts.append(text[begin:i])
            if first_only:
                return parts
            begin = i + 1
        i += 1
    parts.append(text[begin:])
    return parts


def _parse_params(text: str) -> dict[str, str | None]:
    """``*( SEMI generic-param )`` after the first SEMI; names lower-cased.

    generic-param = token [ EQUAL gen-value ]
    gen-value     = token / host / quoted-string
    An empty parameter (``;;``) is a 400, as RFC 4475 §3.1.2.1 requires.
    """
    params: dict[str, str | None] = {}
    for segment in _split(text, ";"):
        name, eq, value = segment.partition("=")
        name = name.strip(_SWS)
        if not name:
            raise ParseError(f"empty parameter in {text!r}")
        if not eq:
            params[_lower(name)] = None
            continue
        value = value.strip(_SWS)
        if not value:
            raise ParseError(f"parameter {name!r} has an empty value")
        if value[0] == '"':
            if _quoted_end(value, 0) != len(value):
                raise ParseError(f"parameter {name!r}: bad quoted string")
        elif " " in value or "\t" in value or '"' in value:
            raise ParseError(f"parameter {name!r}: bad value")
        params[_lower(name)] = value
    return params


# --- URIs ---------------------------------------------------------------------------


def _check_uri_chars(uri: str) -> None:
    if not uri:
        raise ParseError("empty URI")
    if _URI_FORBIDDEN.search(uri):
        raise ParseError(f"invalid character in URI {uri!r}")


def parse_uri(text: str) -> SipURI:
    """Parse a sip:, sips: or tel: URI (RFC 3261 §19.1.1, RFC 3966).

    Other schemes raise :class:`UnsupportedURIScheme` (416); malformed URIs raise
    :class:`InvalidURI` (400).
    """
    if not isinstance(text, str):
        raise InvalidURI("URI must be a str")
    if not text.isascii():
        # The C twin works on the UTF-8 bytes: a str that does not survive the
        # round trip (lone surrogates) is no URI either.
        try:
            canonical = text.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
        except UnicodeError:
            canonical = None
        if canonical != text:
            raise InvalidURI("URI is not valid text")
    try:
        _check_uri_chars(text)
    except ParseError as exc:
        raise InvalidURI(exc.detail) from None
    # SIP-URI  = "sip:" [ userinfo ] hostport uri-parameters [ headers ]
    # SIPS-URI = "sips:" [ userinfo ] hostport uri-parameters [ headers ]
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME.match(scheme):
        raise InvalidURI(f"no scheme in URI {text!r}")
    scheme = _lower(scheme)
    if scheme not in _SIP_SCHEMES:
        raise UnsupportedURIScheme(f"unsupported URI scheme {scheme!r}")
    uri = SipURI.__new__(SipURI)
    uri.scheme = scheme
    uri.raw = text
    uri.password = None
    uri.port = None
    uri.headers = {}
    if scheme == "tel":
        # telephone-uri = "tel:" telephone-subscriber *( ";" par )   (RFC 3966)
        number, semi, ptext = rest.partition(";")
        if not number:
            raise InvalidURI(f"tel: URI without a number {text!r}")
        uri.user = number
        uri.host = ""
        uri.params = _uri_params(ptext) if semi else {}
        return uri
    # userinfo = ( user / telephone-subscriber ) [ ":" password ] "@"
    # The user part may hold ";", "?" and ":" (user-unreserved), but never "@".
    user: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, pcolon, password = userinfo.partition(":")
        if not user:
            raise InvalidURI(f"empty user part in {text!r}")
        if pcolon:
            uri.password = password
    uri.user = user
    # headers = "?" header *( "&" header )
    rest, qmark, htext = rest.partition("?")
    if qmark:
        for item in htext.split("&"):
            if not item:
                continue
            hname, _, hvalue = item.partition("=")
            uri.headers[hname] = hvalue
    # uri-parameters = *( ";" uri-parameter )
    hostport, semi, ptext = rest.partition(";")
    uri.params = _uri_params(ptext) if semi else {}
    # hostport = host [ ":" port ];  IPv6reference = "[" IPv6address "]"
    if hostport.startswith("["):
        close = hostport.find("]")
        host, after = hostport[: close + 1], hostport[close + 1 :]
        if close < 0 or not _IPV6_REF.match(host):
            raise InvalidURI(f"bad IPv6 reference in {text!r}")
    else:
        host, pcolon2, port = hostport.partition(":")
        after = pcolon2 + port
        if not _HOST.match(host):
            raise InvalidURI(f"bad host in {text!r}")
    if after:
        if after[0] != ":":
            raise InvalidURI(f"bad host in {text!r}")
        try:
            uri.port = _number(after[1:], _PORT_MAX, "port")
        except ParseError as exc:
            raise InvalidURI(exc.detail) from None
    uri.host = host
    return uri


def _uri_params(text: str) -> dict[str, str | None]:
    # uri-parameter = transport-param / ... / other-param;  other-param = pname [ "=" pvalue ]
    params: dict[str, str | None] = {}
    for item in text.split(";"):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not name:
            raise InvalidURI(f"URI parameter without a name: {item!r}")
        params[_lower(name)] = value if eq else None
    return params


def _unescape(text: str) -> str:
    """Resolve %HH escapes (§19.1.4 compares users after unescaping); keep bad ones."""
    if "%" not in text:
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise InvalidURI("user part is not valid text") from None
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes((int(m.group(1), 16),)), raw)
    return raw.decode("utf-8", "surrogateescape")


def normalize_aor(uri: str | SipURI) -> str:
    """``user@host`` for an address-of-record (RFC 3261 §10.3, §19.1.4).

    The host is lower-cased and %-escapes in the user part resolved; the scheme,
    port, parameters and headers are dropped; the user's case is kept.  A URI
    without a user raises :class:`IncompleteURI` (484); a tel: URI names no
    address-of-record and raises :class:`UnsupportedURIScheme` (416).
    """
    if isinstance(uri, str):
        parsed = parse_uri(uri)
    elif isinstance(uri, SipURI):
        parsed = uri
    else:
        raise InvalidURI("normalize_aor() takes a str or a SipURI")
    if parsed.scheme == "tel":
        raise UnsupportedURIScheme("a tel: URI is not an address-of-record")
    if not parsed.user:
        raise IncompleteURI(f"no user part in {parsed.raw!r}")
    return f"{_unescape(parsed.user)}@{_lower(parsed.host)}"


# --- header values ---------------------------------------------------------------------


def _parse_name_addr(text: str, cls: type[NameAddr] | type[Contact]) -> NameAddr | Contact:
    """``( name-addr / addr-spec ) *( SEMI param )`` into ``cls`` (NameAddr or Contact).

    name-addr    = [ display-name ] LAQUOT addr-spec RAQUOT
    display-name = *(token LWS) / quoted-string
    An addr-spec without <> ends at the first ";" and may not hold "?" or ","
    (§20: such URIs MUST be enclosed in <>; RFC 4475 §3.1.2.13).
    """
    display: str | None = None
    if text.startswith('"'):
        end = _quoted_end(text, 0)
        if end < 0:
            raise ParseError("unterminated quoted display name")
        display = _unquote(text[:end])
        lt = end
        while lt < len(text) and text[lt] in _SWS:
            lt += 1
        if lt >= len(text) or text[lt] != "<":
            raise ParseError("quoted display name not followed by <")
    else:
        lt = -1
        for i, c in enumerate(text):
            if c in '<;"':
                if c == "<":
                    lt = i
                break
        if lt >= 0:
            tokens = text[:lt].rstrip(_SWS)
            if not _DISPLAY_TOKENS.match(tokens):
                raise ParseError(f"invalid display name {tokens!r}")
            display = tokens or None
    if lt >= 0:
        gt = text.find(">", lt + 1)
        if gt < 0:
            raise ParseError("unterminated <")
        uri = text[lt + 1 : gt]
        rest = text[gt + 1 :].lstrip(_SWS)
        if rest and rest[0] != ";":
            raise ParseError(f"unexpected text after >: {rest!r}")
        ptext = rest[1:] if rest else None
    else:
        uri, semi, ptext_ = text.partition(";")
        uri = uri.rstrip(_SWS)
        ptext = ptext_ if semi else None
        if "?" in uri or "," in uri:
            raise ParseError(f"URI with ? or , must be enclosed in <>: {uri!r}")
    _check_uri_chars(uri)
    params = _parse_params(ptext) if ptext is not None else {}
    value = cls.__new__(cls)
    value.display = display
    value.uri = uri
    value.params = params
    return value


def route_uris(values: Iterable[str]) -> list[str]:
    """The URIs of Path, Route or Record-Route values, topmost first (RFC 3261 §20.34).

    Each value may hold several comma-separated ``name-addr``s (RFC 3327 §4); every one
    must be ``<uri>`` with a SIP or SIPS URI, else ``ParseError`` (a 400).
    """
    uris: list[str] = []
    for value in values:
        for part in _split(value, ","):
            text = part.strip(_SWS)
            if "<" not in text:  # name-addr only: an addr-spec would swallow the params
                raise ParseError(f"route value {text!r} is not <uri>")
            entry = _parse_name_addr(text, NameAddr)
            scheme = entry.uri.partition(":")[0].lower()
            if scheme not in ("sip", "sips"):
                raise ParseError(f"route URI {entry.uri!r} is not a SIP URI")
            parse_uri(entry.uri)
            uris.append(entry.uri)
    return uris


def _parse_from_to(text: str) -> NameAddr:
    value = _parse_name_addr(text, NameAddr)
    assert isinstance(value, NameAddr)
    value.tag = value.params.get("tag")
    return value


def _parse_contact(text: str) -> Contact:
    # contact-params = c-p-q / c-p-expires / contact-extension;  c-p-q = "q" EQUAL qvalue
    contact = _parse_name_addr(text, Contact)
    assert isinstance(contact, Contact)
    params = contact.params
    expires = params.get("expires")
    contact.expires = (
        _number(expires, _EXPIRES_MAX, "expires", clamp=True)
        if expires is not None and _DIGITS.match(expires)
        else None
    )
    q = params.get("q")
    contact.q = float(q) if q is not None and _QVALUE.match(q) else None
    # RFC 3840 §9: methods="INVITE,MESSAGE" (feature parameter, a quoted list)
    if "methods" not in params:
        contact.methods = None
    else:
        methods = params["methods"]
        contact.methods = () if methods is None else _method_list(_unquote(methods))
    # RFC 5626 §4.1: +sip.instance="<urn:uuid:...>"
    instance = params.get("+sip.instance")
    contact.instance = _unquote(instance) if instance is not None else None
    return contact


def _method_list(text: str) -> tuple[str, ...]:
    # Allow = "Allow" HCOLON [Method *(COMMA Method)]; empty items are skipped.
    items = (item.strip(_SWS) for item in text.split(","))
    return tuple(_upper(item) for item in items if item)


def _parse_via(text: str) -> Via:
    """The first via-parm of a Via value (RFC 3261 §20.42, RFC 3581).

    via-parm      = sent-protocol LWS sent-by *( SEMI via-params )
    sent-protocol = protocol-name SLASH protocol-version SLASH transport
    sent-by       = host [ COLON port ]
    SLASH and COLON allow SWS on both sides.
    """
    raw = _split(text, ",", first_only=True)[0].strip(_SWS)
    head, semi, ptext = raw.partition(";")
    match = _VIA_HEAD.match(head.rstrip(_SWS))
    if match is None:
        raise ParseError(f"malformed Via {raw!r}")
    name, version, transport, host, port = match.groups()
    if not (_HOST.match(host) or _IPV6_REF.match(host)):
        raise ParseError(f"bad Via host {host!r}")
    via = Via.__new__(Via)
    via.protocol = f"{_upper(name)}/{version}"
    via.transport = _upper(transport)
    via.host = host
    via.port = _number(port, _PORT_MAX, "Via port") if port is not None else None
    params = _parse_params(ptext) if semi else {}
    via.params = params
    via.branch = params.get("branch")
    via.received = params.get("received")
    rport = params.get("rport")
    via.rport = (
        int(rport)
        if rport is not None
        and _DIGITS.match(rport)
        and len(rport) <= 5
        and int(rport) <= _PORT_MAX
        else None
    )
    via.raw = raw
    return via


_TOKEN_CLASS = r"[A-Za-z0-9\-.!%*_+`'~]+"
_VIA_HEAD = re.compile(
    rf"({_TOKEN_CLASS})[ \t]*/[ \t]*({_TOKEN_CLASS})[ \t]*/[ \t]*({_TOKEN_CLASS})[ \t]+"
    r"(\[[^\]]*\]|[^ \t:\[\]]+)(?:[ \t]*:[ \t]*([0-9]+))?\Z"
)


def _parse_cseq(text: str) -> CSeq:
    # CSeq = "CSeq" HCOLON 1*DIGIT LWS Method
    number, sep, method = _split_lws(text)
    if not sep or not _TOKEN.match(method):
        raise ParseError(f"malformed CSeq {text!r}")
    cseq = CSeq.__new__(CSeq)
    cseq.number = _number(number, _CSEQ_MAX, "CSeq number")
    cseq.method = method
    return cseq


def _split_lws(text: str) -> tuple[str, str, str]:
    """Split at the first SP/HTAB run: (before, separator, after)."""
    for i, c in enumerate(text):
        if c in _SWS:
            return text[:i], c, text[i:].lstrip(_SWS)
    return text, "", ""


def _parse_content_type(text: str) -> ContentType:
    # media-type = m-type SLASH m-subtype *(SEMI m-parameter)
    head, semi, ptext = text.partition(";")
    mtype, slash, subtype = head.partition("/")
    mtype = mtype.strip(_SWS)
    subtype = subtype.strip(_SWS)
    if not slash or not _TOKEN.match(mtype) or not _TOKEN.match(subtype):
        raise ParseError(f"malformed Content-Type {text!r}")
    ctype = ContentType.__new__(ContentType)
    ctype.type = _lower(mtype)
    ctype.subtype = _lower(subtype)
    params = _parse_params(ptext) if semi else {}
    # m-value = token / quoted-string: the value a user agent means is unquoted
    ctype.params = {k: _unquote(v) if v is not None else "" for k, v in params.items()}
    ctype.raw = text
    return ctype


# --- the message ----------------------------------------------------------------------


def _head_end(buf: bytes, start: int) -> tuple[int, int]:
    """(end of the last header line, start of the body); the first empty line ends the head."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf < 0 and lf < 0:
        raise ParseError("no empty line after the headers")
    if lf < 0 or 0 <= crlf < lf:
        return crlf, crlf + 3
    return lf, lf + 2


def _check_version(version: str) -> None:
    # SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT  (case-insensitive, §7.1)
    if _upper(version) != "SIP/2.0":
        if _upper(version[:4]) == "SIP/":
            raise ParseError(
                f"unsupported version {version!r}", status=505, reason="Version Not Supported"
            )
        raise ParseError(f"bad SIP version {version!r}")


def _parse_request_line(line: str) -> SipRequest:
    # Request-Line = Method SP Request-URI SP SIP-Version CRLF
    # Exactly one SP between elements (RFC 4475 §3.1.2.8-10 reject the rest).
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise ParseError(f"malformed request line {line!r}")
    method, uri, version = parts
    if not _TOKEN.match(method):
        raise ParseError(f"bad method {method!r}")
    _check_version(version)
    _check_uri_chars(uri)
    scheme, colon, rest = uri.partition(":")
    if not colon or not _SCHEME.match(scheme):
        raise ParseError(f"bad Request-URI {uri!r}")
    scheme = _lower(scheme)
    if scheme not in _SIP_SCHEMES:
        # §8.2.2.1: 416 Unsupported URI Scheme
        raise UnsupportedURIScheme(f"unsupported Request-URI scheme {scheme!r}")
    # §19.1.1 table: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
    # The user part may hold "?" (user-unreserved), so look after the "@".
    if scheme != "tel" and "?" in rest[rest.find("@") + 1 :]:
        raise ParseError(f"headers in Request-URI {uri!r}")
    msg = SipRequest.__new__(SipRequest)
    msg.method = method
    msg.uri = uri
    msg.version = version
    return msg


def _parse_status_line(line: str) -> SipResponse:
    # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    _check_version(version)
    # Status-Code = 3DIGIT (1xx-6xx)
    if len(code) != 3 or not _DIGITS.match(code) or not "100" <= code <= "699":
        raise ParseError(f"bad status code {code!r}")
    msg = SipResponse.__new__(SipResponse)
    msg.version = version
    msg.status = int(code)
    msg.reason = reason
    return msg


def _header_lines(lines: list[str]) -> list[tuple[str, str]]:
    """(canonical name, unfolded value) for each header line (§7.3.1)."""
    # message-header = field-name HCOLON field-value;  HCOLON = *( SP / HTAB ) ":" SWS
    headers: list[tuple[str, str]] = []
    name: str | None = None
    value = ""
    for line in lines:
        if line.endswith("\r"):
            line = line[:-1]
        if line[:1] == " " or line[:1] == "\t":
            # LWS = [*WSP CRLF] 1*WSP: a folded line continues the value, as one SP
            if name is None:
                raise ParseError("continuation line before the first header")
            value = value.rstrip(_SWS) + " " + line.strip(_SWS)
            continue
        if name is not None:
            headers.append((name, value.strip(_SWS)))
        colon = line.find(":")
        if colon < 0:
            raise ParseError(f"header line without a colon: {line[:40]!r}")
        field = line[:colon].rstrip(_SWS)
        if not _TOKEN.match(field):
            raise ParseError(f"bad header name {field[:40]!r}")
        name = field.lower()
        if len(name) == 1:
            name = COMPACT_FORMS.get(name, name)
        value = line[colon + 1 :]
    if name is not None:
        headers.append((name, value.strip(_SWS)))
    return headers


def parse_message(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_MESSAGE_SIZE
) -> SipRequest | SipResponse:
    """Parse one SIP request or response (RFC 3261 §7) from a datagram or a framed buffer.

    Raises :class:`ParseError` (400, or 505 for a foreign SIP version),
    :class:`UnsupportedURIScheme` (416) or :class:`MessageTooLarge` (513).
    """
    if isinstance(data, bytes):
        buf = data
    elif isinstance(data, bytearray | memoryview):
        try:
            buf = bytes(data)
        except (TypeError, ValueError, BufferError) as exc:
            raise ParseError(f"unreadable buffer: {exc}") from None
    else:
        raise ParseError(f"expected bytes, got {type(data).__name__}")
    size = len(buf)
    if size > max_size:
        raise MessageTooLarge(f"message of {size} bytes exceeds {max_size}")
    # §7.5: ignore CRLFs before the start line (keep-alives on streams)
    start = 0
    while start < size and buf[start] in (10, 13):
        start += 1
    if start == size:
        raise ParseError("empty message")
    head_end, body_start = _head_end(buf, start)
    lines = buf[start:head_end].decode("utf-8", "surrogateescape").split("\n")
    first = lines[0][:-1] if lines[0].endswith("\r") else lines[0]
    msg: SipRequest | SipResponse
    msg = _parse_status_line(first) if _upper(first[:4]) == "SIP/" else _parse_request_line(first)
    headers = _header_lines(lines[1:])
    _fill(msg, headers)
    # §18.3: Content-Length frames the body; on a datagram its absence means "the rest"
    available = size - body_start
    length = msg.content_length
    if length is None:
        msg.body = buf[body_start:]
    elif length > available:
        raise ParseError(f"Content-Length {length} exceeds the {available} bytes received")
    else:
        msg.body = buf[body_start : body_start + length]
    return msg


def _single(current: object, name: str) -> None:
    if current is not None:
        raise ParseError(f"more than one {name} header")


def _fill(msg: SipRequest | SipResponse, headers: list[tuple[str, str]]) -> None:
    """Set the typed fields from the header list and run the §8.2.2 checks."""
    msg.headers = headers
    msg.via = msg.from_ = msg.to = msg.cseq = msg.content_type = None
    msg.call_id = None
    msg.max_forwards = msg.expires = msg.content_length = None
    msg.allow = None
    contacts: list[Contact] = []
    star = False
    for name, value in headers:
        if name == "via":
            if msg.via is None:
                msg.via = _parse_via(value)
        elif name == "from":
            _single(msg.from_, "From")
            msg.from_ = _parse_from_to(value)
        elif name == "to":
            _single(msg.to, "To")
            msg.to = _parse_from_to(value)
        elif name == "call-id":
            _single(msg.call_id, "Call-ID")
            # Call-ID = word [ "@" word ]: opaque, but never empty or spaced
            if not value or " " in value or "\t" in value:
                raise ParseError(f"bad Call-ID {value!r}")
            msg.call_id = value
        elif name == "cseq":
            _single(msg.cseq, "CSeq")
            msg.cseq = _parse_cseq(value)
        elif name == "max-forwards":
            _single(msg.max_forwards, "Max-Forwards")
            msg.max_forwards = _number(value, _MAX_FORWARDS_MAX, "Max-Forwards")
        elif name == "expires":
            _single(msg.expires, "Expires")
            msg.expires = _number(value, _EXPIRES_MAX, "Expires", clamp=True)
        elif name == "content-length":
            _single(msg.content_length, "Content-Length")
            msg.content_length = _number(value, _CSEQ_MAX, "Content-Length")
        elif name == "content-type":
            _single(msg.content_type, "Content-Type")
            msg.content_type = _parse_content_type(value)
        elif name == "contact":
            # Contact = ("*" / (contact-param *(COMMA contact-param)))
            if value == "*":
                if star or contacts:
                    raise ParseError("Contact: * mixed with other contacts")
                star = True
                continue
            if star:
                raise ParseError("Contact: * mixed with other contacts")
            for item in _split(value, ","):
                item = item.strip(_SWS)
                if not item or item == "*":
                    raise ParseError(f"bad Contact list {value!r}")
                contacts.append(_parse_contact(item))
        elif name == "allow":
            msg.allow = (msg.allow or ()) + _method_list(value)
        elif name == "date" and not value.endswith(" GMT"):
            # §20.17: rfc1123-date is always "GMT" (RFC 4475 §3.1.2.12 rejects others)
            raise ParseError(f"Date not in GMT: {value!r}")
    msg.contacts = contacts
    msg.contact_star = star
    # §8.2.2 / §16.3: To, From, Call-ID, CSeq and Via are mandatory (RFC 4475 §3.3.1)
    missing = [
        label
        for field, label in (
            (msg.to, "To"),
            (msg.from_, "From"),
            (msg.call_id, "Call-ID"),
            (msg.cseq, "CSeq"),
            (msg.via, "Via"),
        )
        if field is None
    ]
    if missing:
        raise _missing(missing)
    if isinstance(msg, SipRequest) and msg.cseq is not None and msg.cseq.method != msg.method:
        # §8.1.1.5: the CSeq method MUST match the request (RFC 4475 §3.1.2.17)
        raise ParseError(f"CSeq method {msg.cseq.method!r} does not match {msg.method!r}")
