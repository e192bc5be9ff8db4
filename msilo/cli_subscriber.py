"""``msilo subscriber add|passwd|remove user@domain``: digest credentials (spec D14).

The password is read with ``getpass`` (twice, to catch typos) when stdin is a terminal,
else as one line from stdin (``echo secret | msilo subscriber add alice@example.com``).
It is never printed nor logged.

What is stored: the HA1 of every algorithm (``ha1`` MD5, ``ha1_sha256``, ``ha1_sha512t256``
-- RFC 7616 §3.4.2, ``H(username:realm:password)``) and, for OpenSIPS compatibility, an empty
``password`` column: a leaked table then gives no password that works elsewhere.  The cost:
HA1s are bound to the realm, so changing ``auth.realm`` means setting every password again.
``plain_password=True`` also stores the password itself (OpenSIPS's ``calculate_ha1`` mode;
at most 25 characters, the column's width), which survives a realm change.
"""

from __future__ import annotations

import getpass
import sys
from typing import TYPE_CHECKING, TextIO

from msilo.auth.digest import compute_ha1
from msilo.errors import ConfigError, SubscriberError

if TYPE_CHECKING:
    from msilo.storage.base import Store

ACTIONS = ("add", "passwd", "remove")
#: Width of OpenSIPS's ``subscriber.password`` column.
PLAIN_PASSWORD_MAX = 25


def parse_subscriber(text: str) -> tuple[str, str]:
    """``user@domain`` (or ``sip:user@domain``) -> (user, domain), domain lower-cased."""
    value = text.strip()
    if value.lower().startswith(("sip:", "sips:")):
        value = value.split(":", 1)[1]
    user, at, domain = value.rpartition("@")
    if (
        not at
        or not user
        or not domain
        or any(c in value for c in ' <>;\t\r\n"')
        or len(user) > 64
        or len(domain) > 64
    ):
        raise ConfigError(f"subscriber {text!r}: must be user@domain")
    return user, domain.lower()


def read_password(stdin: TextIO, *, confirm: bool = True) -> str:
    """The new password: prompted (no echo) on a terminal, else one line of ``stdin``."""
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Retype password: ") != password:
            raise ConfigError("the passwords do not match")
    else:
        line = stdin.readline()
        # Only the line end goes: spaces may be part of the password.
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise ConfigError("empty password")
    if "\x00" in password:
        raise ConfigError("the password contains a NUL character")
    return password


def credentials_for(
    username: str, realm: str, password: str, *, plain_password: bool = False
) -> dict[str, str | None]:
    """Keyword arguments of ``Store.set_subscriber`` for ``password`` in ``realm``."""
    if plain_password and len(password) > PLAIN_PASSWORD_MAX:
        raise ConfigError(
            f"a plain password is stored in at most {PLAIN_PASSWORD_MAX} characters; "
            f"leave out --plain-password to store only its HA1 values"
        )
    return {
        "password": password if plain_password else None,
        "ha1": compute_ha1("MD5", username, realm, password),
        "ha1_sha256": compute_ha1("SHA-256", username, realm, password),
        "ha1_sha512t256": compute_ha1("SHA-512-256", username, realm, password),
    }


async def subscriber_command(
    store: Store,
    action: str,
    aor: str,
    *,
    realm: str | None = None,
    plain_password: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Run ``msilo subscriber ACTION AOR`` on an open ``store``; returns the exit code (0).

    ``realm``: the digest realm the HA1s are computed over -- pass ``auth.realm`` or, when
    that is empty, the first of ``server.domains`` (what the server challenges with); None
    uses the subscriber's domain (OpenSIPS's convention, realm = domain).  Raises
    ``ConfigError`` for a bad argument or password, ``SubscriberError`` when the user exists
    (add) or does not (passwd, remove), ``StorageError`` when the database fails.
    """
    if action not in ACTIONS:
        raise ConfigError(f"subscriber: unknown action {action!r} (add, passwd, remove)")
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    user, domain = parse_subscriber(aor)
    who = f"{user}@{domain}"
    existing = await store.get_subscriber(user, domain)
    if action == "remove":
        if existing is None or not await store.remove_subscriber(user, domain):
            raise SubscriberError(f"no subscriber {who}")
        print(f"removed subscriber {who}", file=stdout)
        return 0
    if action == "add" and existing is not None:
        raise SubscriberError(f"subscriber {who} exists: use `msilo subscriber passwd {who}`")
    if action == "passwd" and existing is None:
        raise SubscriberError(f"no subscriber {who}: use `msilo subscriber add {who}`")
    hash_realm = realm or domain
    password = read_password(stdin)
    creds = credentials_for(user, hash_realm, password, plain_password=plain_password)
    await store.set_subscriber(
        user,
        domain,
        password=creds["password"],
        ha1=creds["ha1"],
        ha1_sha256=creds["ha1_sha256"],
        ha1_sha512t256=creds["ha1_sha512t256"],
    )
    verb = "added" if action == "add" else "changed password of"
    kept = ", plain password kept" if plain_password else ""
    print(f"{verb} subscriber {who} (HA1 for realm {hash_realm!r}{kept})", file=stdout)
    return 0
