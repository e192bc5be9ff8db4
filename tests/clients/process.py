"""What the baresip and linphonec harnesses share: a client process and bounded waits.

Each client runs in its own session (process group) with its own config directory
(and HOME) under the test's tmp path, its stdout and stderr copied to files there,
so a failing test shows what the client printed. ``vanish()`` SIGKILLs the group:
a phone whose battery died, which never unregisters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.clients.trace import TracedMessage

T = TypeVar("T")

# Every client is started under `stdbuf -oL`: their stdio is block-buffered on a pipe,
# and a test waits on what they print.
LINE_BUFFERED = ("stdbuf", "-oL")


@dataclass(frozen=True)
class Shown:
    """A MESSAGE as the client showed it to its user: who sent it and its text."""

    sender: str
    text: str


@dataclass(frozen=True)
class Sent:
    """The outcome of a MESSAGE a client sent: the final status on the wire and
    what the client made of it (its own words, or "" when it says nothing)."""

    status: int
    call_id: str
    verdict: str


class ClientError(AssertionError):
    """A client did not do what the test waited for; the message has its output."""


class ClientProcess:
    """A started SIP client: its process, its captured output, and bounded waits."""

    name: str
    workdir: Path
    sip_port: int

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: asyncio.subprocess.Process | None = None
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def local(self) -> str:
        """``host:port`` of the client's SIP socket."""
        return f"127.0.0.1:{self.sip_port}"

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *LINE_BUFFERED,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout, self._stdout, "stdout")),
            asyncio.create_task(self._pump(self.proc.stderr, self._stderr, "stderr")),
        ]

    async def _pump(self, stream: asyncio.StreamReader, sink: bytearray, what: str) -> None:
        with (self.workdir / f"{what}.log").open("wb") as copy:
            while chunk := await stream.read(65536):
                sink.extend(chunk)
                copy.write(chunk)
                copy.flush()

    @property
    def stdout(self) -> str:
        return self._stdout.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    def trace(self) -> list[TracedMessage]:
        """Every SIP message the client logged so far, in order."""
        raise NotImplementedError

    def diagnostics(self) -> str:
        """The tail of what the client printed, for a failure message."""
        return (
            f"--- {self.name} stdout (tail) ---\n{self.stdout[-3000:]}\n"
            f"--- {self.name} stderr (tail) ---\n{self.stderr[-2000:]}"
        )

    async def wait_until(
        self, probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
    ) -> T:
        """Poll ``probe`` until it returns something other than None (or fail, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value is not None:
                return value
            if self.proc is not None and self.proc.returncode is not None:
                raise ClientError(
                    f"{self.name} exited ({self.proc.returncode}) waiting for {what}\n"
                    + self.diagnostics()
                )
            if time.monotonic() >= deadline:
                raise ClientError(
                    f"{self.name}: timed out waiting for {what}\n" + self.diagnostics()
                )
            await asyncio.sleep(interval)

    # Registration, read off the wire (both clients register on their own at start-up).

    def registrations(self) -> list[tuple[TracedMessage, TracedMessage]]:
        """(REGISTER, its final response) pairs so far, in order."""
        messages = self.trace()
        pairs = []
        for request in messages:
            if not (request.outgoing and request.is_request and request.method == "REGISTER"):
                continue
            for response in messages:
                if (
                    not response.outgoing
                    and not response.is_request
                    and response.status >= 200
                    and response.call_id == request.call_id
                    and response.cseq == request.cseq
                ):
                    pairs.append((request, response))
                    break
        return pairs

    def is_registered(self) -> bool:
        """Whether the latest REGISTER that got a final answer added a binding (2xx)."""
        pairs = self.registrations()
        if not pairs:
            return False
        request, response = pairs[-1]
        return 200 <= response.status < 300 and request.expires() != 0

    async def wait_registered(self, timeout: float = 10.0) -> TracedMessage:
        """Wait for a 2xx to a REGISTER adding a binding; returns that REGISTER."""

        def done() -> TracedMessage | None:
            pairs = self.registrations()
            if pairs and self.is_registered():
                return pairs[-1][0]
            return None

        return await self.wait_until(done, timeout, "a 2xx to its REGISTER")

    async def wait_unregistered(self, timeout: float = 10.0) -> None:
        """Wait for a 2xx to a REGISTER with expiry 0 (RFC 3261 §10.2.2)."""

        def done() -> bool | None:
            for request, response in self.registrations():
                if request.expires() == 0 and 200 <= response.status < 300:
                    return True
            return None

        await self.wait_until(done, timeout, "a 2xx to its de-registration")

    def incoming_messages(self) -> list[TracedMessage]:
        """The MESSAGE requests that reached the client (retransmissions included)."""
        return [
            m for m in self.trace() if not m.outgoing and m.is_request and m.method == "MESSAGE"
        ]

    def shown(self) -> list[Shown]:
        """The MESSAGEs the client showed its user, in order."""
        raise NotImplementedError

    async def wait_shown(self, count: int, timeout: float = 10.0) -> list[Shown]:
        """Wait until the client has shown at least ``count`` MESSAGEs."""

        def done() -> list[Shown] | None:
            shown = self.shown()
            return shown if len(shown) >= count else None

        return await self.wait_until(done, timeout, f"{count} MESSAGE(s) shown")

    async def _outcome(
        self, body: str, after: int, timeout: float
    ) -> tuple[TracedMessage, TracedMessage]:
        """The MESSAGE with ``body`` sent after trace index ``after``, and its final response."""

        def done() -> tuple[TracedMessage, TracedMessage] | None:
            messages = self.trace()[after:]
            sent = next(
                (
                    m
                    for m in messages
                    if m.outgoing and m.is_request and m.method == "MESSAGE" and m.body == body
                ),
                None,
            )
            if sent is None:
                return None
            for m in messages:
                if (
                    not m.outgoing
                    and not m.is_request
                    and m.status >= 200
                    and m.call_id == sent.call_id
                    and m.method == "MESSAGE"
                ):
                    return sent, m
            return None

        return await self.wait_until(done, timeout, f"a final response to MESSAGE {body!r}")

    async def _exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise ClientError(
                f"{self.name} did not exit in {timeout} s\n" + self.diagnostics()
            ) from None
        await asyncio.gather(*self._pumps)
        return code

    async def vanish(self) -> None:
        """SIGKILL the client: it sends nothing more, its bindings stay (a dead phone)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self._exit(10)

    async def close(self) -> None:
        """Teardown: make sure nothing of the client is left running."""
        await self.vanish()
