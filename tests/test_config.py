"""Configuration: defaults (D1), validation (D2), TOML file + --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from msilo.config import Config, describe, load_config, parse_override
from msilo.errors import ConfigError


def test_defaults_are_the_admin_guide_ones() -> None:
    m = load_config().msilo
    assert (m.check_time, m.clean_period, m.sc_mid, m.expire_time) == (30, 5, "mid", 259200)
    assert (m.send_time, m.use_contact, m.add_date, m.max_messages) == (0, True, True, 0)
    assert (m.db_table, m.db_url) == ("silo", "sqlite:///msilo.db")
    assert m.from_address is m.offline_message is m.reminder is m.outbound_proxy is None


def test_server_defaults_listen_on_udp_and_tcp_5060_in_registrar_mode() -> None:
    s = load_config().server
    assert s.listen == ("udp:0.0.0.0:5060", "tcp:0.0.0.0:5060")
    assert s.mode == "registrar"
    assert s.worker_count >= 1
    assert s.http == "127.0.0.1:9060"


def test_file_and_overrides_combine_with_overrides_winning(tmp_path: Path) -> None:
    path = tmp_path / "msilo.toml"
    path.write_text(
        '[server]\nworkers = 3\nlisten = ["udp:127.0.0.1:5070"]\n'
        '[msilo]\ncheck_time = 10\nreminder = "sip:r@example.com"\n'
        'content_type_hdr = "Content-Type: text/plain\\r\\n"\n'
    )
    config = load_config(str(path), ["server.workers=2", "msilo.max_messages=5"])
    assert config.server.workers == 2
    assert config.server.listen == ("udp:127.0.0.1:5070",)
    assert config.msilo.check_time == 10
    assert config.msilo.max_messages == 5
    assert config.msilo.content_type_hdr == "Content-Type: text/plain\r\n"
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("server.workers=2", ("server", "workers", 2)),
        ('server.listen=["udp:127.0.0.1:5070"]', ("server", "listen", ["udp:127.0.0.1:5070"])),
        ('msilo.reminder="sip:r@example.com"', ("msilo", "reminder", "sip:r@example.com")),
        ("server.mode=silo", ("server", "mode", "silo")),  # bare word -> string
        ("msilo.add_date=0", ("msilo", "add_date", 0)),
        ("msilo.use_contact=false", ("msilo", "use_contact", False)),
    ],
)
def test_set_values_are_toml_literals_or_bare_strings(
    override: str, expected: tuple[str, str, object]
) -> None:
    assert parse_override(override) == expected


def test_flags_accept_0_1_and_true_false() -> None:
    assert load_config(overrides=["msilo.add_date=0"]).msilo.add_date is False
    assert load_config(overrides=["msilo.use_contact=true"]).msilo.use_contact is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["msilo.check_time=0"], "msilo.check_time: must be an integer >= 1 (got 0)"),
        (["msilo.clean_period=0"], "msilo.clean_period: must be an integer >= 1"),
        (["msilo.expire_time=-5"], "msilo.expire_time: must be an integer >= 1"),
        (["msilo.send_time=-1"], "msilo.send_time: must be an integer >= 0"),
        (['msilo.check_time="30"'], "msilo.check_time: must be an integer"),
        (["msilo.use_contact=2"], "msilo.use_contact: must be 0/1 or true/false"),
        (['msilo.offline_message="off"'], "msilo.content_type_hdr: must be set when"),
        (
            ['msilo.expired_message="gone"', 'msilo.from_address="sip:r@x"'],
            "msilo.content_type_hdr: must be set when msilo.expired_message is set",
        ),
        (
            ['msilo.expired_message="gone"', 'msilo.content_type_hdr="Content-Type: a/b\\r\\n"'],
            "msilo.from_address: must be set when msilo.expired_message is set",
        ),
        (
            [
                'msilo.offline_message="$zz is off"',
                'msilo.content_type_hdr="Content-Type: a/b\\r\\n"',
            ],
            "msilo.offline_message: unknown pseudo-variable",
        ),
        (
            ['msilo.content_type_hdr="Content-Type: text/plain"'],
            "msilo.content_type_hdr: must be one full header line ending in \\r\\n",
        ),
        (
            ['msilo.contact_hdr="Content-Type: text/plain\\r\\n"'],
            "msilo.contact_hdr: must be a Contact header line",
        ),
        (['msilo.db_table="silo; drop table x"'], "msilo.db_table: must be an SQL identifier"),
        (['msilo.sc_mid="1mid"'], "msilo.sc_mid: must be an SQL identifier"),
        (['msilo.db_url="mariadb://x"'], "msilo.db_url: must be sqlite:///"),
        (['msilo.db_url="mysql://x"'], "msilo.db_url: must name a database: mysql://"),
        (['msilo.db_url="mysql://u:pw@h:99999/db"'], "msilo.db_url: the port is not a port"),
        (['msilo.db_url="mysql://u@h/db?ssl=1"'], "msilo.db_url: unknown parameter(s) ssl"),
        (['msilo.db_url="postgres://u@h1:5432,h2:x/db"'], "msilo.db_url: port 'x' of host 'h2'"),
        (
            ['msilo.db_url="postgres://u@h1,h2/db?target_session_attrs=master"'],
            "msilo.db_url: target_session_attrs must be one of any, primary",
        ),
        (['msilo.from_address="message_handler@x"'], "msilo.from_address: must be a sip:"),
        (['msilo.snd_time_avp="snd_time"'], "msilo.snd_time_avp: must be an AVP spec"),
        (['msilo.timezone="Mars/Olympus"'], "msilo.timezone: must be an IANA time zone"),
        (["msilo.nope=1"], "msilo.nope: unknown key"),
        (["nosuch.key=1"], "nosuch: unknown section"),
        (['server.listen=["udp:127.0.0.1:70000"]'], "server.listen: 'udp:127.0.0.1:70000'"),
        (['server.listen=["sctp:127.0.0.1:5060"]'], "server.listen: 'sctp:127.0.0.1:5060'"),
        (["server.mode=proxy"], "server.mode: must be one of registrar, silo"),
        (['server.route="no_colon"'], 'server.route: must be "module:function"'),
        (['server.trusted=["10.0.0.0/33"]'], "server.trusted: '10.0.0.0/33'"),
        (['server.http="localhost"'], "server.http: must be HOST:PORT"),
        (["registrar.min_expires=7200"], "registrar.default_expires: must lie between"),
        (['server.listen=["tls:0.0.0.0:5061"]'], "tls.certificate: "),
        (['server.listen=["wss:0.0.0.0:8443"]'], "tls.certificate: "),
        (['server.listen=["ws:127.0.0.1:0"]'], "server.listen: 'ws:127.0.0.1:0'"),
        (['server.ws_path="sip"'], "server.ws_path: must be a path starting with /"),
        (['server.ws_path="/sip?x=1"'], "server.ws_path: must be a path starting with /"),
        (['server.ws_origins=["app.example.com"]'], "server.ws_origins: 'app.example.com'"),
        (['server.ws_origins=["https://a.example/x"]'], "server.ws_origins: 'https://a.example/x'"),
        (["limits.ws_ping=-1"], "limits.ws_ping: must be a number >= 0"),
        (["auth.enabled=true"], "auth.secret: must be set"),
        (['auth.algorithms=["SHA-1"]'], "auth.algorithms: 'SHA-1' is not one of"),
        (["server.workers"], "--set 'server.workers': must be section.key=value"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write",
        "postgresql://u@[::1]:5432,10.0.0.2/db?target_session_attrs=primary&sslmode=require",
        "postgres://u@db.example.com/msilo",
    ],
)
def test_a_multi_host_postgres_url_is_accepted(url: str) -> None:
    """Several hosts, as libpq and asyncpg take them: a primary and its standbys."""
    assert load_config(overrides=[f'msilo.db_url="{url}"']).msilo.db_url == url


@pytest.mark.parametrize(
    "url",
    [
        "mysql://opensips:opensipsrw@localhost/opensips",  # OpenSIPS's default db_url
        "mysql://msilo:p%40ss@127.0.0.1:3307/msilo",
        "mysql://msilo@localhost/msilo?unix_socket=/run/mysqld/mysqld.sock",
    ],
)
def test_a_mysql_url_is_accepted(url: str) -> None:
    assert load_config(overrides=[f'msilo.db_url="{url}"']).msilo.db_url == url


def test_bad_toml_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[msilo\ncheck_time = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(str(path))


def test_missing_file_is_reported() -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config("/nonexistent/msilo.toml")


def test_templates_accept_the_documented_pseudo_variables() -> None:
    config = load_config(
        overrides=[
            'msilo.from_address="sip:registrar@$rd"',
            'msilo.offline_message="$rU@$rd ($tu) is offline; from $fU@$fd $fu $ci $si:$sp $$5"',
            'msilo.content_type_hdr="Content-Type: text/plain\\r\\n"',
            'msilo.contact_hdr="Contact: <sip:registrar@$rd>\\r\\n"',
        ]
    )
    assert config.msilo.from_address == "sip:registrar@$rd"


def test_every_key_is_documented() -> None:
    rows = describe()
    assert all(doc for _s, _k, _d, doc in rows)
    keys = {f"{s}.{k}" for s, k, _d, _doc in rows}
    admin_guide = {
        "db_url",
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
    }
    assert {f"msilo.{k}" for k in admin_guide} <= keys


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.msilo.check_time = 5  # type: ignore[misc]


def test_websocket_listeners_and_settings_are_accepted() -> None:
    config = load_config(
        overrides=[
            'server.listen=["ws:127.0.0.1:8080","udp:127.0.0.1:5060"]',
            'server.ws_path="/sip"',
            'server.ws_origins=["https://app.example.com","http://localhost:3000"]',
            "limits.ws_ping=10",
        ]
    )
    assert config.server.listen[0] == "ws:127.0.0.1:8080"
    assert config.server.ws_path == "/sip"
    assert config.server.ws_origins == ("https://app.example.com", "http://localhost:3000")
    assert config.limits.ws_ping == 10.0
    defaults = load_config()
    assert (defaults.server.ws_path, defaults.server.ws_origins) == ("/", ())
    assert defaults.limits.ws_ping == 30.0
