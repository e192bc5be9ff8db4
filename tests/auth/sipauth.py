"""Test helpers: SIP requests as a UA would send them, and a digest client that answers
challenges the way RFC 7616 §3.4 says (written from the RFC, not from msilo's code)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from msilo.sip.message import SipRequest
from msilo.sip.parser import parse_message

_HASHES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
_PARAM = re.compile(r'([a-z]+)=(?:"([^"]*)"|([^,\s]+))')


def H(algorithm: str, text: str) -> str:
    return hashlib.new(_HASHES[algorithm], text.encode("utf-8")).hexdigest()


def challenge_params(value: str) -> dict[str, str]:
    """Parameters of a ``Digest ...`` challenge value."""
    assert value.startswith("Digest "), value
    return {m[0]: m[1] or m[2] for m in _PARAM.findall(value[7:])}


def sip_request(
    method: str,
    *,
    domain: str,
    to: str,
    from_: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> SipRequest:
    """A parsed request; ``to`` / ``from_`` are user@host addresses."""
    uri = f"sip:{domain}" if method == "REGISTER" else f"sip:{to}"
    lines = [
        f"{method} {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-test;rport",
        "Max-Forwards: 70",
        f"From: <sip:{from_ or to}>;tag=abc",
        f"To: <sip:{to}>",
        "Call-ID: test-call@127.0.0.1",
        f"CSeq: 1 {method}",
        "Contact: <sip:alice@127.0.0.1:5070>",
        *(f"{name}: {value}" for name, value in headers or ()),
        "Content-Length: 0",
    ]
    msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(msg, SipRequest)
    return msg


@dataclass
class DigestClient:
    """Answers challenges for one user; counts nonce uses like a UA does."""

    username: str
    password: str
    cnonce: str = "0a4f113b"
    nc: dict[str, int] = field(default_factory=dict)

    def authorization(
        self,
        challenge: str,
        *,
        method: str,
        uri: str,
        nc: int | None = None,
        qop: bool = True,
        password: str | None = None,
        realm: str | None = None,
        username: str | None = None,
    ) -> str:
        """The credentials answering ``challenge`` (a WWW-/Proxy-Authenticate value)."""
        p = challenge_params(challenge)
        algorithm = p.get("algorithm", "MD5")
        realm = p["realm"] if realm is None else realm
        nonce = p["nonce"]
        if nc is None:
            nc = self.nc.get(nonce, 0) + 1
        self.nc[nonce] = nc
        user = username or self.username
        ha1 = H(algorithm, f"{user}:{realm}:{password or self.password}")
        ha2 = H(algorithm, f"{method}:{uri}")
        nc_text = f"{nc:08x}"
        if qop:
            response = H(algorithm, f"{ha1}:{nonce}:{nc_text}:{self.cnonce}:auth:{ha2}")
            extra = f', qop=auth, nc={nc_text}, cnonce="{self.cnonce}"'
        else:
            response = H(algorithm, f"{ha1}:{nonce}:{ha2}")
            extra = ""
        return (
            f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm={algorithm}{extra}'
        )
