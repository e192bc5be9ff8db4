"""Pseudo-variable templates, as in OpenSIPS's PV format strings.

``from_address``, ``offline_message``, ``content_type_hdr`` and ``contact_hdr``
are compiled once at start-up (an unknown variable stops the server there, D2)
and expanded per request against a mapping of variable values.

Supported: ``$rU $rd $rp $ru $ou $fU $fd $fu $fn $tU $td $tu $tn $ci $cs $rm $si $sp
$Ri $Rp $ua $ct $avp(name)`` and ``$$`` for a literal dollar sign.  A ``$`` that
starts none of these is a compile error, never a silent literal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# Variable name -> what it expands to (documentation, and the set of valid names).
VARIABLES: dict[str, str] = {
    "rU": "user of the Request-URI",
    "rd": "host of the Request-URI",
    "rp": "port of the Request-URI",
    "ru": "the Request-URI",
    "ou": "the original Request-URI",
    "fU": "user of the From URI",
    "fd": "host of the From URI",
    "fu": "the From URI",
    "fn": "display name of From",
    "tU": "user of the To URI",
    "td": "host of the To URI",
    "tu": "the To URI",
    "tn": "display name of To",
    "ci": "Call-ID",
    "cs": "CSeq number",
    "rm": "request method",
    "si": "source IP address",
    "sp": "source port",
    "Ri": "IP address the request was received on",
    "Rp": "port the request was received on",
    "ua": "User-Agent header",
    "ct": "Contact header value",
}

_TOKEN = re.compile(r"\$(?:\$|avp\(([A-Za-z0-9_.-]+)\)|([A-Za-z]{2}))")


class TemplateError(ValueError):
    """A template refers to an unknown variable or is malformed."""


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: literal text and variable references, in order."""

    source: str
    parts: tuple[tuple[bool, str], ...]  # (is_variable, literal text or variable key)

    @property
    def variables(self) -> tuple[str, ...]:
        """Keys of the variables the template uses (``avp:name`` for AVPs)."""
        return tuple(text for is_var, text in self.parts if is_var)

    def expand(self, values: Mapping[str, str]) -> str:
        """Render with ``values`` (a missing variable expands to the empty string)."""
        return "".join(values.get(text, "") if is_var else text for is_var, text in self.parts)


def compile_template(source: str) -> Template:
    """Compile ``source``; raise TemplateError naming the first bad ``$`` reference."""
    parts: list[tuple[bool, str]] = []
    pos = 0
    literal: list[str] = []
    while True:
        dollar = source.find("$", pos)
        if dollar < 0:
            literal.append(source[pos:])
            break
        literal.append(source[pos:dollar])
        match = _TOKEN.match(source, dollar)
        if match is None or (match.group(2) is not None and match.group(2) not in VARIABLES):
            bad = source[dollar : dollar + 8]
            raise TemplateError(f"unknown pseudo-variable at {bad!r}")
        if match.group(0) == "$$":
            literal.append("$")
        else:
            if literal:
                parts.append((False, "".join(literal)))
                literal = []
            avp = match.group(1)
            parts.append((True, f"avp:{avp}" if avp is not None else match.group(2)))
        pos = match.end()
    text = "".join(literal)
    if text:
        parts.append((False, text))
    return Template(source, tuple(parts))
