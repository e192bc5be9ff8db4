"""``msilo subscriber add|passwd|remove`` on both backends, the password from stdin."""

from __future__ import annotations

import io

import pytest

from msilo.auth import compute_ha1
from msilo.cli_subscriber import subscriber_command
from msilo.errors import ConfigError, SubscriberError
from msilo.storage import Store


class Pipe(io.StringIO):
    """stdin that is not a terminal (``echo pw | msilo subscriber add ...``)."""

    def isatty(self) -> bool:
        return False


async def run(store: Store, action: str, aor: str, stdin: str = "", **kw: object) -> str:
    out = io.StringIO()
    code = await subscriber_command(store, action, aor, stdin=Pipe(stdin), stdout=out, **kw)  # type: ignore[arg-type]
    assert code == 0
    return out.getvalue()


async def test_add_stores_the_ha1_of_every_algorithm_and_no_plain_password(
    store: Store, realm: str
) -> None:
    out = await run(store, "add", f"alice@{realm}", "s3cret pw\n")
    assert "s3cret" not in out and "added" in out
    sub = await store.get_subscriber("alice", realm)
    assert sub is not None
    assert sub.password == ""
    assert sub.ha1 == compute_ha1("MD5", "alice", realm, "s3cret pw")  # spaces are kept
    assert sub.ha1_sha256 == compute_ha1("SHA-256", "alice", realm, "s3cret pw")
    assert sub.ha1_sha512t256 == compute_ha1("SHA-512-256", "alice", realm, "s3cret pw")


async def test_add_hashes_over_the_configured_realm_and_can_keep_the_plain_password(
    store: Store, realm: str
) -> None:
    await run(
        store, "add", f"sip:bob@{realm.upper()}", "pw\r\n", realm="Example Realm",
        plain_password=True,
    )  # fmt: skip
    sub = await store.get_subscriber("bob", realm)  # domain lower-cased
    assert sub is not None and sub.password == "pw"
    assert sub.ha1_sha256 == compute_ha1("SHA-256", "bob", "Example Realm", "pw")


async def test_add_refuses_an_existing_subscriber(store: Store, realm: str) -> None:
    await run(store, "add", f"alice@{realm}", "one\n")
    with pytest.raises(SubscriberError, match="exists"):
        await run(store, "add", f"alice@{realm}", "two\n")
    sub = await store.get_subscriber("alice", realm)
    assert sub is not None and sub.ha1 == compute_ha1("MD5", "alice", realm, "one")


async def test_passwd_replaces_the_credentials(store: Store, realm: str) -> None:
    await run(store, "add", f"alice@{realm}", "old\n", plain_password=True)
    out = await run(store, "passwd", f"alice@{realm}", "new\n")
    assert "new" not in out.replace("changed", "")
    sub = await store.get_subscriber("alice", realm)
    assert sub is not None
    assert sub.password == ""  # the old plain password is gone too
    assert sub.ha1 == compute_ha1("MD5", "alice", realm, "new")


async def test_passwd_and_remove_need_an_existing_subscriber(store: Store, realm: str) -> None:
    with pytest.raises(SubscriberError, match="no subscriber"):
        await run(store, "passwd", f"ghost@{realm}", "pw\n")
    with pytest.raises(SubscriberError, match="no subscriber"):
        await run(store, "remove", f"ghost@{realm}")


async def test_remove_deletes_the_subscriber(store: Store, realm: str) -> None:
    await run(store, "add", f"alice@{realm}", "pw\n")
    assert "removed" in await run(store, "remove", f"alice@{realm}")
    assert await store.get_subscriber("alice", realm) is None


@pytest.mark.parametrize(
    ("aor", "stdin", "kw", "message"),
    [
        ("alice", "pw\n", {}, "user@domain"),
        ("@REALM", "pw\n", {}, "user@domain"),
        ("alice@REALM", "\n", {}, "empty password"),
        ("alice@REALM", "", {}, "empty password"),
        ("alice@REALM", "x" * 30 + "\n", {"plain_password": True}, "25 characters"),
    ],
)
async def test_bad_input_is_a_usage_error_and_stores_nothing(
    store: Store, realm: str, aor: str, stdin: str, kw: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        await run(store, "add", aor.replace("REALM", realm), stdin, **kw)
    assert await store.get_subscriber("alice", realm) is None


async def test_a_terminal_gets_a_prompt_without_echo_and_a_confirmation(
    store: Store, realm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[str] = []
    answers = iter(["pw", "pw", "pw", "typo"])

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", fake_getpass)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = io.StringIO()
    await subscriber_command(store, "add", f"alice@{realm}", stdin=Tty(), stdout=out)
    assert prompts == ["Password: ", "Retype password: "]
    sub = await store.get_subscriber("alice", realm)
    assert sub is not None and sub.ha1 == compute_ha1("MD5", "alice", realm, "pw")
    with pytest.raises(ConfigError, match="do not match"):
        await subscriber_command(store, "passwd", f"alice@{realm}", stdin=Tty(), stdout=out)
