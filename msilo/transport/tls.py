"""TLS for SIP (RFC 3261 §26.2.1, §26.3.1): contexts for listeners and outgoing connections.

SIP over TLS is SIP over TCP inside ``ssl``: the framing, pooling and connection
reuse are the TCP ones (:mod:`msilo.transport.tcp`); this module only builds the
SSL contexts, with TLS 1.2 as the floor and the library's default (modern) ciphers.
"""

from __future__ import annotations

import ssl

from msilo.errors import ConfigError


def server_context(certificate: str, private_key: str, ca: str | None = None) -> ssl.SSLContext:
    """Context for ``tls:`` listeners; a ConfigError names the file that cannot be used.

    With ``ca``, clients that present a certificate are verified against it
    (optional client certificates: phones rarely have one).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"tls.certificate: cannot read {exc.filename!r}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls.private_key: {certificate!r} / {private_key!r} are not a matching PEM "
            f"certificate and key ({exc})"
        ) from None
    if ca:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


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
        context.load_verify_locations(cafile=ca)
    except (FileNotFoundError, ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.ca: cannot load {ca!r} ({exc})") from None
