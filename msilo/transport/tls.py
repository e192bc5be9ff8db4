"""TLS for SIP (RFC 3261 §26.2.1, §26.3.1): contexts for listeners and outgoing connections.

SIP over TLS is SIP over TCP inside ``ssl``: the framing, pooling and connection
reuse are the TCP ones (:mod:`msilo.transport.tcp`); this module only builds the
SSL contexts, with TLS 1.2 as the floor and the library's default (modern) ciphers.
"""

from __future__ import annotations

import re
import ssl

from msilo.errors import ConfigError


def server_context(certificate: str, private_key: str, ca: str | None = None) -> ssl.SSLContext:
    """Context for ``tls:`` listeners; a ConfigError names the key, the file and the cause.

    With ``ca``, clients that present a certificate are verified against it
    (optional client certificates: phones rarely have one).
    """
    # Each file is read on its own first: OpenSSL's load_cert_chain reports a missing or
    # unreadable file without saying which of the two it was.
    cert_text = _read_pem("tls.certificate", certificate)
    key_text = _read_pem("tls.private_key", private_key)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"tls.certificate: {certificate!r} holds no PEM certificate")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"tls.private_key: {private_key!r} holds no PEM private key")
    if "ENCRYPTED" in key_text:
        raise ConfigError(
            f"tls.private_key: {private_key!r} is encrypted (msilo needs an unencrypted key "
            "readable only by its user)"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        reason = _reason(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"tls.private_key: {private_key!r} is not the key of the certificate "
                f"{certificate!r}"
            ) from None
        if _certificate_ok(certificate):
            raise ConfigError(
                f"tls.private_key: {private_key!r} is not a usable PEM private key ({reason})"
            ) from None
        raise ConfigError(
            f"tls.certificate: {certificate!r} is not a usable PEM certificate ({reason})"
        ) from None
    if ca:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _read_pem(key: str, path: str) -> str:
    if not path:
        raise ConfigError(f"{key}: must be set for a tls: or wss: listener")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("ascii", "replace")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r} ({exc.strerror or exc})") from None


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason code, or the message without the ``[SSL]``/``(_ssl.c:N)`` noise."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    return re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", str(exc))


def _no_password() -> bytes:
    # Never let OpenSSL prompt on a terminal for a pass phrase.
    return b""


def _certificate_ok(path: str) -> bool:
    """True when ``path`` parses as a certificate (to tell whose fault a load error is)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


def client_context(ca: str | None = None) -> ssl.SSLContext:
    """Context for connections we open: the peer's certificate is verified (against ``ca``,
    else the system's trust store) and must name the host we dial."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(context, ca)
    return context


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        with open(ca, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"tls.ca: cannot read {ca!r} ({exc.strerror or exc})") from None
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        reason = _reason(exc)
        raise ConfigError(f"tls.ca: {ca!r} is not a PEM CA bundle ({reason})") from None
