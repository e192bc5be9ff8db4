"""Webhook templates: ``$user $domain $aor $device $provider $prid $param $count $from
$call_id $body`` (string.Template syntax, ``$$`` for a dollar sign), each value escaped for
where it lands: JSON string escapes in a JSON body, percent-encoding in a URL, no line breaks
and no non-ASCII (percent-encoded) in a header.  (The placeholder names follow Flexisip's
``external-push-uri`` idea.)"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from urllib.parse import quote

PLACEHOLDERS = (
    "user",
    "domain",
    "aor",
    "device",
    "provider",
    "prid",
    "param",
    "count",
    "from",
    "call_id",
    "body",
)

# Values for a template check at configuration load: every placeholder filled, with the
# characters that would break an unescaped JSON string or URL.
SAMPLE: dict[str, str] = {name: f'x"\\/ {name}' for name in PLACEHOLDERS} | {"count": "1"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TemplateError(ValueError):
    """A template that cannot work (an unknown placeholder, a lone ``$``)."""


def check_template(text: str) -> string.Template:
    """The compiled template, or TemplateError naming what is wrong."""
    template = string.Template(text)
    if not template.is_valid():
        raise TemplateError("has a lone $ (write $$ for a dollar sign, $name for a value)")
    unknown = sorted(set(template.get_identifiers()) - set(PLACEHOLDERS))
    if unknown:
        raise TemplateError(
            f"unknown placeholder ${unknown[0]} (known: {', '.join('$' + p for p in PLACEHOLDERS)})"
        )
    return template


def _json_escape(value: str) -> str:
    # The inside of a JSON string: a From with quotes or backslashes stays one string.
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _url_escape(value: str) -> str:
    return quote(value, safe="", errors="replace")


def _header_escape(value: str) -> str:
    # A header value is one line (RFC 9110 §5.5): a CR/LF from a SIP header must not
    # start a header of its own.  Non-ASCII (which httpx refuses in a header) is sent
    # percent-encoded as UTF-8.
    line = _CONTROL.sub(" ", value)
    if line.isascii():
        return line
    return "".join(c if c.isascii() else quote(c, safe="", errors="replace") for c in line)


def _fill(
    template: string.Template, values: Mapping[str, str], escape: Callable[[str], str]
) -> str:
    return template.safe_substitute({k: escape(v) for k, v in values.items()})


def render_json(template: string.Template, values: Mapping[str, str]) -> str:
    """``template`` with JSON-escaped values."""
    return _fill(template, values, _json_escape)


def render_url(template: string.Template, values: Mapping[str, str]) -> str:
    """``template`` with percent-encoded values."""
    return _fill(template, values, _url_escape)


def render_header(template: string.Template, values: Mapping[str, str]) -> str:
    """``template`` with values that cannot break the header line."""
    return _fill(template, values, _header_escape)
