"""``msilo migrate-config``: an OpenSIPS or Kamailio configuration script -> ``msilo.toml``.

The script is read, not run: comments (``#``, ``//``, ``/* */``) are dropped, Kamailio's
preprocessor is followed as far as it can be without running anything (``#!define``,
``#!ifdef``/``#!ifndef``/``#!else``/``#!endif``; other directives are noted and skipped),
and of the rest only the statements msilo has a counterpart for are converted:

* ``modparam("msilo", ...)``: every parameter of both modules, to ``[msilo]`` (or a comment
  saying why it has no equivalent);
* ``modparam("registrar", "default_expires"|"min_expires"|"max_expires"|"max_contacts", N)``
  to ``[registrar]``;
* ``modparam("tm", "fr_timer"|"fr_timeout", N)`` to ``msilo.relay_timeout``;
* ``listen=``/``socket=`` to ``server.listen`` (and ``advertise``/``as`` to
  ``server.advertise``).

Every value is checked as ``msilo check-config`` would check it: one msilo refuses is
written commented out with the reason, so the output always loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from msilo.config import SECTIONS, Config
from msilo.errors import ConfigError

# ---- reading the script ------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """A ``modparam(module, name, value)`` of the script."""

    line: int
    module: str
    name: str
    value: str | int
    text: str  # as written, on one line, for the comments


@dataclass(frozen=True)
class Assignment:
    """A global ``name = value`` of the script (``listen``, ``port``...)."""

    line: int
    name: str
    value: str


@dataclass
class Script:
    """What the reader found in the script."""

    statements: list[Statement] = field(default_factory=list)
    assignments: list[Assignment] = field(default_factory=list)
    directives: list[str] = field(default_factory=list)  # one note per preprocessor line
    kamailio_hints: list[str] = field(default_factory=list)


def _strip_comments(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The script with comments blanked (newlines kept, so line numbers hold) and its
    preprocessor lines (``#!...`` or ``!!...`` first on a line) taken out as (line, text)."""
    out: list[str] = []
    directives: list[tuple[int, str]] = []
    i, n, line = 0, len(text), 1
    at_line_start = True
    quote: str | None = None
    while i < n:
        c = text[i]
        if quote is not None:
            out.append(c)
            if c == "\\" and i + 1 < n and text[i + 1] != "\n":
                out.append(text[i + 1])
                i += 2
                continue
            if c == quote or c == "\n":  # an unclosed string ends at its line
                quote = None
            if c == "\n":
                line += 1
                at_line_start = True
            i += 1
            continue
        if at_line_start and c in " \t":
            out.append(c)
            i += 1
            continue
        if at_line_start and text.startswith(("#!", "!!"), i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            directives.append((line, text[i:end].strip()))
            i = end
            continue
        at_line_start = False
        if c == "\n":
            out.append(c)
            line += 1
            at_line_start = True
            i += 1
        elif c == "#" or text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            newlines = text.count("\n", i, end)
            out.append("\n" * newlines)
            line += newlines
            i = end
        else:
            if c in "\"'":
                quote = c
            out.append(c)
            i += 1
    return "".join(out), directives


_DIRECTIVE = re.compile(r"^(?:#!|!!)\s*([A-Za-z_]+)\s*(.*)$")


def _preprocess(
    lines: list[str], directives: list[tuple[int, str]], script: Script
) -> dict[str, str]:
    """Blank the lines of inactive ``#!ifdef`` branches; return the ``#!define``s."""
    defines: dict[str, str] = {}
    # Each open conditional: (taking its branch now, taking the enclosing one).
    stack: list[tuple[bool, bool]] = []
    active = True
    inactive_from: int | None = None
    for number, text in directives:
        match = _DIRECTIVE.match(text)
        word = match.group(1).lower() if match else ""
        rest = match.group(2).strip() if match else ""
        name = rest.split(None, 1)[0] if rest else ""
        was_active = active
        note = "skipped (not evaluated by migrate-config)"
        if word in ("include_file", "import_file"):
            note = "not followed: run msilo migrate-config on that file too"
        if word in ("ifdef", "ifndef"):
            taken = (name in defines) == (word == "ifdef")
            stack.append((taken, active))
            active = active and taken
            note = f"followed ({name} is {'' if name in defines else 'not '}defined)"
        elif word == "else" and stack:
            taken, outer = stack[-1]
            stack[-1] = (not taken, outer)
            active = outer and not taken
            note = "followed"
        elif word == "endif" and stack:
            _taken, active = stack.pop()
            note = "followed"
        elif word in ("define", "trydef", "redefine") and active:
            value = rest[len(name) :].strip()
            if word != "trydef" or name not in defines:
                defines[name] = value
            note = "followed"
        elif word == "undef" and active:
            defines.pop(name, None)
            note = "followed"
        elif word in ("kamailio", "ser", "openser", "all", "maxcompat"):
            note = "a compatibility-mode marker"
        elif not active:
            note = "in an inactive branch"
        if word in ("define", "trydef", "redefine", "undef") and not active:
            note = "in an inactive branch"
        script.kamailio_hints.append(f"line {number}: {_one_line(text, 60)}")
        script.directives.append(f"line {number}: {_one_line(text)} -- {note}")
        # Blank what the preprocessor would drop.
        if was_active and not active:
            inactive_from = number
        elif not was_active and active and inactive_from is not None:
            for k in range(inactive_from, number - 1):
                lines[k] = ""
            inactive_from = None
    if inactive_from is not None:
        for k in range(inactive_from, len(lines)):
            lines[k] = ""
    return defines


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<num>-?(?:0x[0-9A-Fa-f]+|\d+))
      | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[,()])
    )""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _modparams(text: str, defines: dict[str, str]) -> Iterator[Statement | str]:
    """Every ``modparam(...)`` of the (comment-free) text; a string for one not understood."""
    for match in re.finditer(r"\bmodparam\s*\(", text):
        line = text.count("\n", 0, match.start()) + 1
        pos = match.end()
        args: list[str | int] = []
        ok = False
        while len(args) <= 3:
            tok = _TOKEN.match(text, pos)
            if tok is None:
                break
            pos = tok.end()
            if tok.group("str") is not None:
                args.append(_unquote(tok.group("str")))
            elif tok.group("num") is not None:
                args.append(int(tok.group("num"), 0))
            elif tok.group("id") is not None:
                word = tok.group("id")
                value = defines.get(word)
                if value is None:
                    break
                inner = _TOKEN.fullmatch(value) if value else None
                if inner is not None and inner.group("str") is not None:
                    args.append(_unquote(inner.group("str")))
                elif inner is not None and inner.group("num") is not None:
                    args.append(int(inner.group("num"), 0))
                else:
                    args.append(value)
            elif tok.group("punct") == ")":
                ok = True
                break
        written = _one_line(text[match.start() : pos])
        if ok and len(args) == 3 and isinstance(args[0], str) and isinstance(args[1], str):
            yield Statement(line, args[0].lower(), args[1], args[2], written)
        else:
            yield f"line {line}: {written} -- not understood, skipped"


_GLOBAL = re.compile(
    r"^[ \t]*(listen|socket|port|alias|advertised_address|advertised_port)"
    r"[ \t]*=[ \t]*(.*?)[ \t;]*$",
    re.MULTILINE,
)


def read_script(text: str) -> Script:
    """Parse an opensips.cfg / kamailio.cfg as far as msilo needs it."""
    script = Script()
    clean, directives = _strip_comments(text)
    lines = clean.split("\n")
    defines = _preprocess(lines, directives, script)
    clean = "\n".join(lines)
    for item in _modparams(clean, defines):
        if isinstance(item, str):
            script.directives.append(item)
        else:
            script.statements.append(item)
    for match in _GLOBAL.finditer(clean):
        line = clean.count("\n", 0, match.start()) + 1
        script.assignments.append(Assignment(line, match.group(1), match.group(2)))
    for match in re.finditer(r"^[ \t]*(include_file|import_file)\b[ \t]*(.*?)[ \t]*$", clean, re.M):
        line = clean.count("\n", 0, match.start()) + 1
        script.directives.append(
            f"line {line}: {match.group(1)} {_one_line(match.group(2))} -- not followed:"
            " run msilo migrate-config on that file too"
        )
    if re.search(r"\brequest_route\b", clean):
        script.kamailio_hints.append("a request_route block")
    return script


# ---- converting --------------------------------------------------------------------------


@dataclass
class Item:
    """One line group of the output: a setting, or a comment about one that is not."""

    section: str
    key: str | None
    value: Any = None
    origin: str = ""  # "line N: modparam(...)" it comes from
    notes: list[str] = field(default_factory=list)
    disabled: str | None = None  # why it is written commented out

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


# msilo parameters both modules have, with the same name and meaning as ours.
SAME_NAME = (
    "db_table",
    "from_address",
    "contact_hdr",
    "offline_message",
    "content_type_hdr",
    "reminder",
    "outbound_proxy",
    "expire_time",
    "check_time",
    "send_time",
    "clean_period",
    "use_contact",
    "sc_mid",
    "sc_from",
    "sc_to",
    "sc_uri_user",
    "sc_uri_host",
    "sc_body",
    "sc_ctype",
    "sc_exp_time",
    "sc_inc_time",
    "sc_snd_time",
    "snd_time_avp",
    "add_date",
    "max_messages",
)

# Kamailio-only msilo parameters msilo has nothing to set for, and why.
NO_EQUIVALENT: dict[str, str] = {
    "extra_hdrs": "msilo has no setting for free-form extra headers on the requests it sends"
    " (the Contact of notifications is msilo.contact_hdr)",
    "extra_hdrs_avp": "msilo stores no extra headers with a message (a converted Kamailio"
    " table keeps its extra_hdrs column, unread)",
    "sc_stored_hdrs": "msilo neither reads nor writes Kamailio's stored-headers column"
    " (msilo db upgrade keeps it as it is)",
    "sc_status": "msilo tracks deliveries with leases, not a status column (msilo db upgrade"
    " keeps it as it is)",
    "add_contact": "msilo has no switch for a Contact on dumped messages (msilo.contact_hdr is"
    " the Contact of notifications)",
    "skip_notification_flag": "msilo runs no script, so there is no message flag: the"
    " offline notification is sent whenever from_address and offline_message are set",
}

REGISTRAR_KEYS = ("default_expires", "min_expires", "max_expires", "max_contacts")


def _use_mode(value: str | int) -> str:
    if str(value) == "1":
        return (
            "nothing to set: msilo always keeps the MESSAGE's Call-ID (the callid column) and"
            " delivers it with that Call-ID, as use_mode 1 does"
        )
    return (
        "no equivalent: msilo always delivers a stored message with the Call-ID it arrived"
        " with (use_mode 1); a fresh Call-ID per delivery (use_mode 0) is not offered"
    )


def _sc_callid(value: str | int) -> str:
    if value == "callid":
        return "nothing to set: msilo's Call-ID column is callid too"
    return (
        f"no equivalent: msilo's Call-ID column is always named callid; rename {value!r}"
        " to callid before msilo db upgrade"
    )


CONDITIONAL: dict[str, Callable[[str | int], str]] = {
    "use_mode": _use_mode,
    "sc_callid": _sc_callid,
}


def _db_url(item: Item, value: str | int) -> None:
    text = str(value)
    scheme = text.split(":", 1)[0].lower()
    if scheme in ("postgres", "postgresql", "mysql"):
        item.value = text
        return
    if scheme == "sqlite":
        # Kamailio's db_sqlite reads sqlite:///var/lib/x.db as the absolute /var/lib/x.db;
        # msilo's sqlite:/// URL is relative to its working directory (sqlite:////var/...
        # for an absolute path).
        path = text[len("sqlite://") :]
        item.value = "sqlite:///" + path
        item.notes.append(
            f"the old server's SQLite file {path}: msilo db upgrade adopts its table"
            + ("" if path.startswith("/") else " (relative to msilo's working directory)")
        )
        return
    item.value = text
    item.disabled = (
        f"{scheme}:// databases are not supported: msilo uses PostgreSQL, MySQL/MariaDB or SQLite"
    )


_PROTOCOLS = ("udp", "tcp", "tls", "sctp", "ws", "wss", "bin", "hep_udp", "hep_tcp", "smpp")


def _split_listen(text: str, default_port: int) -> tuple[list[str], str | None, list[str]]:
    """(msilo listeners, advertise HOST[:PORT] or None, notes) of one ``listen=`` value."""
    words = text.split()
    notes: list[str] = []
    if not words:
        return [], None, ["no address given: skipped"]
    if words[0].startswith("{"):
        return [], None, ["the socket = { ... } block form is not converted: skipped"]
    address = words[0].strip("\"'")
    advertise: str | None = None
    rest = words[1:]
    for k, word in enumerate(rest):
        if word.lower() in ("advertise", "as") and k + 1 < len(rest):
            advertise = rest[k + 1].strip("\"'")
    proto: str | None = None
    head, colon, tail = address.partition(":")
    if colon and head.lower() in _PROTOCOLS:
        proto, address = head.lower(), tail
    if address.startswith("("):
        return [], advertise, ["multi-homed (SCTP) addresses are not converted: skipped"]
    bracket = re.fullmatch(r"(\[[^\]]+\])(?::(\d+))?", address)
    if bracket:
        host, port = bracket.group(1), bracket.group(2)
    elif address.count(":") >= 2:
        host, port = f"[{address}]", None
    else:
        host, _, port_text = address.partition(":")
        port = port_text or None
    if host == "*":
        host = "0.0.0.0"
        notes.append("* (every address) written as 0.0.0.0")
    elif not re.fullmatch(r"[0-9.]+|\[[0-9A-Fa-f:.]+\]", host):
        notes.append(f"{host!r} is a name: msilo binds what it resolves to (put an address"
                     " here if it is an interface name)")  # fmt: skip
    if proto is None:
        protos = ["udp", "tcp"]
        notes.append("no protocol given: udp and tcp")
    elif proto in ("udp", "tcp", "tls"):
        protos = [proto]
    else:
        return [], advertise, [f"{proto}: listeners have no msilo equivalent: skipped"]
    out = []
    for p in protos:
        number = int(port) if port else (5061 if p == "tls" else default_port)
        out.append(f"{p}:{host}:{number}")
    return out, advertise, notes


def detect_dialect(script: Script) -> tuple[str, str]:
    """("kamailio"|"opensips", why)."""
    if script.kamailio_hints:
        return "kamailio", f"Kamailio syntax ({script.kamailio_hints[0]})"
    return "opensips", "no Kamailio preprocessor directive nor request_route"


def convert(text: str, dialect: str = "auto", source: str = "-") -> str:
    """The msilo.toml text for the script ``text`` (``dialect``: auto, kamailio, opensips)."""
    script = read_script(text)
    guessed = dialect == "auto"
    if guessed:
        dialect, why = detect_dialect(script)
    else:
        why = "as given with --from"
    items: list[Item] = []
    other_modules: dict[str, int] = {}
    msilo_seen = False
    relay: Item | None = None

    for st in script.statements:
        origin = f"line {st.line}: {st.text}"
        if st.module == "msilo":
            msilo_seen = True
            item = Item("msilo", st.name, st.value, origin)
            if st.name in SAME_NAME:
                pass
            elif st.name == "db_url":
                _db_url(item, st.value)
            elif st.name in NO_EQUIVALENT:
                item.key, item.notes = None, [f"no equivalent: {NO_EQUIVALENT[st.name]}"]
            elif st.name in CONDITIONAL:
                item.key, item.notes = None, [CONDITIONAL[st.name](st.value)]
            else:
                item.key, item.notes = None, ["not an OpenSIPS or Kamailio msilo parameter"
                                              " migrate-config knows: not converted"]  # fmt: skip
            items.append(item)
        elif st.module == "registrar" and st.name in REGISTRAR_KEYS:
            items.append(Item("registrar", st.name, st.value, origin))
        elif st.module == "tm" and st.name in ("fr_timer", "fr_timeout"):
            relay = Item("msilo", "relay_timeout", None, origin)
            _relay_timeout(relay, st.name, st.value, dialect, guessed=guessed)
        else:
            other_modules[st.module] = other_modules.get(st.module, 0) + 1
    if relay is not None:
        items.append(relay)
    if msilo_seen and not any(i.key == "sc_mid" for i in items):
        items.append(
            Item(
                "msilo",
                "sc_mid",
                "id",
                "not set in the script",
                [
                    "OpenSIPS's and Kamailio's scripts create the silo table with an id column;"
                    " msilo's default is mid"
                ],
            )
        )
    items.extend(_listeners(script))
    _later_wins(items)
    _check(items)
    return _render(items, script, dialect, why, source, other_modules)


def _relay_timeout(item: Item, name: str, value: str | int, dialect: str, *, guessed: bool) -> None:
    try:
        number = int(value)
    except ValueError:
        item.value = str(value)
        item.disabled = f"tm {name} {value!r} is not a number"
        return
    if name == "fr_timeout":
        item.value = float(number)
        item.notes.append("OpenSIPS's fr_timeout is in seconds")
    elif dialect == "kamailio":
        item.value = number / 1000
        item.notes.append("Kamailio's fr_timer is in milliseconds")
    elif guessed and number >= 1000:
        # A final-response timer of 1000 s or more is no timer of seconds: a Kamailio
        # script without Kamailio syntax (3.x and later count milliseconds).
        item.value = number / 1000
        item.notes.append(
            "read as milliseconds (Kamailio's unit): 1000 s or more is no fr_timer of seconds"
            " (give --from opensips to read it as seconds)"
        )
    else:
        item.value = float(number)
        item.notes.append(
            "OpenSIPS's fr_timer (1.x) is in seconds; Kamailio's in milliseconds"
            " (give --from kamailio if this is a Kamailio script)"
        )


def _listeners(script: Script) -> list[Item]:
    default_port = 5060
    for a in script.assignments:
        if a.name == "port" and a.value.strip().isdigit():
            default_port = int(a.value.strip())
    listens: list[str] = []
    origins: list[str] = []
    notes: list[str] = []
    advertise: list[tuple[str, str]] = []
    out: list[Item] = []
    adv_host = adv_port = None
    for a in script.assignments:
        origin = f"line {a.line}: {a.name}={_one_line(a.value)}"
        if a.name in ("listen", "socket"):
            found, adv, why = _split_listen(a.value, default_port)
            notes.extend(f"{origin}: {w}" for w in why)
            for listener in found:
                if listener.startswith("tls:"):
                    notes.append(
                        f"{origin}: {listener} left out: a tls: listener needs [tls]"
                        " certificate and private_key; set them, then add it to listen"
                    )
                elif listener not in listens:
                    listens.append(listener)
            if found:
                origins.append(origin)
            if adv:
                advertise.append((adv, origin))
        elif a.name == "advertised_address":
            adv_host = a.value.strip("\"'")
        elif a.name == "advertised_port":
            adv_port = a.value.strip("\"'")
        elif a.name == "alias":
            notes.append(
                f"{origin}: msilo answers for every domain unless server.domains lists them;"
                " add this one there to restrict it"
            )
    if listens or notes:
        item = Item("server", "listen" if listens else None, listens, "; ".join(origins), notes)
        if not listens:
            item.notes.append("no listener converted: msilo's default listen applies")
        out.append(item)
    if adv_host:
        advertise.insert(
            0, (f"{adv_host}:{adv_port}" if adv_port else adv_host, "advertised_address")
        )
    if advertise:
        chosen, origin = advertise[0]
        item = Item("server", "advertise", chosen, origin)
        if len({a for a, _ in advertise}) > 1:
            item.notes.append(
                "the script advertises several addresses; msilo advertises one: this, the first"
            )
        out.append(item)
    return out


def _later_wins(items: list[Item]) -> None:
    # Set twice, the later modparam counts (both servers apply them in order).
    last: dict[str, Item] = {}
    for item in items:
        if item.key is None:
            continue
        earlier = last.get(item.dotted)
        if earlier is not None:
            earlier.disabled = f"set again below ({item.origin.split(':', 1)[0]}): that one counts"
        last[item.dotted] = item


def _field_check(section: str, key: str) -> Callable[[str, Any], Any] | None:
    for spec in fields(SECTIONS[section]):
        if spec.name == key:
            check: Callable[[str, Any], Any] | None = spec.metadata.get("check")
            return check
    return None


def _check(items: list[Item]) -> None:
    """Check each value as msilo would; comment out those it refuses, then those the
    cross-key rules refuse, until the whole loads."""
    for item in items:
        if item.key is None or item.disabled is not None:
            continue
        check = _field_check(item.section, item.key)
        if check is None:
            item.disabled = "unknown to msilo"
            continue
        try:
            normalised = check(item.dotted, item.value)
        except ConfigError as exc:
            if not (isinstance(item.value, str) and re.fullmatch(r"-?\d+", item.value)):
                item.disabled = f"msilo refuses it: {exc}"
                continue
            try:  # the scripts take "10" for an int parameter
                normalised = check(item.dotted, int(item.value))
            except ConfigError:
                item.disabled = f"msilo refuses it: {exc}"
                continue
        item.value = list(normalised) if isinstance(normalised, tuple) else normalised
    for _ in range(len(items) + 1):
        live = [i for i in items if i.key is not None and i.disabled is None]
        data: dict[str, dict[str, Any]] = {}
        for i in live:
            data.setdefault(i.section, {})[i.key or ""] = i.value
        try:
            Config.from_mapping(data)
            return
        except ConfigError as exc:
            message = str(exc)
            named = message.split(":", 1)[0]
            victim = next((i for i in live if i.dotted == named), None)
            if victim is None:
                victim = next((i for i in live if i.dotted in message), None)
            if victim is None:  # pragma: no cover - every cross-key rule names a key
                raise
            victim.disabled = f"msilo refuses it: {message}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON's string escapes are TOML's basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def _render(
    items: list[Item],
    script: Script,
    dialect: str,
    why: str,
    source: str,
    other_modules: dict[str, int],
) -> str:
    name = "a Kamailio" if dialect == "kamailio" else "an OpenSIPS"
    out = [
        f"# msilo.toml written by `msilo migrate-config` from {source}",
        f"# read as {name} script: {why}.",
        "# Check it with `msilo check-config -c msilo.toml`. Lines commented out below did",
        "# not convert; each says why.",
    ]
    if script.directives:
        out.append("#")
        out.append("# Preprocessor and unreadable lines of the script:")
        out.extend(f"#   {d}" for d in script.directives)
    if other_modules:
        listed = ", ".join(f"{m} ({n})" for m, n in sorted(other_modules.items()))
        out.append("#")
        out.append(f"# Other parameters, not msilo's concern: {listed}.")
    out.append("#")
    out.append('# Behind an existing proxy, set [server] mode = "silo" (README: Migrating).')
    for section in SECTIONS:
        mine = [i for i in items if i.section == section]
        if not mine:
            continue
        out.append("")
        out.append(f"[{section}]")
        for item in mine:
            if item.origin:
                out.append(f"# {item.origin}")
            out.extend(f"# {note}" for note in item.notes)
            if item.key is None:
                continue
            line = f"{item.key} = {_toml_value(item.value)}"
            if item.disabled is not None:
                out.append(f"# {item.disabled}")
                out.append(f"# {line}")
            else:
                out.append(line)
    return "\n".join(_safe(line) for line in out) + "\n"


def _safe(line: str) -> str:
    # A comment must stay on its line: TOML allows no control characters in one.
    return re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", " ", line)


def migrate_config(path: str, dialect: str = "auto") -> str:
    """Read the script at ``path`` and return the msilo.toml text; ConfigError if unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return convert(text, dialect, path)
