"""Browsers as msilo's users: JsSIP and SIP.js in headless Chromium over SIP over WebSocket.

A real ``msilo serve`` (two workers, registrar mode) with only the README's ``ws:``
listener; each user is a Chromium profile of its own on the README's JsSIP page, run as
printed, or on the same page built with SIP.js. The npm packages are the pinned ones in
``web/package.json`` (``make test-deps`` runs ``npm ci``); nothing is fetched at run time.
The ``server.ws_origins`` allow-list is checked against the Origin a real page sends.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from msilo.storage import open_store
from msilo.storage.location import Binding
from tests.clients.browser import (
    ROOT,
    Browsers,
    chromium,
    installed_version,
    readme_commands,
    static_site,
)
from tests.server.conftest import Instance, free_tcp_port

PAGES = {"jssip": "jssip.html", "sipjs": "sipjs.html"}
# The page shows the arrival-date prefix msilo adds to a stored text/plain body (msilo.add_date).
OFFLINE = re.compile(r"^alice: \[Offline message - \w{3} \w{3} +\d{1,2} \d\d:\d\d:\d\d \d{4}\] ")


@pytest.fixture
def ws_port() -> int:
    return free_tcp_port()


@pytest.fixture
def msilo_overrides(ws_port: int) -> tuple[str, ...]:
    """The README's listener (``--set 'server.listen=["ws:127.0.0.1:8080"]'``) on a free port."""
    serve, _ = readme_commands()
    argv = shlex.split(serve)
    assert argv[:3] == ["msilo", "serve", "--set"] and len(argv) == 4, serve
    assert argv[3] == 'server.listen=["ws:127.0.0.1:8080"]', serve
    return (argv[3].replace(":8080", f":{ws_port}"),)


@pytest.fixture
async def browsers(tmp_path: Path) -> AsyncIterator[Browsers]:
    with static_site(tmp_path / "site") as site:
        async with chromium(site) as running:
            yield running


async def _count(db_url: str, user: str) -> int:
    async with open_store(db_url) as store:
        return await store.count(user, "127.0.0.1")


async def _bindings(db_url: str, user: str) -> list[Binding]:
    async with open_store(db_url) as store:
        return await store.lookup_bindings(user, "127.0.0.1", now=int(time.time()))


async def _wait_count(db_url: str, user: str, expected: int) -> None:
    for _ in range(100):  # bounded: 10 s
        if await _count(db_url, user) == expected:
            return
        await asyncio.sleep(0.1)
    assert await _count(db_url, user) == expected


def test_the_pages_use_the_pinned_packages() -> None:
    # The README tells people to install the JsSIP the test runs.
    _, npm = readme_commands()
    assert npm.split()[:3] == ["npm", "install", f"jssip@{installed_version('jssip')}"], npm
    assert installed_version("sip.js") == "0.21.2"


@pytest.mark.parametrize("library", sorted(PAGES))
async def test_a_message_to_a_closed_tab_is_stored_and_shown_when_it_opens_again(
    library: str, msilo: Instance, browsers: Browsers, ws_port: int
) -> None:
    server = f"ws://127.0.0.1:{ws_port}/"
    bob = await browsers.person("bob", PAGES[library], server)
    alice = await browsers.person("alice", PAGES[library], server)
    try:
        await bob.open()  # bob's tab registers (a device: its +sip.instance)...
        [first] = await _bindings(msilo.db_url, "bob")
        # RFC 7118 §5.2: a host nobody can resolve; msilo keeps the connection instead.
        assert re.search(r"@[\w-]+\.invalid;transport=ws\b", first.contact), first.contact
        assert first.received is not None and first.received.startswith("ws:127.0.0.1:")
        await bob.close()  # ...and is closed: its binding stays, its connection is gone
        await alice.open()
        text = f"hello bob {uuid.uuid4().hex[:8]}"
        # JsSIP's sendMessage "succeeded" / SIP.js's Messager onAccept, with msilo's 202:
        # stored for bob's device, not lost and not left to time out.
        assert await alice.send("bob", text) == "202 Accepted"
        assert await _count(msilo.db_url, "bob") == 1
        await bob.open()  # the tab opens again, same profile: the same device
        [shown] = await bob.inbox(1)
        [again] = await _bindings(msilo.db_url, "bob")  # one device: its binding was replaced
        assert again.instance == first.instance and again.received != first.received
        assert OFFLINE.match(shown) and shown.endswith(text), shown
        # The page's 200 settled it: nothing is left for bob.
        await _wait_count(msilo.db_url, "bob", 0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{browsers.diagnostics()}\n{msilo.log()[-4000:]}") from exc


@pytest.mark.parametrize("library", sorted(PAGES))
async def test_two_open_tabs_reach_each_other_live(
    library: str, db_url: str, tmp_path: Path, msilo_overrides: tuple[str, ...],
    browsers: Browsers, ws_port: int,
) -> None:  # fmt: skip
    # Two workers (the default here): each tab's connection may be on either, and a relay
    # reaches bob's through the worker that holds it (README "Several workers").
    instance = Instance(tmp_path, "msilo-2", db_url, msilo_overrides)
    try:
        await instance.wait_ready(workers=2)
        server = f"ws://127.0.0.1:{ws_port}/"
        bob = await browsers.person("bob", PAGES[library], server)
        alice = await browsers.person("alice", PAGES[library], server)
        await bob.open()
        await alice.open()
        assert await alice.send("bob", "are you there?") == "200 OK"
        assert await bob.inbox(1) == ["alice: are you there?"]
        assert await bob.send("alice", "yes") == "200 OK"
        assert await alice.inbox(1) == ["bob: yes"]
        assert await _count(db_url, "bob") == 0
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{browsers.diagnostics()}\n{instance.log()[-4000:]}") from exc
    finally:
        instance.kill_all()


def test_make_test_deps_installs_the_browser_and_the_npm_packages() -> None:
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "test-deps"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "chromium:chromium" in out.stdout and "npm:npm" in out.stdout  # Debian packages
    assert "cd tests/clients/web && npm ci" in out.stdout  # the lock file's versions
    assert "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1" in out.stdout  # the system Chromium only


_OPEN_WS = """url => new Promise(resolve => {
    const ws = new WebSocket(url, "sip");
    ws.onopen = () => { resolve("open " + ws.protocol); ws.close(); };
    ws.onerror = () => resolve("refused");
})"""


async def test_the_origin_allow_list_holds_for_a_real_browser(
    db_url: str, tmp_path: Path, browsers: Browsers, ws_port: int
) -> None:
    # Two sites on 127.0.0.1 are two origins (another port): only the listed one may connect.
    with static_site(tmp_path / "other") as other:
        allowed = browsers.site
        instance = Instance(
            tmp_path, "msilo-origins", db_url,
            (f'server.listen=["ws:127.0.0.1:{ws_port}"]', f'server.ws_origins=["{allowed}"]'),
        )  # fmt: skip
        try:
            await instance.wait_ready(workers=2)
            page = await (await browsers.new_context()).new_page()
            url = f"ws://127.0.0.1:{ws_port}/"
            await page.goto(f"{allowed}/sipjs.html")
            assert await page.evaluate(_OPEN_WS, url) == "open sip"
            await page.goto(f"{other}/sipjs.html")  # cross-site WebSocket hijacking
            assert await page.evaluate(_OPEN_WS, url) == "refused"
            assert "status=403 reason='origin not allowed'" in instance.log()
        finally:
            instance.kill_all()


# How each page words msilo's 486 Mailbox Full (JsSIP maps statuses to its causes).
REFUSED = {"jssip": "failed: Busy", "sipjs": "failed: 486 Mailbox Full"}


@pytest.mark.parametrize("library", sorted(PAGES))
async def test_a_full_mailbox_shows_as_a_failed_send_on_the_senders_page(
    library: str, db_url: str, tmp_path: Path, msilo_overrides: tuple[str, ...],
    browsers: Browsers, ws_port: int,
) -> None:  # fmt: skip
    instance = Instance(tmp_path, "msilo-quota", db_url, (*msilo_overrides, "msilo.max_messages=1"))
    try:
        await instance.wait_ready(workers=2)
        alice = await browsers.person("alice", PAGES[library], f"ws://127.0.0.1:{ws_port}/")
        await alice.open()
        assert await alice.send("carol", "first") == "202 Accepted"
        assert await alice.send("carol", "second") == REFUSED[library]
        assert await _count(db_url, "carol") == 1
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{browsers.diagnostics()}\n{instance.log()[-4000:]}") from exc
    finally:
        instance.kill_all()
