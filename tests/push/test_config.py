"""``[push]`` and its provider tables: defaults, what enables a provider, and every refusal
naming its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from msilo.config import Config, describe, load_config
from msilo.errors import ConfigError
from tests.push.fakes import ec_key, rsa_key, write_p8, write_service_account
from tests.push.helpers import push_config


@pytest.fixture
def account(tmp_path: Path) -> Path:
    return write_service_account(
        tmp_path / "sa.json", rsa_key(), token_uri="https://oauth2.example.test/token"
    )


@pytest.fixture
def p8(tmp_path: Path) -> Path:
    return write_p8(tmp_path / "AuthKey.p8", ec_key())


def refused(match: str, **tables: Any) -> None:
    with pytest.raises(ConfigError, match=match):
        push_config(**tables)


def test_push_is_off_by_default_with_the_documented_defaults() -> None:
    push = Config().push
    assert push.providers == ()
    assert (push.coalesce, push.include_body, push.max_attempts) == (10.0, False, 3)
    assert load_config().push == push


def test_a_table_present_enables_its_provider(account: Path, p8: Path) -> None:
    push = push_config(
        coalesce=2,
        include_body=1,
        max_attempts=5,
        webhook={"url": "https://gw.example.com/p"},
        apns={"key_file": str(p8), "key_id": "K", "team_id": "T"},
        fcm={"service_account": str(account)},
    )
    assert push.providers == ("fcm", "apns", "webhook")
    assert (push.coalesce, push.include_body, push.max_attempts) == (2.0, True, 5)
    assert push.apns is not None and push.apns.endpoint == "https://api.push.apple.com"
    assert push_config(webhook={"url": "http://x/"}).providers == ("webhook",)


def test_fcm_takes_project_and_token_endpoint_from_the_key(account: Path, tmp_path: Path) -> None:
    fcm = push_config(fcm={"service_account": str(account)}).fcm
    assert fcm is not None
    assert fcm.project_id == "msilo-test"
    assert fcm.token_endpoint == "https://oauth2.example.test/token"
    assert fcm.endpoint == "https://fcm.googleapis.com"
    fcm = push_config(
        fcm={
            "service_account": str(account),
            "project_id": "other",
            "token_endpoint": "https://t.example/token",
        }
    ).fcm
    assert fcm is not None and (fcm.project_id, fcm.token_endpoint) == (
        "other",
        "https://t.example/token",
    )
    bare = json.loads(account.read_text())
    del bare["token_uri"], bare["project_id"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    refused(
        r"^push\.fcm\.project_id: must be set \(the service account names no project_id\)$",
        fcm={"service_account": str(tmp_path / "bare.json")},
    )
    fcm = push_config(fcm={"service_account": str(tmp_path / "bare.json"), "project_id": "p"}).fcm
    assert fcm is not None and fcm.token_endpoint == "https://oauth2.googleapis.com/token"


def test_fcm_key_file_problems_are_named(tmp_path: Path, p8: Path) -> None:
    refused(r"^push\.fcm\.service_account: must be set when \[push\.fcm\] is present$", fcm={})
    missing = tmp_path / "nope.json"
    refused(
        rf"^push\.fcm\.service_account: {missing} does not exist$",
        fcm={"service_account": str(missing)},
    )
    (tmp_path / "junk.json").write_text("{not json")
    refused(
        r"is not a JSON service-account key", fcm={"service_account": str(tmp_path / "junk.json")}
    )
    (tmp_path / "nokey.json").write_text(json.dumps({"client_email": "a@b"}))
    refused(r"has no private_key", fcm={"service_account": str(tmp_path / "nokey.json")})
    (tmp_path / "badpem.json").write_text(json.dumps({"client_email": "a@b", "private_key": "x"}))
    refused(
        r"private_key is not a PEM private key",
        fcm={"service_account": str(tmp_path / "badpem.json")},
    )
    ec_account = {"client_email": "a@b", "private_key": p8.read_text()}
    (tmp_path / "ec.json").write_text(json.dumps(ec_account))
    refused(r"not an RSA key", fcm={"service_account": str(tmp_path / "ec.json")})
    refused(r"^push\.fcm\.ca_file: .*nope\.pem does not exist$",
            fcm={"service_account": "", "ca_file": str(tmp_path / "nope.pem")})  # fmt: skip


def test_apns_needs_its_key_and_ids(tmp_path: Path, p8: Path, account: Path) -> None:
    refused(r"^push\.apns\.key_file: must be set", apns={"key_id": "K", "team_id": "T"})
    refused(r"^push\.apns\.key_id: must be set", apns={"key_file": str(p8), "team_id": "T"})
    refused(r"^push\.apns\.team_id: must be set", apns={"key_file": str(p8), "key_id": "K"})
    refused(r"^push\.apns\.key_file: .* is not a PEM private key", apns={"key_file": str(account)})
    rsa_pem = tmp_path / "rsa.p8"
    rsa_pem.write_text(json.loads(account.read_text())["private_key"])
    refused(r"^push\.apns\.key_file: .* is not a P-256", apns={"key_file": str(rsa_pem)})
    refused(r"^push\.apns\.push_type: must be one of alert, background",
            apns={"push_type": "voip"})  # fmt: skip
    refused(r"^push\.apns\.endpoint: must be an http\(s\) URL", apns={"endpoint": "api.push"})
    refused(r"^push\.apns\.timeout: must be a number >= 0.05", apns={"timeout": 0})


def test_webhook_templates_are_checked_at_load() -> None:
    refused(r"^push\.webhook\.url: must be set", webhook={})
    refused(
        r"^push\.webhook\.url: unknown placeholder \$usr \(known: \$user",
        webhook={"url": "http://x/$usr"},
    )
    refused(r"^push\.webhook\.url: has a lone \$", webhook={"url": "http://x/$ 1"})
    refused(r"^push\.webhook\.url: must be an http\(s\) URL", webhook={"url": "$prid"})
    refused(r"^push\.webhook\.body: must be JSON once filled in",
            webhook={"url": "http://x/", "body": '{"from": $from}'})  # fmt: skip
    refused(r"^push\.webhook\.method: must be one of POST, PUT, PATCH, GET",
            webhook={"url": "http://x/", "method": "DELETE"})  # fmt: skip
    refused(r"^push\.webhook\.headers: 'Bad Name' is not a header name",
            webhook={"url": "http://x/", "headers": {"Bad Name": "v"}})  # fmt: skip
    refused(r"^push\.webhook\.headers\.X-A: unknown placeholder \$nope",
            webhook={"url": "http://x/", "headers": {"X-A": "$nope"}})  # fmt: skip
    refused(
        r"^push\.webhook\.headers: must be a table", webhook={"url": "http://x/", "headers": "A: b"}
    )
    # not JSON is fine with a Content-Type that says so, and for GET
    push_config(webhook={"url": "http://x/", "body": "n=$count",
                         "headers": {"Content-Type": "text/plain"}})  # fmt: skip
    push_config(webhook={"url": "http://x/", "body": "n=$count", "method": "GET"})


def test_unknown_keys_and_tables_are_named() -> None:
    refused(r"^push\.gcm: unknown key \(known in \[push\]: coalesce, include_body, max_attempts, "
            r"fcm, apns, webhook\)$", gcm={})  # fmt: skip
    refused(
        r"^push\.webhook\.uri: unknown key \(known in \[push\.webhook\]: url,", webhook={"uri": "x"}
    )
    refused(r"^push\.fcm: must be a table \(\[push\.fcm\]\)$", fcm="yes")
    refused(r"^push\.coalesce: must be a number >= 0", coalesce=-1)
    refused(r"^push\.max_attempts: must be an integer <= 10", max_attempts=11)
    refused(r"^push\.include_body: must be 0/1", include_body=2)


def test_set_reaches_a_provider_table(account: Path) -> None:
    config = load_config(
        overrides=[
            f'push.fcm.service_account="{account}"',
            "push.fcm.project_id=proj-2",
            "push.coalesce=3",
        ]
    )
    assert config.push.fcm is not None and config.push.fcm.project_id == "proj-2"
    assert config.push.coalesce == 3.0
    with pytest.raises(ConfigError, match=r"^push\.fcm: must be a table"):
        load_config(overrides=["push.fcm=1", "push.fcm.project_id=x"])


def test_every_push_key_is_documented() -> None:
    rows = {f"{s}.{k}": doc for s, k, _d, doc in describe()}
    for key in ("push.coalesce", "push.include_body", "push.max_attempts",
                "push.fcm.project_id", "push.fcm.service_account", "push.fcm.endpoint",
                "push.fcm.token_endpoint", "push.apns.key_file", "push.apns.key_id",
                "push.apns.team_id", "push.apns.topic", "push.apns.endpoint",
                "push.webhook.url", "push.webhook.method", "push.webhook.body",
                "push.webhook.headers"):  # fmt: skip
        assert rows[key], key


def test_webhook_credentials_are_secrets() -> None:
    config = Config.from_mapping(
        {"push": {"webhook": {"url": "http://x/", "headers": {"Authorization": "Bearer tok",
                                                             "X-Trace": "on"}}}}
    )  # fmt: skip
    assert "Bearer tok" in config.secrets() and "on" not in config.secrets()


def test_check_config_prints_the_push_tables_present(tmp_path: Path, account: Path) -> None:
    conf = tmp_path / "msilo.toml"
    conf.write_text(
        f'[push]\ncoalesce = 5\n[push.fcm]\nservice_account = "{account}"\n'
        '[push.webhook]\nurl = "https://u:pw@gw.example.com/$prid"\n'
        'headers = { Authorization = "Bearer s3cret", X-Trace = "on" }\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "msilo", "-c", str(conf), "check-config"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "push.coalesce = 5.0" in out.stdout
    assert "push.fcm.project_id = 'msilo-test'" in out.stdout
    assert "push.webhook.url = 'https://u:***@gw.example.com/$prid'" in out.stdout
    assert "push.webhook.headers = [('Authorization', '***'), ('X-Trace', 'on')]" in out.stdout
    assert "s3cret" not in out.stdout and ":pw@" not in out.stdout
    assert "push.apns." not in out.stdout  # absent: not configured
    bad = subprocess.run(
        [sys.executable, "-m", "msilo", "check-config", "--set", "push.apns.key_id=K"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "push.apns.key_file: must be set when [push.apns] is present" in bad.stderr
