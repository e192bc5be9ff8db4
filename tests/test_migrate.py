"""``msilo migrate-config``: OpenSIPS and Kamailio scripts become a msilo.toml that loads."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from msilo.config import Config
from msilo.migrate import NO_EQUIVALENT, SAME_NAME, convert

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "migrate"


def msilo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``msilo ARGS`` as a user does."""
    return subprocess.run(
        [sys.executable, "-m", "msilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def loads(text: str) -> dict[str, Any]:
    """The TOML, checked to load as msilo's configuration."""
    data = tomllib.loads(text)
    Config.from_mapping(data)
    return data


def converted_and_checked(script: Path, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """(msilo.toml printed by migrate-config, check-config's output on it)."""
    out = msilo("migrate-config", str(script), *extra, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    toml = tmp_path / "msilo.toml"
    toml.write_text(out.stdout)
    check = msilo("check-config", "-c", str(toml), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    return out.stdout, check.stdout


# ---- the two scripts of record -----------------------------------------------------------


def test_admin_guide_sample_script(tmp_path: Path) -> None:
    text, checked = converted_and_checked(DATA / "admin-guide-sample.cfg", tmp_path)
    assert "read as an OpenSIPS script" in text
    assert "msilo.contact_hdr = 'Contact: registrar@;msilo=yes\\r\\n'" in checked
    assert "msilo.content_type_hdr = 'Content-Type: text/plain\\r\\n'" in checked
    assert "msilo.offline_message = '*** User $rU is offline!'" in checked
    # OpenSIPS 1.x's fr_timer is in seconds: the sample's 10 is ten seconds.
    assert "msilo.relay_timeout = 10.0" in checked
    assert "registrar.default_expires = 120" in checked
    assert "msilo.sc_mid = 'id'" in checked
    # `listen=   # listen address` as printed: nothing to convert, and said so.
    assert "# line 13: listen=: no address given: skipped" in text
    assert "Other parameters, not msilo's concern: tm (2), usrloc (1)." in text


def bench_kamailio_cfg(tmp_path: Path) -> Path:
    """bench/e2e/kamailio.cfg with its placeholders filled as the harness fills them."""
    values = {
        "usrloc": 'modparam("usrloc", "db_mode", 0)',
        "debug": "1",
        "children": "2",
        "host": "127.0.0.1",
        "port": "5070",
        "module_path": "/usr/lib/x86_64-linux-gnu/kamailio/modules/",
        "db_url": "postgres://kamailio:kamailiorw@127.0.0.1:5432/kamailio",
        "check_time": "5",
    }
    text = (ROOT / "bench" / "e2e" / "kamailio.cfg").read_text()
    assert set(re.findall(r"\{\{(\w+)\}\}", text)) == set(values)
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    path = tmp_path / "kamailio.cfg"
    path.write_text(text)
    return path


def test_bench_kamailio_cfg(tmp_path: Path) -> None:
    text, checked = converted_and_checked(bench_kamailio_cfg(tmp_path), tmp_path)
    assert "read as a Kamailio script: Kamailio syntax (line 1: #!KAMAILIO)" in text
    assert "#   line 1: #!KAMAILIO -- a compatibility-mode marker" in text
    assert "server.listen = ['udp:127.0.0.1:5070']" in checked
    assert "msilo.db_url = 'postgres://kamailio:***@127.0.0.1:5432/kamailio'" in checked
    assert "msilo.db_table = 'silo'" in checked
    assert "msilo.check_time = 5" in checked
    assert (
        "msilo.contact_hdr = 'Contact: <sip:registrar@127.0.0.1:5070;msilo=yes>\\r\\n'" in checked
    )
    # Kamailio's fr_timer is in milliseconds: 10000 is ten seconds.
    assert "msilo.relay_timeout = 10.0" in checked
    assert "registrar.default_expires = 120" in checked


def test_missing_file_is_one_error_line(tmp_path: Path) -> None:
    out = msilo("migrate-config", str(tmp_path / "nope.cfg"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == f"msilo: error: {tmp_path / 'nope.cfg'}: no such file\n"


def test_unknown_dialect_is_a_usage_error(tmp_path: Path) -> None:
    out = msilo("migrate-config", "x.cfg", "--from", "ser", cwd=tmp_path)
    assert out.returncode == 2
    assert "invalid choice: 'ser'" in out.stderr


# ---- one test per mapped parameter --------------------------------------------------------

SAMPLE_VALUES: dict[str, tuple[str, Any]] = {
    "db_table": ('"silo2"', "silo2"),
    "from_address": ('"sip:registrar@example.com"', "sip:registrar@example.com"),
    "contact_hdr": ('"Contact: <sip:r@example.com>\\r\\n"', "Contact: <sip:r@example.com>\r\n"),
    "offline_message": ('"*** User $rU is offline!"', "*** User $rU is offline!"),
    "content_type_hdr": ('"Content-Type: text/html\\r\\n"', "Content-Type: text/html\r\n"),
    "reminder": ('"sip:reminder@example.com"', "sip:reminder@example.com"),
    "outbound_proxy": (
        '"sip:proxy.example.com;transport=tcp"',
        "sip:proxy.example.com;transport=tcp",
    ),
    "expire_time": ("36000", 36000),
    "check_time": ("10", 10),
    "send_time": ("60", 60),
    "clean_period": ("3", 3),
    "use_contact": ("0", False),
    "sc_mid": ('"other_mid"', "other_mid"),
    "sc_from": ('"source_address"', "source_address"),
    "sc_to": ('"destination_address"', "destination_address"),
    "sc_uri_user": ('"user"', "user"),
    "sc_uri_host": ('"host"', "host"),
    "sc_body": ('"message_body"', "message_body"),
    "sc_ctype": ('"content_type"', "content_type"),
    "sc_exp_time": ('"expire_time"', "expire_time"),
    "sc_inc_time": ('"incoming_time"', "incoming_time"),
    "sc_snd_time": ('"send_reminder_time"', "send_reminder_time"),
    "snd_time_avp": ('"$avp(snd_time)"', "$avp(snd_time)"),
    "add_date": ("0", False),
    "max_messages": ("5", 5),
}

CTYPE = 'modparam("msilo", "content_type_hdr", "Content-Type: text/plain\\r\\n")\n'

MAPPED: list[tuple[str, str, str, Any]] = [
    (f'modparam("msilo", "{name}", {written})\n', "msilo", name, value)
    for name, (written, value) in SAMPLE_VALUES.items()
] + [
    ('modparam("msilo", "db_url", "postgres://u:p@db.example.com:5433/opensips")\n', "msilo",
     "db_url", "postgres://u:p@db.example.com:5433/opensips"),
    ('modparam("msilo", "db_url", "postgresql://u@db/kamailio")\n', "msilo", "db_url",
     "postgresql://u@db/kamailio"),
    ('modparam("msilo", "db_url", "sqlite:///var/lib/kamailio/kamailio.db")\n', "msilo",
     "db_url", "sqlite:////var/lib/kamailio/kamailio.db"),
    ('modparam("msilo", "db_url", "sqlite://kamailio.db")\n', "msilo", "db_url",
     "sqlite:///kamailio.db"),
    ('modparam("registrar", "default_expires", 600)\n', "registrar", "default_expires", 600),
    ('modparam("registrar", "min_expires", 30)\n', "registrar", "min_expires", 30),
    ('modparam("registrar", "max_expires", 7200)\n', "registrar", "max_expires", 7200),
    ('modparam("registrar", "max_contacts", 3)\n', "registrar", "max_contacts", 3),
    ('#!KAMAILIO\nmodparam("tm", "fr_timer", 4000)\n', "msilo", "relay_timeout", 4.0),
    ('modparam("tm", "fr_timer", 4)\n', "msilo", "relay_timeout", 4.0),
    ('modparam("tm", "fr_timeout", 7)\n', "msilo", "relay_timeout", 7.0),
    ('modparam("tm", "fr_timer", 30000)\n', "msilo", "relay_timeout", 30.0),
    ("listen=udp:10.0.0.1:5060\r\nlisten=tcp:10.0.0.1:5060\r\n", "server", "listen",
     ["udp:10.0.0.1:5060", "tcp:10.0.0.1:5060"]),
    ("listen=udp:10.0.0.1:5060\n", "server", "listen", ["udp:10.0.0.1:5060"]),
    ("listen = tcp:10.0.0.1:5080\n", "server", "listen", ["tcp:10.0.0.1:5080"]),
    ("listen=10.0.0.1\n", "server", "listen", ["udp:10.0.0.1:5060", "tcp:10.0.0.1:5060"]),
    ("port=5070\nlisten=udp:10.0.0.1\n", "server", "listen", ["udp:10.0.0.1:5070"]),
    ("listen=udp:[2001:db8::1]:5060\n", "server", "listen", ["udp:[2001:db8::1]:5060"]),
    ('listen="udp:*:5060"\n', "server", "listen", ["udp:0.0.0.0:5060"]),
    ("socket=udp:10.0.0.1:5060\n", "server", "listen", ["udp:10.0.0.1:5060"]),
    ("listen=udp:10.0.0.1:5060\nlisten=tcp:10.0.0.1:5060\n", "server", "listen",
     ["udp:10.0.0.1:5060", "tcp:10.0.0.1:5060"]),
    ("listen=udp:10.0.0.1:5060 advertise 192.0.2.7:5060\n", "server", "advertise",
     "192.0.2.7:5060"),
    ("listen=udp:10.0.0.1:5060 as 192.0.2.7:5080\n", "server", "advertise", "192.0.2.7:5080"),
    ("advertised_address=192.0.2.9\nadvertised_port=5090\n", "server", "advertise",
     "192.0.2.9:5090"),
]  # fmt: skip


def test_every_msilo_parameter_of_both_modules_has_a_case() -> None:
    assert set(SAMPLE_VALUES) == set(SAME_NAME)


@pytest.mark.parametrize(
    ("script", "section", "key", "value"), MAPPED, ids=[f"{c[1]}.{c[2]}:{c[0]}" for c in MAPPED]
)
def test_mapped_parameter(script: str, section: str, key: str, value: Any) -> None:
    data = loads(convert(CTYPE + script))
    assert data[section][key] == value


# ---- and one per parameter with no equivalent ----------------------------------------------

UNMAPPED: list[tuple[str, str, str]] = [
    (f'modparam("msilo", "{name}", "x")\n', f"# no equivalent: {reason}", name)
    for name, reason in NO_EQUIVALENT.items()
] + [
    ('modparam("msilo", "use_mode", 1)\n', "# nothing to set: msilo always keeps the MESSAGE's"
     " Call-ID", "use_mode"),
    ('modparam("msilo", "use_mode", 0)\n', "# no equivalent: msilo always delivers a stored"
     " message with the Call-ID it arrived with", "use_mode"),
    ('modparam("msilo", "sc_callid", "callid")\n', "# nothing to set: msilo's Call-ID column"
     " is callid too", "sc_callid"),
    ('modparam("msilo", "sc_callid", "cid")\n', "# no equivalent: msilo's Call-ID column is"
     " always named callid; rename 'cid' to callid", "sc_callid"),
    ('modparam("msilo", "db_mode", 1)\n', "# not an OpenSIPS or Kamailio msilo parameter",
     "db_mode"),
    ('modparam("msilo", "db_url", "mysql://")\n', "# msilo refuses it: msilo.db_url: must name"
     " a database", "db_url"),
    ('modparam("msilo", "db_url", "unixodbc://x")\n', "# unixodbc:// databases are not"
     " supported: msilo uses PostgreSQL, MySQL/MariaDB or SQLite", "db_url"),
    ("listen=tls:10.0.0.1:5061\n", "tls:10.0.0.1:5061 left out: a tls: listener needs [tls]"
     " certificate and private_key", "listen"),
    ("listen=ws:10.0.0.1:8080\n", "ws: listeners have no msilo equivalent: skipped", "listen"),
    ("listen=sctp:10.0.0.1:5060\n", "sctp: listeners have no msilo equivalent", "listen"),
    ("socket = { proto = udp; address = 10.0.0.1; }\n", "the socket = { ... } block form is"
     " not converted", "listen"),
    ('modparam("msilo", "from_address", "registrar-at-example")\n',
     "# msilo refuses it: msilo.from_address: must be a sip: or sips: URI", "from_address"),
    ('modparam("msilo", "check_time", "often")\n', "# msilo refuses it: msilo.check_time:"
     " must be an integer", "check_time"),
    ('modparam("registrar", "min_expires", 7200)\n', "# msilo refuses it:"
     " registrar.default_expires: must lie between", "min_expires"),
]  # fmt: skip


@pytest.mark.parametrize(("script", "comment", "key"), UNMAPPED, ids=[c[0] for c in UNMAPPED])
def test_unmapped_parameter_is_a_comment_saying_why(script: str, comment: str, key: str) -> None:
    text = convert(script)
    assert comment in text
    data = loads(text)
    assert all(key not in table for table in data.values())


def test_mysql_url_is_kept_as_it_is() -> None:
    url = "mysql://opensips:opensipsrw@localhost/opensips"  # OpenSIPS's default
    text = convert(f'modparam("msilo", "db_url", "{url}")\n')
    assert loads(text)["msilo"]["db_url"] == url


def test_cross_key_rule_comments_out_the_setting_it_refuses() -> None:
    # Both servers refuse offline_message without content_type_hdr; so does msilo.
    text = convert('modparam("msilo", "offline_message", "gone")\n')
    assert (
        "# msilo refuses it: msilo.content_type_hdr: must be set when msilo.offline_message" in text
    )
    assert '# offline_message = "gone"' in text
    assert "offline_message" not in loads(text).get("msilo", {})


def test_later_modparam_wins() -> None:
    text = convert('modparam("msilo", "check_time", 10)\nmodparam("msilo", "check_time", 20)\n')
    assert "# set again below (line 2): that one counts" in text
    assert loads(text)["msilo"]["check_time"] == 20


def test_name_listener_is_kept_with_a_note() -> None:
    text = convert("listen=udp:eth0:5060\n")
    assert "'eth0' is a name" in text
    assert loads(text)["server"]["listen"] == ["udp:eth0:5060"]


# ---- comments and the preprocessor -------------------------------------------------------

TRICKY = r"""#!KAMAILIO
#!define WITH_PG
#!define DBURL "postgres://k:pw@db.example.com/kamailio"
#!define CHECK 15
/* modparam("msilo", "expire_time", 11)
   modparam("msilo", "send_time", 12) */
// modparam("msilo", "clean_period", 13)
# modparam("msilo", "max_messages", 14)
#!ifdef WITH_MYSQL
modparam("msilo", "db_url", "mysql://k:pw@localhost/kamailio")
#!else
#!ifdef WITH_PG
modparam("msilo", "db_url", DBURL)
#!endif
#!endif
#!ifndef WITH_PG
modparam("msilo", "add_date", 0)
#!endif
modparam("msilo", "check_time", CHECK) # trailing comment
modparam("msilo", "offline_message", "msg #1 // and /* not a comment */")
modparam("msilo", "content_type_hdr", 'Content-Type: text/plain\r\n')
modparam("msilo",
         "max_messages",
         7)
#!substdef "/HOST/example.com/"
modparam("msilo", "expire_time", UNDEFINED_NAME)
request_route { xlog("L_INFO", "# not a comment start\n"); }
"""


def test_comments_and_preprocessor_lines_do_not_break_the_reader() -> None:
    text = convert(TRICKY)
    data = loads(text)
    m = data["msilo"]
    assert m["db_url"] == "postgres://k:pw@db.example.com/kamailio"  # the #!else branch
    assert m["check_time"] == 15  # a #!define used as a value
    assert m["offline_message"] == "msg #1 // and /* not a comment */"
    assert m["content_type_hdr"] == "Content-Type: text/plain\r\n"
    assert m["max_messages"] == 7  # spread over three lines
    for commented_out in ("send_time", "clean_period", "add_date", "expire_time"):
        assert commented_out not in m
    assert "#   line 9: #!ifdef WITH_MYSQL -- followed (WITH_MYSQL is not defined)" in text
    assert "#   line 12: #!ifdef WITH_PG -- followed (WITH_PG is defined)" in text
    assert '#!substdef "/HOST/example.com/" -- skipped (not evaluated by migrate-config)' in text
    assert 'modparam("msilo", "expire_time", UNDEFINED_NAME -- not understood, skipped' in text
    assert "read as a Kamailio script" in text


def test_kamailio_is_detected_by_request_route_and_can_be_forced() -> None:
    script = 'request_route { exit; }\nmodparam("tm", "fr_timer", 30000)\n'
    assert loads(convert(script))["msilo"]["relay_timeout"] == 30.0
    forced = convert('modparam("tm", "fr_timer", 2500)\n', dialect="kamailio")
    assert loads(forced)["msilo"]["relay_timeout"] == 2.5
    assert "read as a Kamailio script: as given with --from" in forced


def test_cli_from_option(tmp_path: Path) -> None:
    script = tmp_path / "k.cfg"
    script.write_text('modparam("tm", "fr_timer", 2500)\n')
    _text, checked = converted_and_checked(script, tmp_path, "--from", "kamailio")
    assert "msilo.relay_timeout = 2.5" in checked


# ---- the whole move, as an admin does it --------------------------------------------------

KAMAILIO_SQLITE = """
CREATE TABLE version (table_name VARCHAR(32) NOT NULL, table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name));
INSERT INTO version (table_name, table_version) VALUES ('silo', '8');
CREATE TABLE silo (id INTEGER PRIMARY KEY NOT NULL, src_addr VARCHAR(255) DEFAULT '' NOT NULL,
    dst_addr VARCHAR(255) DEFAULT '' NOT NULL, username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL, inc_time INTEGER DEFAULT 0 NOT NULL,
    exp_time INTEGER DEFAULT 0 NOT NULL, snd_time INTEGER DEFAULT 0 NOT NULL,
    ctype VARCHAR(32) DEFAULT 'text/plain' NOT NULL, body BLOB, extra_hdrs TEXT,
    callid VARCHAR(128) DEFAULT '' NOT NULL, status INTEGER DEFAULT 0 NOT NULL);
CREATE INDEX silo_account_idx ON silo (username, domain);
INSERT INTO silo (src_addr, dst_addr, username, domain, inc_time, exp_time, ctype, body, callid)
VALUES ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        strftime('%s', 'now'), strftime('%s', 'now') + 3600, 'text/plain', X'6869', 'k-1');
"""


def test_kamailio_script_and_table_move_to_msilo(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "kamailio.db"
    conn = sqlite3.connect(db)
    conn.executescript(KAMAILIO_SQLITE)
    conn.close()
    script = tmp_path / "kamailio.cfg"
    script.write_text(
        "#!KAMAILIO\nlisten=udp:127.0.0.1:5070\n"
        f'modparam("msilo", "db_url", "sqlite://{db}")\nmodparam("msilo", "use_mode", 1)\n'
    )
    converted_and_checked(script, tmp_path)  # writes tmp_path/msilo.toml
    config = str(tmp_path / "msilo.toml")
    refused = msilo("-c", config, "messages", "count", "--aor", "alice@example.com", cwd=tmp_path)
    assert refused.returncode == 1
    assert "Kamailio's msilo layout (version 8): dump it, then run `msilo db upgrade`" in (
        refused.stderr
    )
    upgrade = msilo("-c", config, "db", "upgrade", cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "converted Kamailio's silo table (version 8) to msilo's layout (version 6)" in (
        upgrade.stdout
    )
    listed = msilo("-c", config, "messages", "list", "--aor", "alice@example.com", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "from=sip:bob@example.org\tctype=text/plain\thi" in listed.stdout


def test_fr_timer_unit_follows_from_when_given() -> None:
    assert (
        loads(convert('modparam("tm", "fr_timer", 1200)\n', "opensips"))["msilo"]["relay_timeout"]
        == 1200.0
    )
    guessed = convert('modparam("tm", "fr_timer", 1200)\n')
    assert "read as milliseconds (Kamailio's unit)" in guessed
    assert loads(guessed)["msilo"]["relay_timeout"] == 1.2
    bad = convert('modparam("tm", "fr_timer", "soon")\n')
    assert "# tm fr_timer 'soon' is not a number" in bad
    assert "relay_timeout" not in loads(bad).get("msilo", {})


def test_included_files_are_named_not_followed() -> None:
    text = convert('include_file "msilo-params.cfg"\n#!include_file "tls.cfg"\n')
    assert (
        'line 1: include_file "msilo-params.cfg" -- not followed: run msilo migrate-config on'
        " that file too" in text
    )
    assert 'line 2: #!include_file "tls.cfg" -- not followed' in text


def test_readme_table_names_every_parameter_migrate_config_knows() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Migrating from OpenSIPS or Kamailio") :]
    section = section[: section.index("\n## ", 5)]
    for name in (*SAME_NAME, *NO_EQUIVALENT, "use_mode", "db_url", "fr_timer", "fr_timeout"):
        assert re.search(rf'[`"]{name}[`"]', section), name


KAMAILIO_PG = """
CREATE TABLE version (table_name VARCHAR(32) NOT NULL, table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name));
INSERT INTO version (table_name, table_version) VALUES ('silo', '8');
CREATE TABLE silo (id SERIAL PRIMARY KEY NOT NULL, src_addr VARCHAR(255) DEFAULT '' NOT NULL,
    dst_addr VARCHAR(255) DEFAULT '' NOT NULL, username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL, inc_time INTEGER DEFAULT 0 NOT NULL,
    exp_time INTEGER DEFAULT 0 NOT NULL, snd_time INTEGER DEFAULT 0 NOT NULL,
    ctype VARCHAR(32) DEFAULT 'text/plain' NOT NULL, body BYTEA, extra_hdrs TEXT,
    callid VARCHAR(128) DEFAULT '' NOT NULL, status INTEGER DEFAULT 0 NOT NULL);
CREATE INDEX silo_account_idx ON silo (username, domain);
INSERT INTO silo (src_addr, dst_addr, username, domain, inc_time, exp_time, ctype, body, callid)
VALUES ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        extract(epoch FROM now())::int, extract(epoch FROM now())::int + 3600, 'text/plain',
        'hi'::bytea, 'k-1');
"""


def test_kamailio_postgresql_table_is_upgraded_by_the_command(tmp_path: Path, pg_dsn: str) -> None:
    import asyncio
    import uuid

    import asyncpg

    schema = f"kam_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE SCHEMA {schema}; SET search_path = {schema};" + KAMAILIO_PG))
    script = tmp_path / "kamailio.cfg"
    script.write_text(f'#!KAMAILIO\nmodparam("msilo", "db_url", "{pg_dsn}?search_path={schema}")\n')
    converted_and_checked(script, tmp_path)
    config = str(tmp_path / "msilo.toml")
    upgrade = msilo("-c", config, "db", "upgrade", cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "widened silo.ctype to TEXT" in upgrade.stdout
    assert "converted Kamailio's silo table (version 8) to msilo's layout (version 6)" in (
        upgrade.stdout
    )
    listed = msilo("-c", config, "messages", "list", "--aor", "alice@example.com", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "from=sip:bob@example.org\tctype=text/plain\thi" in listed.stdout
    asyncio.run(run(f"DROP SCHEMA {schema} CASCADE"))
