"""Digest arithmetic against published vectors, the credentials parser, and the nonces."""

from __future__ import annotations

import hashlib

import pytest

from msilo.auth import compute_ha1, compute_response, parse_credentials
from msilo.auth.nonce import NONCE_LENGTH, NonceSigner
from msilo.errors import BadCredentials

# RFC 7616 §3.9.1: "Mufasa" / "Circle of Life", GET /dir/index.html, qop=auth.
RFC7616_USER = "Mufasa"
RFC7616_PASSWORD = "Circle of Life"
RFC7616_REALM = "http-auth@example.org"
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_example_responses_are_reproduced(algorithm: str, expected: str) -> None:
    ha1 = compute_ha1(algorithm, RFC7616_USER, RFC7616_REALM, RFC7616_PASSWORD)
    response = compute_response(
        algorithm,
        ha1,
        nonce=RFC7616_NONCE,
        method="GET",
        uri="/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce=RFC7616_CNONCE,
    )
    assert response == expected


def test_sha512_256_is_the_fips_180_4_function_not_a_truncated_sha512() -> None:
    # RFC 8760 §2.2 / RFC 7616 §3.2: SHA-512/256 as FIPS 180-4 defines it (its own initial
    # values).  The RFC 7616 §3.9.2 example cannot serve: its values are disputed (erratum
    # 4897), so the FIPS "abc" vector pins the hash and the RFC 2617 formula the rest.
    assert (
        compute_ha1("SHA-512-256", "a", "b", "c") == hashlib.new("sha512_256", b"a:b:c").hexdigest()
    )
    assert hashlib.new("sha512_256", b"abc").hexdigest() == (
        "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
    )
    assert compute_ha1("SHA-512-256", "a", "b", "c") != hashlib.sha512(b"a:b:c").hexdigest()[:64]


def test_rfc2069_response_without_qop() -> None:
    # RFC 2069 §2.1.2 / RFC 2617 §3.2.2.1: response = H(HA1 ":" nonce ":" HA2).
    ha1 = hashlib.md5(b"bob:r:pw").hexdigest()
    ha2 = hashlib.md5(b"REGISTER:sip:r").hexdigest()
    expected = hashlib.md5(f"{ha1}:n1:{ha2}".encode()).hexdigest()
    assert compute_response("MD5", ha1, nonce="n1", method="REGISTER", uri="sip:r") == expected


def test_credentials_are_parsed_with_quoting_and_case_leniency() -> None:
    creds = parse_credentials(
        'digest  USERNAME="al\\"ice", realm="r", nonce="n,1", uri="sip:r",'
        ' response="ABCDEF", algorithm=sha-256, qop="auth", nc=0000000A, cnonce="c" ,,'
    )
    assert creds.username == 'al"ice'
    assert creds.nonce == "n,1"
    assert creds.algorithm == "SHA-256"
    assert creds.response == "abcdef"
    assert (creds.qop, creds.nc, creds.nc_text) == ("auth", 10, "0000000A")
    assert "abcdef" not in repr(creds)  # the response stays out of logs


def test_algorithm_defaults_to_md5_and_qop_is_optional() -> None:
    creds = parse_credentials('Digest username="a", realm="r", nonce="n", uri="u", response="00"')
    assert (creds.algorithm, creds.qop, creds.nc) == ("MD5", None, 0)


@pytest.mark.parametrize(
    "value",
    [
        "Digest",
        'Digest username="a"',  # no realm, nonce, uri, response
        'Digest username="a", realm="r", nonce="n", uri="u", response="xyz"',  # not hex
        'Digest username="a", realm="r", nonce="n", uri="u", response="00", qop=auth',  # no nc
        'Digest username="a", realm="r", nonce="n", uri="u", response="00", qop=auth, '
        'nc=1, cnonce="c"',  # nc not 8 hex digits
        'Digest username="a", realm="r", nonce="n", uri="u", response="00", qop=auth, '
        "nc=00000001",  # no cnonce
        'Digest username="a", realm="r", nonce="n", uri="u", response="00", qop=auth-int, '
        'nc=00000001, cnonce="c"',  # not offered
        'Digest username="a", username="b", realm="r", nonce="n", uri="u", response="00"',
        'Digest username="a, realm="r"',  # unterminated quote
        'Digest username="a" realm="r", nonce="n", uri="u", response="00"',  # no comma
        'Digest username=, realm="r"',
        'Digest =x, realm="r"',
        "Basic YWxpY2U6c2VjcmV0",
    ],
)
def test_malformed_credentials_raise_400(value: str) -> None:
    with pytest.raises(BadCredentials) as info:
        parse_credentials(value)
    assert info.value.status == 400


def test_a_nonce_verifies_with_the_same_secret_and_realm_only() -> None:
    signer = NonceSigner(b"s3cret", "example.com")
    nonce = signer.issue(1_700_000_000)
    assert len(nonce) == NONCE_LENGTH
    check = NonceSigner(b"s3cret", "example.com").verify(nonce)  # another worker
    assert check is not None and check.issued == 1_700_000_000
    assert NonceSigner(b"other", "example.com").verify(nonce) is None
    assert NonceSigner(b"s3cret", "example.org").verify(nonce) is None


def test_nonces_of_one_second_differ() -> None:
    signer = NonceSigner(b"s3cret", "example.com")
    assert len({signer.issue(1_700_000_000) for _ in range(100)}) == 100


@pytest.mark.parametrize("position", [0, 5, 20, 43])
def test_a_tampered_nonce_is_refused(position: int) -> None:
    signer = NonceSigner(b"s3cret", "example.com")
    nonce = signer.issue(1_700_000_000)
    for c in "AZaz09-_+/=é":
        if c != nonce[position]:
            assert signer.verify(nonce[:position] + c + nonce[position + 1 :]) is None
    assert signer.verify(nonce + "A") is None
    assert signer.verify(nonce[:-1]) is None
    assert signer.verify("") is None


def test_a_nonce_spelled_with_the_standard_base64_alphabet_is_refused() -> None:
    # The nonce text keys the nonce-count table: "+" for "-" must not be a second nonce.
    signer = NonceSigner(b"s3cret", "example.com")
    for now in range(1_700_000_000, 1_700_000_400):
        nonce = signer.issue(now)
        if "-" in nonce or "_" in nonce:
            break
    else:  # pragma: no cover - 400 nonces without either character
        pytest.skip("no nonce with - or _")
    alias = nonce.replace("-", "+").replace("_", "/")
    assert signer.verify(alias) is None
