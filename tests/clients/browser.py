"""Real browsers for the SIP-over-WebSocket tests: headless Chromium driven by Playwright.

The pages are the README's JsSIP page (written out as printed) and its SIP.js twin
(``web/sipjs.html``), served with the npm packages ``make test-deps`` installed in
``web/node_modules`` by a static file server of the test's own on 127.0.0.1: nothing
is fetched from anywhere else (every other request a page makes is refused and fails
the test). Each user is its own browser context (its own profile: localStorage,
so its own +sip.instance), as two people on two machines would be.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    Page,
    Route,
    async_playwright,
)

ROOT = Path(__file__).resolve().parents[2]
WEB = Path(__file__).resolve().parent / "web"
README = ROOT / "README.md"
# Bounded waits for a page (Playwright's default is 30 s per step).
STEP_TIMEOUT_MS = 15_000


def readme_page() -> str:
    """The README's minimal JsSIP page, exactly as printed."""
    text = README.read_text()
    start = text.index("### A minimal JsSIP page")
    match = re.compile(r"```html\n(.*?)```", re.S).search(text, start)
    assert match is not None, "README lost its JsSIP page"
    return match.group(1)


def readme_commands() -> tuple[str, str]:
    """The README's serve command and its ``npm install`` line for the page."""
    text = README.read_text()
    start = text.index("### A minimal JsSIP page")
    blocks = re.compile(r"```sh\n(.*?)```", re.S).findall(text, start)
    serve = blocks[0].strip()
    [npm] = [line for line in blocks[1].splitlines() if line.startswith("npm install")]
    return serve, npm


def installed_version(package: str) -> str:
    """The version of an npm package in web/node_modules (fails when test-deps did not run)."""
    manifest = WEB / "node_modules" / package / "package.json"
    if not manifest.exists():
        pytest.fail(f"{manifest} is missing: run make test-deps (npm ci in {WEB})")
    return str(json.loads(manifest.read_text())["version"])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a page load is dozens of requests; failures show in the page's console


@contextlib.contextmanager
def static_site(where: Path) -> Iterator[str]:
    """Serve the test pages and web/node_modules from ``where`` on 127.0.0.1; yields the
    base URL. The README page is ``jssip.html``, the SIP.js page ``sipjs.html``."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "jssip.html").write_text(readme_page())
    shutil.copy(WEB / "sipjs.html", where / "sipjs.html")
    (where / "node_modules").symlink_to(WEB / "node_modules")
    handler = functools.partial(_Quiet, directory=str(where))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="static-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Person:
    """One user's browser (a context of its own) and what its pages said."""

    user: str
    context: BrowserContext
    site: str
    page_name: str
    server: str
    log: list[str] = field(default_factory=list)
    page: Page | None = None

    async def open(self) -> Page:
        """Open the chat page, log in as ``user`` and wait until registered."""
        page = await self.context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.log.append(f"pageerror: {exc}"))
        self.page = page
        await page.goto(f"{self.site}/{self.page_name}?server={self.server}")
        await page.fill("#me", self.user)
        await page.click("#login")
        await self.wait_text("#state", "registered")
        return page

    def _console(self, message: ConsoleMessage) -> None:
        self.log.append(f"console.{message.type}: {message.text}")

    async def close(self) -> None:
        """Close the tab (its WebSocket goes with it)."""
        if self.page is not None:
            await self.page.close()
            self.page = None

    async def send(self, to: str, text: str) -> str:
        """Send ``text`` to ``to`` from the page; returns what the page showed as the result."""
        page = self._page()
        await page.fill("#to", to)
        await page.fill("#text", text)
        await page.eval_on_selector("#result", "e => { e.value = ''; }")  # the last send's
        await page.click("#send")
        await self.wait_filled("#result")
        return await self._value("#result")

    async def inbox(self, count: int) -> list[str]:
        """Wait until the page's inbox shows ``count`` messages; returns their lines."""
        page = self._page()
        try:
            await page.wait_for_function(
                "n => document.querySelectorAll('#inbox li').length >= n", arg=count
            )
        except Error as exc:
            raise AssertionError(f"{self.user}'s inbox: {exc}") from exc
        return await page.locator("#inbox li").all_inner_texts()

    async def _value(self, selector: str) -> str:
        value = await self._page().eval_on_selector(selector, "e => e.value")
        return str(value)

    async def wait_filled(self, selector: str) -> None:
        try:
            await self._page().wait_for_function(
                "s => document.querySelector(s).value !== ''", arg=selector
            )
        except Error as exc:
            raise AssertionError(f"{self.user}: {selector}: {exc}") from exc

    async def wait_text(self, selector: str, expected: str) -> None:
        await self.wait_filled(selector)
        value = await self._value(selector)
        assert value == expected, f"{self.user}: {selector} = {value!r}"

    def _page(self) -> Page:
        assert self.page is not None, f"{self.user}'s page is not open"
        return self.page

    def diagnostics(self) -> str:
        return f"--- {self.user}'s console ---\n" + "\n".join(self.log[-60:])


class Browsers:
    """Headless Chromium and a context per person; only 127.0.0.1 is reachable."""

    def __init__(self, browser: Browser, site: str) -> None:
        self.browser = browser
        self.site = site
        self.people: list[Person] = []
        self.contexts: list[BrowserContext] = []
        self.refused: list[str] = []

    async def new_context(self) -> BrowserContext:
        """A new browser profile that can load nothing but pages on 127.0.0.1 (WebSockets
        are not routed by Playwright's HTTP routing: the pages open only the one given)."""
        context = await self.browser.new_context()
        self.contexts.append(context)
        await context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), self._refuse)
        return context

    async def person(self, user: str, page_name: str, server: str) -> Person:
        """A new browser profile for ``user`` that opens ``page_name`` against ``server``."""
        person = Person(user, await self.new_context(), self.site, page_name, server)
        self.people.append(person)
        return person

    async def _refuse(self, route: Route) -> None:
        self.refused.append(route.request.url)
        await route.abort()

    def diagnostics(self) -> str:
        return "\n".join(p.diagnostics() for p in self.people)


@contextlib.asynccontextmanager
async def chromium(site: str) -> AsyncIterator[Browsers]:
    """Headless Debian Chromium (``/usr/bin/chromium``, installed by make test-deps)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: make test-deps (Debian: chromium)")
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=executable, headless=True)
        browsers = Browsers(browser, site)
        try:
            yield browsers
        finally:
            for context in browsers.contexts:
                await context.close()
            await browser.close()
        assert not browsers.refused, f"pages asked for outside addresses: {browsers.refused}"
