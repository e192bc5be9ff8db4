"""msilo's settings: one frozen object built from a TOML file plus ``--set`` overrides.

Every key has a default (the admin guide's for the ``[msilo]`` parameters, D1),
is type-checked and validated at construction (D2).  Any problem raises
:class:`~msilo.errors.ConfigError` with one line that names the key and the rule,
e.g. ``msilo.check_time: must be an integer >= 1 (got 0)``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from msilo.errors import ConfigError
from msilo.log import redact_text, redact_url
from msilo.storage.pgurl import parse_pg_url
from msilo.transport.dns import parse_nameserver

MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")  # RFC 6838 §4.2
SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# RFC 3261 §7.3: header = field-name ":" value CRLF, field-name is a token.
HEADER_LINE = re.compile(r"^[!%'*+\-.0-9A-Z^_`a-z|~]+[ \t]*:[^\r\n]*\r\n$")
LISTEN = re.compile(r"^(udp|tcp|tls|wss|ws):(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(\d{1,5})$")
HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+)(?::(\d{1,5}))?$")
HEP_URL = re.compile(r"^udp:(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(\d{1,5})$")
ROUTE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
AVP = re.compile(r"^\$avp\(([A-Za-z0-9_.-]+)\)$")

DEFAULT_DB_URL = "sqlite:///msilo.db"


def _doc(text: str, check: Callable[[str, Any], Any] | None = None) -> dict[str, Any]:
    return {"doc": text, "check": check}


# ---- value checks: each takes (key, value) and returns the normalised value ----------------


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer (got {value!r})")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: must be an integer >= {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key}: must be an integer <= {maximum} (got {value})")
        return value

    return check


def _number(minimum: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number (got {value!r})")
        if value < minimum:
            raise ConfigError(f"{key}: must be a number >= {minimum} (got {value})")
        return float(value)

    return check


def _flag(key: str, value: Any) -> bool:
    # The admin guide writes flags as 0/1; TOML users write true/false: accept both.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key}: must be 0/1 or true/false (got {value!r})")


# Keys whose values are never echoed in an error message (issue 14, item 7).
_SECRET_KEYS = frozenset({"auth.secret", "msilo.db_url"})


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        shown = type(value).__name__ if key in _SECRET_KEYS else repr(value)
        raise ConfigError(f"{key}: must be a string (got {shown})")
    return value


def _opt_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    text = _str(key, value)
    return text or None


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings (got {value!r})")
    return tuple(value)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        text = _str(key, value)
        if text not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {text!r})")
        return text

    return check


def _identifier(key: str, value: Any) -> str:
    text = _str(key, value)
    if not SQL_IDENTIFIER.match(text):
        raise ConfigError(
            f"{key}: must be an SQL identifier (letters, digits, _; not starting with a digit; "
            f"at most 63 characters) (got {text!r})"
        )
    return text


def _port_ok(port: str | None) -> bool:
    return port is None or 1 <= int(port) <= 65535


def _listen(key: str, value: Any) -> tuple[str, ...]:
    items = _str_list(key, value)
    if not items:
        raise ConfigError(f"{key}: needs at least one listener such as 'udp:0.0.0.0:5060'")
    for item in items:
        match = LISTEN.match(item)
        if match is None or not _port_ok(match.group(3)):
            raise ConfigError(
                f"{key}: {item!r} must be udp:HOST:PORT, tcp:HOST:PORT, tls:HOST:PORT, "
                "ws:HOST:PORT or wss:HOST:PORT (IPv6 hosts in brackets, port 1-65535)"
            )
    return items


WS_PATH = re.compile(r"^/[!-~]*$")  # an absolute path of visible ASCII (RFC 3986 §3.3)
ORIGIN = re.compile(r"^https?://[^/\s]+$")  # RFC 6454 §6.1: scheme://host[:port]


def _ws_path(key: str, value: Any) -> str:
    text = _str(key, value)
    if not WS_PATH.match(text) or "?" in text or "#" in text:
        raise ConfigError(f"{key}: must be a path starting with / (no query) (got {text!r})")
    return text


def _origins(key: str, value: Any) -> tuple[str, ...]:
    items = _str_list(key, value)
    for item in items:
        if not ORIGIN.match(item):
            raise ConfigError(
                f"{key}: {item!r} must be an origin such as 'https://app.example.com' "
                "(scheme://host[:port], no path)"
            )
    return items


def _hostport(allow_empty: bool) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        text = _str(key, value)
        if not text and allow_empty:
            return text
        match = HOSTPORT.match(text)
        if match is None or not _port_ok(match.group(2)):
            raise ConfigError(f"{key}: must be HOST or HOST:PORT (got {text!r})")
        return text

    return check


def _http(key: str, value: Any) -> str:
    text = _str(key, value)
    if not text:
        return text
    match = HOSTPORT.match(text)
    if match is None or match.group(2) is None or not _port_ok(match.group(2)):
        raise ConfigError(f'{key}: must be HOST:PORT, or "" to disable (got {text!r})')
    return text


def _hep(key: str, value: Any) -> str:
    text = _str(key, value)
    if not text:
        return text
    match = HEP_URL.match(text)
    if match is None or not _port_ok(match.group(2)):
        raise ConfigError(f'{key}: must be udp:HOST:PORT, or "" for off (got {text!r})')
    return text


def _networks(key: str, value: Any) -> tuple[str, ...]:
    items = _str_list(key, value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f"{key}: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None
    return items


def _nameservers(key: str, value: Any) -> tuple[str, ...]:
    items = _str_list(key, value)
    ports: set[int] = set()
    for item in items:
        try:
            ports.add(parse_nameserver(item)[1])
        except ValueError:
            raise ConfigError(
                f"{key}: {item!r} is not a DNS server address (e.g. 10.0.0.2 or 127.0.0.1:5353)"
            ) from None
    if len(ports) > 1:
        raise ConfigError(f"{key}: every DNS server must use the same port")
    return items


def _media_types(key: str, value: Any) -> tuple[str, ...]:
    items = _str_list(key, value)
    for item in items:
        if not MEDIA_TYPE.match(item):
            raise ConfigError(f"{key}: {item!r} is not a type/subtype media type")
    return tuple(item.lower() for item in items)


def _route(key: str, value: Any) -> str:
    text = _str(key, value)
    if text and not ROUTE.match(text):
        raise ConfigError(f'{key}: must be "module:function" (got {text!r})')
    return text


def _db_url(key: str, value: Any) -> str:
    text = _str(key, value)
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if text.startswith(("postgres://", "postgresql://")):
        # One host or several (a primary and its standbys): see msilo.storage.pgurl.
        try:
            parse_pg_url(text)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc} (got {redact_url(text)!r})") from None
        return text
    if text.startswith("mysql://"):
        from msilo.storage.myurl import parse_my_url

        try:
            parse_my_url(text)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc} (got {redact_url(text)!r})") from None
        return text
    raise ConfigError(
        f"{key}: must be sqlite:///path/to/file.db, postgres://user@host:port/db or "
        f"mysql://user@host:port/db (got {redact_url(text)!r})"
    )


def _template(key: str, value: Any) -> str | None:
    from msilo.routing.templates import TemplateError, compile_template

    text = _opt_str(key, value)
    if text is not None:
        try:
            compile_template(text)
        except TemplateError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return text


def _header_template(name: str) -> Callable[[str, Any], str | None]:
    def check(key: str, value: Any) -> str | None:
        text = _template(key, value)
        if text is None:
            return None
        if not HEADER_LINE.match(text):
            raise ConfigError(
                f"{key}: must be one full header line ending in \\r\\n, "
                f'e.g. "{name}: ...\\r\\n" (got {text!r})'
            )
        if text.split(":", 1)[0].strip().lower() != name.lower():
            raise ConfigError(f"{key}: must be a {name} header line (got {text!r})")
        return text

    return check


def _sip_uri(templated: bool) -> Callable[[str, Any], str | None]:
    def check(key: str, value: Any) -> str | None:
        text = _template(key, value) if templated else _opt_str(key, value)
        if text is not None and not re.match(r"^sips?:\S+$", text, re.IGNORECASE):
            raise ConfigError(f"{key}: must be a sip: or sips: URI without spaces (got {text!r})")
        return text

    return check


def _avp(key: str, value: Any) -> str | None:
    text = _opt_str(key, value)
    if text is not None and not AVP.match(text):
        raise ConfigError(f"{key}: must be an AVP spec such as '$avp(snd_time)' (got {text!r})")
    return text


def _timezone(key: str, value: Any) -> str | None:
    text = _opt_str(key, value)
    if text is not None:
        try:
            zoneinfo.ZoneInfo(text)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{key}: must be an IANA time zone name such as 'Europe/Berlin' (got {text!r})"
            ) from None
    return text


def _algorithms(key: str, value: Any) -> tuple[str, ...]:
    items = _str_list(key, value)
    known = ("SHA-512-256", "SHA-256", "MD5")
    for item in items:
        if item not in known:
            raise ConfigError(f"{key}: {item!r} is not one of {', '.join(known)}")
    if not items:
        raise ConfigError(f"{key}: needs at least one algorithm")
    return items


# ---- sections ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: listeners, processes, mode and management endpoint."""

    listen: tuple[str, ...] = field(
        default=("udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"),
        metadata=_doc(
            "SIP listeners: `udp:HOST:PORT`, `tcp:HOST:PORT`, `tls:HOST:PORT`, and SIP over"
            " WebSocket (RFC 7118) `ws:HOST:PORT`, `wss:HOST:PORT` (TLS from `[tls]`)",
            _listen,
        ),
    )
    ws_path: str = field(
        default="/",
        metadata=_doc("the one path `ws:`/`wss:` listeners upgrade on (others get 404)", _ws_path),
    )
    ws_origins: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "WebSocket handshakes whose `Origin` is not in this list get 403 (e.g."
            ' `["https://app.example.com"]`); empty = any origin',
            _origins,
        ),
    )
    advertise: str = field(
        default="",
        metadata=_doc(
            "host[:port] put in Via/Contact when bound to 0.0.0.0 (empty: derived)", _hostport(True)
        ),
    )
    workers: int = field(
        default=0, metadata=_doc("worker processes; 0 = one per CPU", _int(0, 256))
    )
    mode: str = field(
        default="registrar",
        metadata=_doc(
            "`registrar` (msilo keeps the bindings) or `silo` (behind a proxy)",
            _choice("registrar", "silo"),
        ),
    )
    domains: tuple[str, ...] = field(
        default=(), metadata=_doc("domains we serve; empty = any", _str_list)
    )
    route: str = field(
        default="", metadata=_doc("custom route `module:function`; empty = default route", _route)
    )
    http: str = field(
        default="127.0.0.1:9060",
        metadata=_doc(
            'management HTTP `HOST:PORT` (/health, /stats, /metrics); "" disables', _http
        ),
    )
    log_level: str = field(
        default="info",
        metadata=_doc(
            "debug, info, warning or error", _choice("debug", "info", "warning", "error")
        ),
    )
    grace_period: float = field(
        default=10.0, metadata=_doc("seconds a graceful shutdown may take", _number(0.1))
    )
    trusted: tuple[str, ...] = field(
        default=(),
        metadata=_doc("silo mode: addresses/networks allowed to send (empty = anyone)", _networks),
    )
    sip_trace: bool = field(
        default=False,
        metadata=_doc(
            "log every SIP message whole, in and out (`event=sip_in`/`sip_out`, at info)", _flag
        ),
    )
    hep: str = field(
        default="",
        metadata=_doc(
            "send a HEP v3 copy of every SIP message to `udp:HOST:PORT` (Homer, heplify,"
            ' `sngrep -L`); "" = off',
            _hep,
        ),
    )
    hep_id: int = field(
        default=1,
        metadata=_doc("HEP capture agent id of this host", _int(0, 2**32 - 1)),
    )
    dns: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "DNS servers (ip or ip:port) for SRV and A/AAAA lookups of next hops named by host"
            " name (empty = the system's resolv.conf and hosts)",
            _nameservers,
        ),
    )

    @property
    def worker_count(self) -> int:
        """The number of workers to run (``workers``, or one per CPU when 0)."""
        return self.workers or (os.cpu_count() or 1)


@dataclass(frozen=True)
class MsiloConfig:
    """``[msilo]``: every OpenSIPS msilo parameter, same name, same meaning (D1 defaults)."""

    db_url: str = field(
        default=DEFAULT_DB_URL,
        repr=False,  # may hold a password
        metadata=_doc(
            "database: `sqlite:///path.db` (relative to the working directory) or "
            "`postgres://user:pass@host:port/db`; a primary and its standbys: "
            "`postgres://user:pass@h1:port,h2:port/db?target_session_attrs=read-write`; "
            "MySQL 8.0.4+ or MariaDB 10.6+: `mysql://user:pass@host:port/db`",
            _db_url,
        ),
    )
    db_table: str = field(default="silo", metadata=_doc("table of stored messages", _identifier))
    from_address: str | None = field(
        default=None,
        metadata=_doc(
            "From URI of the offline notification (pseudo-variables allowed); "
            "unset = no notification",
            _sip_uri(True),
        ),
    )
    contact_hdr: str | None = field(
        default=None,
        metadata=_doc(
            "Contact header line added to notifications, e.g. "
            '`"Contact: <sip:msilo@example.com>\\r\\n"`',
            _header_template("Contact"),
        ),
    )
    offline_message: str | None = field(
        default=None,
        metadata=_doc(
            "body of the offline notification (pseudo-variables allowed); unset = no notification",
            _template,
        ),
    )
    expired_message: str | None = field(
        default=None,
        metadata=_doc(
            "body of a notice from `from_address` to the sender of a message that expired"
            " undelivered ($tu = its recipient, $fu = the sender); unset = no notice",
            _template,
        ),
    )
    content_type_hdr: str | None = field(
        default=None,
        metadata=_doc(
            'Content-Type header line of the notification, e.g. `"Content-Type: text/plain\\r\\n"`',
            _header_template("Content-Type"),
        ),
    )
    reminder: str | None = field(
        default=None,
        metadata=_doc("From URI of reminder messages; unset = reminders off", _sip_uri(False)),
    )
    outbound_proxy: str | None = field(
        default=None,
        metadata=_doc(
            "next hop for every request msilo sends (notifications, dumps, reminders, relays)",
            _sip_uri(False),
        ),
    )
    expire_time: int = field(
        default=259200, metadata=_doc("maximum storage lifetime of a message, seconds", _int(1))
    )
    check_time: int = field(
        default=30,
        metadata=_doc("period of the delivery-lease and cleanup cycle, seconds", _int(1)),
    )
    send_time: int = field(
        default=0, metadata=_doc("period of the reminder cycle, seconds; 0 = off", _int(0))
    )
    clean_period: int = field(
        default=5,
        metadata=_doc("expired rows are deleted every clean_period check_time cycles", _int(1)),
    )
    use_contact: bool = field(
        default=True,
        metadata=_doc("send the notification to the sender's Contact (1) or From URI (0)", _flag),
    )
    sc_mid: str = field(default="mid", metadata=_doc("column: message id", _identifier))
    sc_from: str = field(default="src_addr", metadata=_doc("column: sender URI", _identifier))
    sc_to: str = field(default="dst_addr", metadata=_doc("column: recipient URI", _identifier))
    sc_uri_user: str = field(default="username", metadata=_doc("column: owner user", _identifier))
    sc_uri_host: str = field(default="domain", metadata=_doc("column: owner domain", _identifier))
    sc_body: str = field(default="body", metadata=_doc("column: body", _identifier))
    sc_ctype: str = field(default="ctype", metadata=_doc("column: content type", _identifier))
    sc_exp_time: str = field(default="exp_time", metadata=_doc("column: expiry time", _identifier))
    sc_inc_time: str = field(default="inc_time", metadata=_doc("column: arrival time", _identifier))
    sc_snd_time: str = field(
        default="snd_time", metadata=_doc("column: reminder send time", _identifier)
    )
    snd_time_avp: str | None = field(
        default=None,
        metadata=_doc(
            "custom route: AVP holding a `YYYYMMDDHHMMSS` send time, e.g. "
            '`$avp(snd_time)` (read from `ctx.avp["snd_time"]`)',
            _avp,
        ),
    )
    add_date: bool = field(
        default=True,
        metadata=_doc(
            "prefix text/plain bodies of delivered messages with the arrival date", _flag
        ),
    )
    max_messages: int = field(
        default=0, metadata=_doc("maximum stored messages per user; 0 = no limit", _int(0))
    )
    snd_time_hdr: str | None = field(
        default=None,
        metadata=_doc(
            "default route: request header carrying a `YYYYMMDDHHMMSS` send time (unset = off)",
            _opt_str,
        ),
    )
    transient_types: tuple[str, ...] = field(
        default=("application/im-iscomposing+xml",),
        metadata=_doc(
            "default route: media types relayed to an online user but never stored (an offline"
            " user's sender gets 480), e.g. typing indications; [] = store everything",
            _media_types,
        ),
    )
    timezone: str | None = field(
        default=None,
        metadata=_doc(
            "IANA zone for send times and the date prefix (unset = the host's)", _timezone
        ),
    )
    deliver_to: str = field(
        default="all",
        metadata=_doc(
            "`all`: every device of the user gets each stored message once; `first`: the"
            " OpenSIPS behaviour, the first device to answer 2xx takes it",
            _choice("all", "first"),
        ),
    )
    device_memory: int = field(
        default=2592000,
        metadata=_doc(
            "seconds a device (its +sip.instance, else its Contact URI) is remembered after"
            " its last REGISTER; messages stored meanwhile are kept for it",
            _int(0),
        ),
    )
    relay_timeout: float = field(
        default=5.0,
        metadata=_doc(
            "seconds to wait for a device to answer a relayed MESSAGE with 2xx before it is"
            " stored for the devices that have not and the sender gets 202",
            _number(0.1),
        ),
    )


@dataclass(frozen=True)
class RegistrarConfig:
    """``[registrar]``: binding lifetimes (RFC 3261 §10.3)."""

    default_expires: int = field(
        default=3600, metadata=_doc("expiry of a binding that asks for none, seconds", _int(1))
    )
    min_expires: int = field(
        default=60,
        metadata=_doc("shorter requested expiries get 423 Interval Too Brief", _int(1)),
    )
    max_expires: int = field(
        default=86400, metadata=_doc("longer requested expiries are cut to this", _int(1))
    )
    max_contacts: int = field(
        default=10,
        metadata=_doc(
            "bindings per address-of-record; a REGISTER that would exceed it gets 403 Too Many"
            " Contacts and changes nothing; 0 = no limit",
            _int(0),
        ),
    )
    write_behind: float = field(
        default=0.0,
        metadata=_doc(
            "seconds a refresh that changes only the expiry may wait to be written (answered"
            " from a read, written with the others of that time in one transaction); a crash"
            " forgets at most this much of refreshes (those bindings expire earlier; no message"
            " is lost); PostgreSQL only, other databases write through; 0 = write through",
            _number(0),
        ),
    )


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: digest authentication (RFC 3261 §22, RFC 8760)."""

    enabled: bool = field(default=False, metadata=_doc("challenge REGISTER", _flag))
    realm: str = field(
        default="", metadata=_doc("digest realm; empty = the first of server.domains", _str)
    )
    secret: str = field(
        default="", repr=False, metadata=_doc("HMAC key for nonces; the same on every host", _str)
    )
    nonce_expires: int = field(default=300, metadata=_doc("nonce lifetime, seconds", _int(1)))
    message: bool = field(default=False, metadata=_doc("also challenge MESSAGE", _flag))
    algorithms: tuple[str, ...] = field(
        default=("SHA-256", "MD5"),
        metadata=_doc("digest algorithms offered: SHA-512-256, SHA-256, MD5", _algorithms),
    )
    source_failures: int = field(
        default=10,
        metadata=_doc(
            "failed authentications per source address per failure_window (every worker and"
            " host together) before its requests needing auth are dropped unanswered for the"
            " rest of the window; 0 = no limit",
            _int(0),
        ),
    )
    user_failures: int = field(
        default=10,
        metadata=_doc(
            "failed authentications per user per failure_window after which only a source's"
            " first attempt in the window is judged (others get a fresh challenge); 0 = no"
            " limit",
            _int(0),
        ),
    )
    failure_window: int = field(
        default=600,
        metadata=_doc("seconds over which failed authentications are counted", _int(1)),
    )


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: certificate for `tls:` and `wss:` listeners."""

    certificate: str = field(default="", metadata=_doc("PEM certificate chain file", _str))
    private_key: str = field(default="", metadata=_doc("PEM private key file", _str))
    ca: str = field(default="", metadata=_doc("CA bundle to verify peers (optional)", _str))


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: protection against oversize requests and floods."""

    max_message_size: int = field(
        default=65536,
        metadata=_doc("largest request accepted, bytes; larger gets 513", _int(1024, 16 << 20)),
    )
    rate: int = field(
        default=0,
        metadata=_doc(
            "requests per second per source address, counted by each worker on its own (a"
            " source whose requests reach N workers may get up to N x rate); 0 = off",
            _int(0),
        ),
    )
    burst: int = field(
        default=0,
        metadata=_doc("token-bucket burst per source address, per worker; 0 = 2 x rate", _int(0)),
    )
    max_connections: int = field(
        default=10000,
        metadata=_doc("open TCP/TLS (and, apart, WS/WSS) connections per worker", _int(1)),
    )
    idle_timeout: int = field(
        default=3600,
        metadata=_doc("seconds before an idle TCP/TLS/WS connection is closed", _int(1)),
    )
    max_queue_delay: float = field(
        default=0.25,
        metadata=_doc(
            "overload: while the oldest unanswered request of a worker has waited this many"
            " seconds, or the requests still unread in its UDP sockets would have, new"
            " requests get 503 + Retry-After at once (0.2-0.3 keeps answers within T1 ="
            " 0.5 s on a host with steady latency); 0 = off",
            _number(0),
        ),
    )
    message_timeout: float = field(
        default=20.0,
        metadata=_doc(
            "seconds a TCP/TLS message may take to arrive whole (from its first byte; from the"
            " connection's opening for the first one); slower connections are closed",
            _number(0.1),
        ),
    )
    max_buffered: int = field(
        default=64 * 1024 * 1024,
        metadata=_doc(
            "bytes of incomplete TCP/TLS messages a worker holds; the connection that would"
            " exceed it is closed (each connection holds at most max_message_size)",
            _int(65536),
        ),
    )
    ws_ping: float = field(
        default=30.0,
        metadata=_doc(
            "seconds without a frame from a WebSocket client before it is pinged; one that"
            " does not answer within as long again is dropped; 0 = no pings",
            _number(0),
        ),
    )


# ---- [push]: RFC 8599 wake-up pushes (issue 16) ------------------------------------------

# A webhook header whose value is a credential: kept out of logs and check-config's output.
SECRET_HEADER = re.compile(r"(?i)auth|key|token|secret|cookie|signature|password")
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.1: a token

DEFAULT_WEBHOOK_BODY = (
    '{"user": "$user", "domain": "$domain", "aor": "$aor", "device": "$device",'
    ' "provider": "$provider", "prid": "$prid", "param": "$param", "count": $count,'
    ' "from": "$from", "call_id": "$call_id"}'
)


def _base_url(key: str, value: Any) -> str:
    from urllib.parse import urlsplit

    text = _str(key, value)
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query:
        raise ConfigError(
            f"{key}: must be an http(s) URL such as 'https://push.example.com' (got {text!r})"
        )
    return text.rstrip("/")


def _opt_base_url(key: str, value: Any) -> str:
    text = _str(key, value)
    return _base_url(key, text) if text else text


def _ca_file(key: str, value: Any) -> str:
    import ssl

    text = _str(key, value)
    if text:
        try:
            ssl.create_default_context(cafile=text)
        except FileNotFoundError:
            raise ConfigError(f"{key}: {text} does not exist") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key}: {text} is not a PEM CA bundle ({exc})") from None
    return text


def _key_file(loader: str) -> Callable[[str, Any], str]:
    """A check that the key file ``value`` names loads with ``msilo.push.keys.<loader>``
    (parsed at config load, so a broken key is named before the server starts)."""

    def check(key: str, value: Any) -> str:
        from msilo.push import keys

        text = _str(key, value)
        if text:
            try:
                getattr(keys, loader)(text)
            except keys.KeyFileError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        return text

    return check


_service_account = _key_file("load_service_account")
_p8 = _key_file("load_p8")


def _push_template(key: str, value: Any) -> str:
    from msilo.push.template import TemplateError, check_template

    text = _str(key, value)
    try:
        check_template(text)
    except TemplateError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return text


def _webhook_url(key: str, value: Any) -> str:
    from urllib.parse import urlsplit

    from msilo.push.template import SAMPLE, check_template, render_url

    text = _push_template(key, value)
    sample = urlsplit(render_url(check_template(text), SAMPLE))
    if text and (sample.scheme not in ("https", "http") or not sample.hostname):
        raise ConfigError(
            f"{key}: must be an http(s) URL (placeholders allowed), e.g. "
            f"'https://push.example.com/notify?to=$aor' (got {text!r})"
        )
    return text


def _webhook_headers(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{key}: must be a table of header = "value" (got {value!r})')
    items: list[tuple[str, str]] = []
    for name, text in value.items():
        if not HEADER_NAME.match(name):
            raise ConfigError(f"{key}: {name!r} is not a header name")
        if not isinstance(text, str):
            raise ConfigError(f"{key}.{name}: must be a string")
        items.append((name, _push_template(f"{key}.{name}", text)))
    return tuple(items)


def secret_header(name: str) -> bool:
    """True for a webhook header whose value is a credential (Authorization, X-Api-Key...)."""
    return SECRET_HEADER.search(name) is not None


@dataclass(frozen=True)
class FcmConfig:
    """``[push.fcm]``: Firebase Cloud Messaging HTTP v1, OAuth 2 with a service account."""

    service_account: str = field(
        default="",
        metadata=_doc(
            "path of the service account's JSON key (Firebase console: Project settings,"
            " Service accounts, Generate new private key); required",
            _service_account,
        ),
    )
    project_id: str = field(
        default="",
        metadata=_doc("Firebase project id; empty = the service account's project_id", _str),
    )
    endpoint: str = field(
        default="https://fcm.googleapis.com",
        metadata=_doc("FCM base URL (`…/v1/projects/{project_id}/messages:send`)", _base_url),
    )
    token_endpoint: str = field(
        default="",
        metadata=_doc(
            "OAuth 2 token URL; empty = the key's token_uri, else"
            " https://oauth2.googleapis.com/token",
            _opt_base_url,
        ),
    )
    ca_file: str = field(
        default="",
        metadata=_doc("PEM CA bundle to trust instead of the system's (tests)", _ca_file),
    )
    timeout: float = field(
        default=5.0, metadata=_doc("seconds one HTTP request may take", _number(0.05))
    )


@dataclass(frozen=True)
class ApnsConfig:
    """``[push.apns]``: Apple Push Notification service, HTTP/2 with token (JWT) auth."""

    key_file: str = field(
        default="",
        metadata=_doc("path of the `.p8` token-signing key (Apple Developer: Keys); required", _p8),
    )
    key_id: str = field(default="", metadata=_doc("the key's 10-character Key ID; required", _str))
    team_id: str = field(default="", metadata=_doc("the Apple Team ID; required", _str))
    topic: str = field(
        default="",
        metadata=_doc(
            "`apns-topic` (the app's bundle id) when a device's pn-param gives none", _str
        ),
    )
    endpoint: str = field(
        default="https://api.push.apple.com",
        metadata=_doc(
            "APNs base URL (https://api.sandbox.push.apple.com for development builds)",
            _base_url,
        ),
    )
    push_type: str = field(
        default="alert",
        metadata=_doc(
            "`alert` (a visible notification) or `background` (content-available, wakes the"
            " app silently; Apple throttles these); a `.voip` pn-param sends `voip`",
            _choice("alert", "background"),
        ),
    )
    ttl: int = field(
        default=86400,
        metadata=_doc(
            "seconds APNs keeps trying to reach a device that is off (`apns-expiration`)",
            _int(0),
        ),
    )
    ca_file: str = field(
        default="",
        metadata=_doc("PEM CA bundle to trust instead of the system's (tests)", _ca_file),
    )
    timeout: float = field(
        default=5.0, metadata=_doc("seconds one HTTP request may take", _number(0.05))
    )


@dataclass(frozen=True)
class WebhookConfig:
    """``[push.webhook]``: one HTTP request per push to a URL of yours (a push gateway, a
    chat bridge, an SMS fallback)."""

    url: str = field(
        default="",
        metadata=_doc(
            "URL template, e.g. `https://gw.example.com/push?to=$aor`; placeholders `$user"
            " $domain $aor $device $provider $prid $param $count $from $call_id $body`"
            " (percent-encoded); required",
            _webhook_url,
        ),
    )
    method: str = field(
        default="POST",
        metadata=_doc(
            "POST, PUT, PATCH or GET (GET sends no body)", _choice("POST", "PUT", "PATCH", "GET")
        ),
    )
    body: str = field(
        default=DEFAULT_WEBHOOK_BODY,
        metadata=_doc(
            'JSON body template, same placeholders (JSON-escaped: write `"$from"`, and'
            " `$count` bare); not JSON only with a non-JSON Content-Type in headers",
            _push_template,
        ),
    )
    headers: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=_doc(
            'extra request headers, a table: `{ Authorization = "Bearer …" }` (placeholders'
            " allowed; credentials are never printed)",
            _webhook_headers,
        ),
    )
    ca_file: str = field(
        default="",
        metadata=_doc("PEM CA bundle to trust instead of the system's (tests)", _ca_file),
    )
    timeout: float = field(
        default=5.0, metadata=_doc("seconds one HTTP request may take", _number(0.05))
    )

    def header(self, name: str) -> str | None:
        """The configured value of header ``name`` (any case), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


# The [push.NAME] tables, by pn-provider name (RFC 8599 §4.1): present = enabled.
PUSH_TABLES: dict[str, type] = {"fcm": FcmConfig, "apns": ApnsConfig, "webhook": WebhookConfig}


def _table(name: str) -> dict[str, Any]:
    return {"doc": f"[push.{name}]", "check": None, "table": PUSH_TABLES[name]}


@dataclass(frozen=True)
class PushConfig:
    """``[push]``: wake a sleeping device when a message is stored for it (RFC 8599)."""

    coalesce: float = field(
        default=10.0,
        metadata=_doc(
            "seconds: at most one push per device in this window, carrying the count of"
            " waiting messages",
            _number(0),
        ),
    )
    include_body: bool = field(
        default=False,
        metadata=_doc(
            "put the message text in the push (it then passes through the push service)",
            _flag,
        ),
    )
    max_attempts: int = field(
        default=3,
        metadata=_doc(
            "tries per push when the service answers 429/5xx or times out (exponential back-off)",
            _int(1, 10),
        ),
    )
    fcm: FcmConfig | None = field(default=None, metadata=_table("fcm"))
    apns: ApnsConfig | None = field(default=None, metadata=_table("apns"))
    webhook: WebhookConfig | None = field(default=None, metadata=_table("webhook"))

    @property
    def providers(self) -> tuple[str, ...]:
        """The pn-provider names enabled (``Feature-Caps: +sip.pns=``, RFC 8599 §5)."""
        return tuple(name for name in PUSH_TABLES if getattr(self, name) is not None)


def _finish_push(push: PushConfig) -> PushConfig:
    """Required keys of the tables present, and the defaults read from the key files."""
    from dataclasses import replace

    from msilo.push.keys import load_service_account

    fcm, apns, webhook = push.fcm, push.apns, push.webhook
    if fcm is not None:
        if not fcm.service_account:
            raise ConfigError("push.fcm.service_account: must be set when [push.fcm] is present")
        account = load_service_account(fcm.service_account)  # checked by _service_account
        project = fcm.project_id or account.project_id
        if not project:
            raise ConfigError(
                "push.fcm.project_id: must be set (the service account names no project_id)"
            )
        fcm = replace(
            fcm, project_id=project, token_endpoint=fcm.token_endpoint or account.token_uri
        )
    if apns is not None:
        for key in ("key_file", "key_id", "team_id"):
            if not getattr(apns, key):
                raise ConfigError(f"push.apns.{key}: must be set when [push.apns] is present")
    if webhook is not None:
        if not webhook.url:
            raise ConfigError("push.webhook.url: must be set when [push.webhook] is present")
        content_type = webhook.header("Content-Type")
        if webhook.method != "GET" and (content_type is None or "json" in content_type.lower()):
            import json

            from msilo.push.template import SAMPLE, check_template, render_json

            try:
                json.loads(render_json(check_template(webhook.body), SAMPLE))
            except ValueError:
                raise ConfigError(
                    "push.webhook.body: must be JSON once filled in (quote string placeholders:"
                    f' "$from"; or set a non-JSON Content-Type in headers) (got {webhook.body!r})'
                ) from None
    return replace(push, fcm=fcm, apns=apns, webhook=webhook)


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "msilo": MsiloConfig,
    "registrar": RegistrarConfig,
    "auth": AuthConfig,
    "tls": TLSConfig,
    "limits": LimitsConfig,
    "push": PushConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    msilo: MsiloConfig = field(default_factory=MsiloConfig)
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    push: PushConfig = field(default_factory=PushConfig)
    source: str | None = None  # the file it was read from, for messages

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str | None = None) -> Config:
        """Build and validate from a parsed TOML mapping; raise ConfigError on any problem."""
        sections: dict[str, Any] = {}
        for name, value in data.items():
            if name not in SECTIONS:
                raise ConfigError(f"{name}: unknown section (known: {', '.join(SECTIONS)})")
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: must be a table ([{name}])")
        for name, klass in SECTIONS.items():
            sections[name] = _build_section(name, klass, data.get(name, {}))
        sections["push"] = _finish_push(sections["push"])
        config = cls(**sections, source=source)
        config._check_cross_keys()
        return config

    def secrets(self) -> tuple[str, ...]:
        """Values never to print (logs redact them; URL passwords are redacted anyway)."""
        values = [self.auth.secret]
        if self.push.webhook is not None:
            values += [v for k, v in self.push.webhook.headers if secret_header(k)]
        return tuple(s for s in values if s)

    def table(self, section: str) -> Any:
        """The settings object of ``section`` as :func:`describe` names it (``"server"``,
        ``"push.fcm"``), or None for an optional table that is absent."""
        table: Any = self
        for name in section.split("."):
            table = getattr(table, name)
            if table is None:
                return None
        return table

    def route_search_path(self) -> tuple[str, ...]:
        """Where ``server.route``'s module is looked for after ``sys.path``: the
        configuration file's directory, then the working directory."""
        dirs: list[str] = []
        if self.source is not None:
            dirs.append(os.path.dirname(os.path.abspath(self.source)))
        cwd = os.getcwd()
        if cwd not in dirs:
            dirs.append(cwd)
        return tuple(dirs)

    def _check_cross_keys(self) -> None:
        m = self.msilo
        for key in ("offline_message", "expired_message"):
            if getattr(m, key) is not None and m.content_type_hdr is None:
                raise ConfigError(f"msilo.content_type_hdr: must be set when msilo.{key} is set")
        if m.expired_message is not None and m.from_address is None:
            raise ConfigError("msilo.from_address: must be set when msilo.expired_message is set")
        r = self.registrar
        if not r.min_expires <= r.default_expires <= r.max_expires:
            raise ConfigError(
                "registrar.default_expires: must lie between registrar.min_expires and "
                f"registrar.max_expires ({r.min_expires} <= {r.default_expires} <= "
                f"{r.max_expires} does not hold)"
            )
        uses_tls = any(item.startswith(("tls:", "wss:")) for item in self.server.listen)
        if uses_tls and not (self.tls.certificate and self.tls.private_key):
            raise ConfigError(
                "tls.certificate: tls.certificate and tls.private_key must be set for a tls: "
                "or wss: listener"
            )
        if self.auth.enabled and not self.auth.secret:
            raise ConfigError("auth.secret: must be set when auth.enabled is true")
        if self.auth.enabled and not (self.auth.realm or self.server.domains):
            raise ConfigError("auth.realm: must be set (or server.domains) when auth is enabled")


def _build_section(section: str, klass: type, values: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(klass)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        spec = known.get(key)
        if spec is None:
            raise ConfigError(
                f"{section}.{key}: unknown key (known in [{section}]: {', '.join(known)})"
            )
        table = spec.metadata.get("table")
        if table is not None:  # a sub-table such as [push.fcm]
            if not isinstance(value, Mapping):
                raise ConfigError(f"{section}.{key}: must be a table ([{section}.{key}])")
            kwargs[key] = _build_section(f"{section}.{key}", table, value)
            continue
        check = spec.metadata.get("check")
        kwargs[key] = check(f"{section}.{key}", value) if check else value
    return klass(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse one ``--set section.key=value``; the value is a TOML literal or else a string."""
    path, sep, raw = text.partition("=")
    section, dot, key = path.strip().partition(".")
    # A key of a sub-table is dotted: push.fcm.project_id=...
    if not sep or not dot or not section or not all(key.split(".")):
        raise ConfigError(
            f"--set {redact_text(text)!r}: must be section.key=value (e.g. server.workers=2)"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        # A bare word that is not valid TOML is taken as a string (DESIGN.md).
        value = raw
    return section, key, value


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (TOML; None = no file), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for item in overrides:
        section, key, value = parse_override(item)
        *tables, last = [section, *key.split(".")]
        table = data
        for depth, name in enumerate(tables):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                dotted = ".".join(tables[: depth + 1])
                raise ConfigError(f"{dotted}: must be a table ([{dotted}])")
        table[last] = value
    return Config.from_mapping(data, source=path)


def describe() -> list[tuple[str, str, Any, str]]:
    """Every key as (section, key, default, meaning), for docs and ``check-config``."""
    rows: list[tuple[str, str, Any, str]] = []

    def add(section: str, klass: type) -> None:
        tables = []
        for spec in fields(klass):
            if "table" in spec.metadata:
                tables.append((f"{section}.{spec.name}", spec.metadata["table"]))
                continue
            rows.append((section, spec.name, spec.default, spec.metadata.get("doc", "")))
        for name, table in tables:
            add(name, table)

    for section, klass in SECTIONS.items():
        add(section, klass)
    return rows
