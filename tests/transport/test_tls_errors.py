"""TLS set-up errors name the setting, the file and the cause (certificates made by openssl)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from msilo.errors import ConfigError
from msilo.transport.tls import client_context, server_context


def _pair(where: Path, name: str) -> tuple[str, str]:
    cert, key = where / f"{name}.crt", where / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    where = tmp_path_factory.mktemp("pem")
    cert, key = _pair(where, "one")
    other_cert, other_key = _pair(where, "two")
    (where / "garbage").write_text("not a pem file\n")
    for name, label in (("broken.crt", "CERTIFICATE"), ("broken.key", "PRIVATE KEY")):
        (where / name).write_text(f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n")
    encrypted = where / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:x", "-out", str(encrypted)],
        check=True, capture_output=True,
    )  # fmt: skip
    (where / "adir").mkdir()
    return {
        "cert": cert, "key": key, "other_key": other_key, "other_cert": other_cert,
        "dir": str(where / "adir"), "missing": str(where / "missing.pem"),
        "garbage": str(where / "garbage"), "broken_cert": str(where / "broken.crt"),
        "broken_key": str(where / "broken.key"), "encrypted": str(encrypted),
    }  # fmt: skip


def test_matching_certificate_and_key_load(pem: dict[str, str]) -> None:
    assert server_context(pem["cert"], pem["key"], pem["other_cert"]) is not None


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("missing", "key", "tls.certificate: cannot read '{missing}' (No such file or directory)"),
        ("cert", "missing", "tls.private_key: cannot read '{missing}' (No such file or directory)"),
        ("dir", "key", "tls.certificate: cannot read '{dir}' (Is a directory)"),
        ("cert", "dir", "tls.private_key: cannot read '{dir}' (Is a directory)"),
        ("garbage", "key", "tls.certificate: '{garbage}' holds no PEM certificate"),
        ("cert", "garbage", "tls.private_key: '{garbage}' holds no PEM private key"),
        ("broken_cert", "key", "tls.certificate: '{broken_cert}' is not a usable PEM certificate"),
        ("cert", "broken_key", "tls.private_key: '{broken_key}' is not a usable PEM private key"),
        ("cert", "other_key", "tls.private_key: '{other_key}' is not the key of the certificate"),
        ("cert", "encrypted", "tls.private_key: '{encrypted}' is encrypted"),
    ],
)
def test_each_error_names_the_right_setting_file_and_cause(
    pem: dict[str, str], cert: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        server_context(pem[cert], pem[key])
    assert str(caught.value).startswith(message.format(**pem))


def test_an_empty_setting_is_named(pem: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^tls\.certificate: must be set"):
        server_context("", pem["key"])


@pytest.mark.parametrize(
    ("ca", "message"),
    [
        ("missing", "tls.ca: cannot read '{missing}' (No such file or directory)"),
        ("garbage", "tls.ca: '{garbage}' is not a PEM CA bundle"),
    ],
)
def test_ca_errors_name_the_ca_file(pem: dict[str, str], ca: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        client_context(pem[ca])
    assert str(caught.value).startswith(message.format(**pem))
