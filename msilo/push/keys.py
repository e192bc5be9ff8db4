"""Reading the providers' credentials: a Google service-account JSON key (FCM) and an Apple
``.p8`` token-signing key (APNs).  Both are read and checked when the configuration loads, so
a wrong path or a truncated file is an error at start-up, not at the first push."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message says why (never the key itself)."""


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a service-account key that the OAuth 2 JWT bearer flow needs."""

    client_email: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    private_key_id: str
    token_uri: str
    project_id: str


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path} ({exc.strerror or exc})") from None


def load_service_account(path: str) -> ServiceAccount:
    """The service account in ``path`` (the JSON key Google's console downloads)."""
    raw = _read(path)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"{path} is not a JSON service-account key") from None
    if not isinstance(data, dict):
        raise KeyFileError(f"{path} is not a JSON service-account key")
    for name in ("client_email", "private_key"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise KeyFileError(f"{path} has no {name} (is it a service-account key?)")
    try:
        key = load_pem_private_key(data["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{path}: private_key is not an RSA key (RS256 needs one)")
    token_uri = data.get("token_uri")
    return ServiceAccount(
        client_email=data["client_email"],
        private_key=key,
        private_key_id=str(data.get("private_key_id") or ""),
        token_uri=token_uri if isinstance(token_uri, str) and token_uri else GOOGLE_TOKEN_URI,
        project_id=str(data.get("project_id") or ""),
    )


def load_p8(path: str) -> ec.EllipticCurvePrivateKey:
    """The APNs token-signing key in ``path`` (PEM PKCS #8, P-256: what ES256 signs with)."""
    raw = _read(path)
    try:
        key = load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a PEM private key (.p8)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"{path} is not a P-256 (prime256v1) key: ES256 needs one")
    return key
