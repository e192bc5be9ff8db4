"""Values a table cannot hold are the request's fault, never an outage (issue 14, item 5).

PostgreSQL's text cannot hold NUL (RFC 4475 ``escnull``: ``%00`` in a user part is a valid
SIP message), nor bytes that are not UTF-8; OpenSIPS's columns are VARCHAR(64) for user
and domain.  Each of these must get 400 naming the field, on both backends and on every
path that reaches a table (REGISTER, MESSAGE, a custom route's ``m_store`` / ``save`` /
``lookup``), with no ``event=db_down`` and no traceback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.auth.sipauth import DigestClient
from tests.service.conftest import Running, ServerFactory
from tests.service.sipua import UserAgent

TORTURE = Path(__file__).parent.parent / "data" / "torture" / "valid"
LONG = "u" * 65
HOST = "127.0.0.1"
LONG_HOST = "h" * 60 + ".example.com"  # 72 characters, a valid host name
SILO = "server.mode=silo"
CUSTOM = 'server.route="tests.service.routes:relay_or_store"'


def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    """No outage alarm and no traceback was logged."""
    assert "event=db_down" not in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def _send(ua: UserAgent, raw: bytes, branch: str) -> tuple[int, str]:
    reply = await ua.send_and_wait(raw, branch)
    return reply.status, reply.reason


def _escnull(ua: UserAgent) -> tuple[bytes, str]:
    """RFC 4475 §3.1.1.10 as published, its Via pointing at our UA so the answer comes back."""
    text = (TORTURE / "escnull.dat").read_bytes()
    branch = "z9hG4bKkdjuw"
    via = f"Via: SIP/2.0/UDP 127.0.0.1:{ua.port};branch={branch};rport".encode()
    lines = [via if line.startswith(b"Via:") else line for line in text.split(b"\r\n")]
    raw = b"\r\n".join(lines).replace(b"example.com", HOST.encode())
    return raw, branch


@pytest.mark.parametrize("mode", ["registrar", "custom"])
async def test_register_escnull_gets_400_naming_the_user(
    server: ServerFactory, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    srv = await server(*([CUSTOM] if mode == "custom" else []))
    ua = await srv.agent("x")
    raw, branch = _escnull(ua)
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        status, reason = await _send(ua, raw, branch)
    assert status == 400
    assert "To user" in reason and "NUL" in reason
    _quiet(caplog)
    assert srv.stats()["store_failures"] == 0


async def test_register_with_an_unstorable_contact_or_path_gets_400_naming_it(
    server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    got = []
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        reply = await ua.register(600, contact="<sip:%00@127.0.0.1>")
        assert reply.status == 200  # an escaped NUL in a contact is just text: storable
        for header in (
            b"Contact: <sip:al\xffce@127.0.0.1>",
            f"Contact: <{ua.contact}>".encode() + b';+sip.instance="<urn:\xff>"',
            f"Contact: <{ua.contact}>".encode() + b"\r\nPath: <sip:p\xff@127.0.0.1;lr>",
            b"Contact: <sip:a\x00b@127.0.0.1>",  # a raw NUL: refused by the parser already
        ):
            raw, branch = ua.build(
                "REGISTER", f"sip:{HOST}", to_uri=ua.uri, content_type=None,
                headers=["X-Placeholder: 1", "Expires: 600"],
            )  # fmt: skip
            got.append(await _send(ua, raw.replace(b"X-Placeholder: 1", header), branch))
    assert [status for status, _ in got] == [400] * 4, got
    assert "Contact" in got[0][1] and "UTF-8" in got[0][1]
    assert "+sip.instance" in got[1][1]
    assert "Path" in got[2][1]
    _quiet(caplog)
    bindings = await srv.store.lookup_bindings("alice", HOST, now=int(time.time()))
    assert [b.contact for b in bindings] == ["sip:%00@127.0.0.1"]


@pytest.mark.parametrize(
    ("to_uri", "field"),
    [(f"sip:{LONG}@{HOST}", "To user"), (f"sip:alice@{LONG_HOST}", "To host")],
)
async def test_register_with_a_user_or_domain_over_64_characters_gets_400(
    server: ServerFactory, caplog: pytest.LogCaptureFixture, to_uri: str, field: str
) -> None:
    srv = await server()
    ua = await srv.agent("alice")
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        reply = await ua.request(
            "REGISTER", f"sip:{HOST}", to_uri=to_uri, content_type=None,
            headers=[f"Contact: <{ua.contact}>", "Expires: 600"],
        )  # fmt: skip
    assert reply.status == 400
    assert field in reply.reason and "64" in reply.reason
    _quiet(caplog)


def _with_raw_call_id(raw: bytes, call_id: bytes) -> bytes:
    head, _, rest = raw.partition(b"Call-ID: ")
    _, _, tail = rest.partition(b"\r\n")
    return head + b"Call-ID: " + call_id + b"\r\n" + tail


@pytest.mark.parametrize("mode", ["registrar", "custom"])
async def test_register_with_a_non_utf8_call_id_gets_400_naming_it(
    server: ServerFactory, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    srv = await server(*([CUSTOM] if mode == "custom" else []))
    ua = await srv.agent("alice")
    raw, branch = ua.build(
        "REGISTER", f"sip:{HOST}", to_uri=ua.uri, content_type=None,
        headers=[f"Contact: <{ua.contact}>", "Expires: 600"],
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        status, reason = await _send(ua, _with_raw_call_id(raw, b"bad-\xff\xfe@host"), branch)
    assert status == 400 and "Call-ID" in reason
    _quiet(caplog)
    assert await srv.store.lookup_bindings("alice", HOST, now=int(time.time())) == []
    # The server is fine: the next REGISTER is saved.
    assert (await ua.register(600)).status == 200


async def _message_cases(srv: Running, caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    ua = await srv.agent("alice")
    got = []
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        for uri in (f"sip:null-%00-null@{HOST}", f"sip:{LONG}@{HOST}"):
            reply = await ua.message(uri, "hi")
            got.append((reply.status, reply.reason))
        raw, branch = ua.build("MESSAGE", f"sip:bob@{HOST}", body=b"hi")
        got.append(await _send(ua, _with_raw_call_id(raw, b"m-\xff@host"), branch))
        raw, branch = ua.build("MESSAGE", f"sip:bob@{HOST}", body=b"hi")
        got.append(await _send(ua, raw.replace(b"text/plain", b"text/plain;x=\xff"), branch))
        raw, branch = ua.build("MESSAGE", f"sip:bob@{HOST}", body=b"hi")
        got.append(
            await _send(ua, raw.replace(b"From: <sip:alice@", b"From: <sip:al\xffce@"), branch)
        )
    return got


@pytest.mark.parametrize("mode", ["silo", "registrar", "custom"])
async def test_message_with_unstorable_values_gets_400_naming_the_field(
    server: ServerFactory, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    overrides = {"silo": [SILO], "registrar": [], "custom": [CUSTOM]}[mode]
    srv = await server(*overrides)
    got = await _message_cases(srv, caplog)
    # The Call-ID reaches the table only hashed (the dedupe key): any bytes are storable.
    assert [status for status, _ in got] == [400, 400, 202, 400, 400], got
    nul, long, _, ctype, from_ = (reason for _, reason in got)
    assert "user" in nul and "NUL" in nul
    assert "user" in long and "64" in long
    assert "Content-Type" in ctype
    assert "From" in from_
    _quiet(caplog)
    assert srv.stats()["store_failures"] == 0
    assert await srv.store.count("bob", HOST) == 1  # the one with the odd Call-ID


AUTH = (
    'server.domains=["127.0.0.1"]',
    "auth.enabled=true",
    'auth.secret="s3cret-shared-by-every-host"',
)


async def test_digest_usernames_no_table_can_hold_are_no_outage(
    server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The subscriber lookup of an Authorization username that cannot be stored (not UTF-8,
    over 64 characters) finds no user without asking the database: refused like any unknown
    user, never 503 / db_down."""
    srv = await server(*AUTH)
    ua = await srv.agent("alice")
    got = []
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        for username, wire in ((b"alXXce", b"al\xffce"), (LONG.encode(), LONG.encode())):
            offer = (await ua.register(600)).get_headers("WWW-Authenticate")[0]
            creds = DigestClient(username.decode(), "pw").authorization(
                offer, method="REGISTER", uri=f"sip:{HOST}"
            )
            raw, branch = ua.build(
                "REGISTER", f"sip:{HOST}", to_uri=ua.uri, content_type=None,
                headers=[f"Contact: <{ua.contact}>", "Expires: 600", "X-Auth: 1"],
            )  # fmt: skip
            line = f"Authorization: {creds}".encode().replace(username, wire)
            got.append(await _send(ua, raw.replace(b"X-Auth: 1", line), branch))
    assert all(status in (401, 403) for status, _ in got), got
    _quiet(caplog)
    assert srv.stats()["store_failures"] == 0


async def test_a_custom_route_storing_for_an_unstorable_owner_gets_400(
    server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await server('server.route="tests.service.routes:owner_from_header"')
    ua = await srv.agent("alice")
    with caplog.at_level(logging.DEBUG, logger="msilo"):
        long = await ua.message(f"sip:bob@{HOST}", "hi", headers=[f"X-Owner: sip:{LONG}@{HOST}"])
        nul = await ua.message(f"sip:bob@{HOST}", "hi", headers=[f"X-Owner: sip:a%00b@{HOST}"])
        ok = await ua.message(f"sip:bob@{HOST}", "hi", headers=[f"X-Owner: sip:carol@{HOST}"])
    assert (long.status, nul.status, ok.status) == (400, 400, 202)
    assert "owner user" in long.reason and "owner user" in nul.reason
    _quiet(caplog)
    assert await srv.store.count("carol", HOST) == 1
