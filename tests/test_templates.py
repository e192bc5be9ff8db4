"""Pseudo-variable templates used by notifications (D11)."""

from __future__ import annotations

import pytest

from msilo.routing.templates import TemplateError, compile_template


def test_expands_variables_and_literals() -> None:
    template = compile_template("User $rU@$rd is offline ($avp(why)) $$1")
    assert template.variables == ("rU", "rd", "avp:why")
    values = {"rU": "bob", "rd": "example.com", "avp:why": "away"}
    assert template.expand(values) == "User bob@example.com is offline (away) $1"


def test_missing_value_expands_to_empty() -> None:
    assert compile_template("[$ci]").expand({}) == "[]"


@pytest.mark.parametrize("source", ["$xx", "trailing $", "$r", "$avp()", "$avp(x"])
def test_unknown_or_malformed_variable_is_an_error(source: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(source)


def test_text_without_variables_is_kept_verbatim() -> None:
    assert compile_template("plain text").expand({}) == "plain text"
