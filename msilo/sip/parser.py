"""Picks the SIP parser implementation: the C extension, or its pure-Python twin.

``MSILO_NO_EXTENSIONS=1`` (or a missing extension) selects the twin.  Both are
always importable by explicit name (``parse_message_py`` / ``parse_message_c``)
for tests and benchmarks; ``IMPLEMENTATION`` says which one the public names are.
"""

from __future__ import annotations

import logging
import os

from msilo.sip import _parse_py

log = logging.getLogger("msilo.sip")

NO_EXTENSIONS = os.environ.get("MSILO_NO_EXTENSIONS", "") not in ("", "0")

parse_message_py = _parse_py.parse_message
parse_uri_py = _parse_py.parse_uri
normalize_aor_py = _parse_py.normalize_aor
# Path/Route values are read once per REGISTER or delivery, never per MESSAGE: one
# implementation serves both selections.
route_uris = _parse_py.route_uris

parse_message = parse_message_py
parse_uri = parse_uri_py
normalize_aor = normalize_aor_py
IMPLEMENTATION = "Python"

try:
    from msilo import _fastparse
except ImportError as exc:  # pragma: no cover - depends on the build
    _fastparse = None  # type: ignore[assignment]
    if not NO_EXTENSIONS:
        log.warning("event=parser_fallback impl=Python reason=%r", str(exc))
else:
    parse_message_c = _fastparse.parse_message
    parse_uri_c = _fastparse.parse_uri
    normalize_aor_c = _fastparse.normalize_aor
    if not NO_EXTENSIONS:
        parse_message = parse_message_c
        parse_uri = parse_uri_c
        normalize_aor = normalize_aor_c
        IMPLEMENTATION = "C"

__all__ = ["IMPLEMENTATION", "normalize_aor", "parse_message", "parse_uri", "route_uris"]
