"""MySQL URLs and server versions: what msilo accepts before it connects."""

from __future__ import annotations

import pytest

from msilo.storage.mysql_sql import Q, dedupe_value, server_version_problem
from msilo.storage.myurl import parse_my_url, where


def test_opensips_default_url_parses() -> None:
    u = parse_my_url("mysql://opensips:opensipsrw@localhost/opensips")
    assert (u.host, u.port, u.user, u.password, u.database) == (
        "localhost", 3306, "opensips", "opensipsrw", "opensips",
    )  # fmt: skip
    assert u.where() == "localhost:3306/opensips"


def test_escapes_ports_and_sockets() -> None:
    u = parse_my_url("mysql://m%40x:p%2Fw@10.0.0.5:3307/msilo?unix_socket=/run/mysqld/s.sock")
    assert (u.user, u.password, u.port, u.unix_socket) == ("m@x", "p/w", 3307, "/run/mysqld/s.sock")
    assert u.where() == "/run/mysqld/s.sock/msilo"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("postgres://u@h/db", "must start with mysql://"),
        ("mysql://u:secret@h", "must name a database"),
        ("mysql://u:secret@h:70000/db", "not a port number"),
        ("mysql://u:secret@h/db?sslmode=require", "unknown parameter(s) sslmode"),
    ],
)
def test_bad_urls_say_why_without_the_password(url: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_my_url(url)
    assert error in str(info.value) and "secret" not in str(info.value)
    assert "secret" not in where(url)


def test_placeholders_are_rendered_for_the_drivers() -> None:
    q = Q("SELECT 1 WHERE a = {1} AND b = {0} AND c = {1} AND d LIKE 'x%'")
    assert q.text == "SELECT 1 WHERE a = %s AND b = %s AND c = %s AND d LIKE 'x%%'"
    assert q.args("zero", "one") == ("one", "zero", "one")


def test_long_dedupe_keys_become_their_hash() -> None:
    assert dedupe_value(None) is None and dedupe_value("k" * 255) == "k" * 255
    long = dedupe_value("k" * 256)
    assert long is not None and long.startswith("sha256:") and len(long) <= 255


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("8.0.36", True),
        ("8.0.4", True),
        ("8.0.3", False),
        ("5.7.44-log", False),
        ("10.6.0-MariaDB", True),
        ("10.11.19-MariaDB-0+deb12u1", True),
        ("5.5.5-10.11.6-MariaDB", True),
        ("10.5.22-MariaDB", False),
        ("10.3.39-MariaDB-0+deb10u1", False),
    ],
)
def test_old_servers_are_refused_naming_their_version(version: str, ok: bool) -> None:
    problem = server_version_problem(version)
    if ok:
        assert problem is None
    else:
        assert problem is not None and "is too old" in problem
        assert version.removeprefix("5.5.5-").split("-")[0] in problem
        assert "MariaDB 10.6" in problem and "MySQL 8.0.4" in problem
