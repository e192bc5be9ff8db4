"""Stateless digest nonces: any worker on any host sharing the secret can verify them.

RFC 7616 §3.3 suggests a nonce of ``time-stamp H(time-stamp ":" ETag ":" secret-data)``;
ours is the same idea with an HMAC (RFC 2104) instead of a bare hash, a random salt so
that two challenges issued in the same second never share a nonce (the nonce-count table
is keyed by nonce), and the realm inside the MAC so a nonce is useless in another realm
that happens to share the secret::

    nonce = base64url( version(1) | timestamp(8, big-endian) | salt(8) | mac(16) )
    mac   = HMAC-SHA-256(secret, "msilo-nonce" 0x00 realm 0x00 version|timestamp|salt)[:16]

The MAC is truncated to 128 bits (RFC 2104 §5 allows truncation to half the output).
Nothing is stored when a nonce is issued; only its use is recorded (see ``digest``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Final

_VERSION: Final = 1
_HEAD: Final = struct.Struct(">BQ8s")  # version, timestamp, salt
_MAC_BYTES: Final = 16
_RAW_BYTES: Final = _HEAD.size + _MAC_BYTES
#: Length of an encoded nonce (base64url without padding).
NONCE_LENGTH: Final = (_RAW_BYTES * 8 + 5) // 6


@dataclass(frozen=True, slots=True)
class NonceCheck:
    """What a nonce says once its MAC verified: when it was issued."""

    issued: int  # epoch seconds


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class NonceSigner:
    """Issues and verifies nonces for one realm with one secret."""

    def __init__(self, secret: bytes, realm: str) -> None:
        if not secret:
            raise ValueError("the nonce secret must not be empty")
        self._secret = bytes(secret)
        self._context = b"msilo-nonce\x00" + realm.encode("utf-8", "surrogateescape") + b"\x00"

    def _mac(self, head: bytes) -> bytes:
        return hmac.new(self._secret, self._context + head, "sha256").digest()[:_MAC_BYTES]

    def issue(self, now: int) -> str:
        """A fresh nonce stamped ``now`` (epoch seconds)."""
        head = _HEAD.pack(_VERSION, max(0, int(now)), secrets.token_bytes(8))
        return _encode(head + self._mac(head))

    def verify(self, nonce: str) -> NonceCheck | None:
        """The nonce's issue time if we (or a peer with the same secret) issued it, else None.

        Expiry is the caller's decision: an expired nonce with a valid digest earns a
        ``stale=true`` challenge (RFC 7616 §3.3), an unknown one a plain challenge.
        """
        if len(nonce) != NONCE_LENGTH:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
            return None
        # Only the canonical spelling: the nonce text keys the nonce-count table, so two
        # spellings of one nonce (``+`` for ``-``) must not count as two nonces.
        if len(raw) != _RAW_BYTES or _encode(raw) != nonce:
            return None
        head, mac = raw[: _HEAD.size], raw[_HEAD.size :]
        if not hmac.compare_digest(mac, self._mac(head)):
            return None
        version, issued, _salt = _HEAD.unpack(head)
        if version != _VERSION:
            return None
        return NonceCheck(issued=issued)
