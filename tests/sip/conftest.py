"""The ``parser`` fixture: every parser test runs on the C extension and on its pure-Python twin.

The C variant is skipped (with the reason) when the extension is not built; set
``MSILO_REQUIRE_EXTENSIONS=1`` (CI) to make that a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from msilo.sip import parser as selector


@dataclass(frozen=True)
class ParserImpl:
    """One implementation of the parser contract."""

    tag: str
    parse_message: Callable[..., Any]
    parse_uri: Callable[[Any], Any]
    normalize_aor: Callable[[Any], str]


PY = ParserImpl("py", selector.parse_message_py, selector.parse_uri_py, selector.normalize_aor_py)
C: ParserImpl | None = None
if selector._fastparse is not None:
    C = ParserImpl("c", selector.parse_message_c, selector.parse_uri_c, selector.normalize_aor_c)


def _params() -> list[Any]:
    params = [pytest.param(PY, id="py")]
    if C is not None:
        params.append(pytest.param(C, id="c"))
    elif os.environ.get("MSILO_REQUIRE_EXTENSIONS") == "1":
        params.append(
            pytest.param(
                None,
                id="c",
                marks=pytest.mark.xfail(
                    reason="msilo._fastparse is not built (MSILO_REQUIRE_EXTENSIONS=1)", strict=True
                ),
            )
        )
    else:
        params.append(
            pytest.param(
                None, id="c", marks=pytest.mark.skip(reason="msilo._fastparse is not built")
            )
        )
    return params


@pytest.fixture(params=_params())
def parser(request: pytest.FixtureRequest) -> ParserImpl:
    """Each implementation in turn (ids ``py`` and ``c``)."""
    return request.param  # type: ignore[no-any-return]
