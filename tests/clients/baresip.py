"""baresip (Debian ``baresip-core``, 1.0.x) as a test client, driven through ``ctrl_tcp``.

``ctrl_tcp`` takes netstrings (``<len>:<json>,``) of ``{"command", "params", "token"}``
and answers ``{"response": true, "ok", "data", "token"}``; UA events come on the same
connection, but only while one is open, so registration is read off the SIP trace.

What baresip 1.0 does, as observed (and read in its source):
- REGISTER Contact is ``<sip:USER-0x<pointer>@host:port>``: the user part changes
  every run. ``+sip.instance="<urn:uuid:...>"`` is added when the ``uuid`` module is
  loaded; it reads (or creates) ``<config dir>/uuid``, so a device keeps one instance.
- A received text/plain MESSAGE is answered 200 and shown by the ``menu`` module
  through the UI (``stdio`` writes it to stderr as ``\\r<from>: "<text>"``). There is
  no de-duplication: a second MESSAGE with the same Call-ID is shown again.
- Sending is the ``contact`` module's ``message`` command, to the *current* contact
  (1.0 has no "message to URI" command); a 2xx, 202 included, prints nothing, a
  final >= 300 prints ``<code> <reason>`` on stderr.
- ``quit`` de-registers (``expires=0``) and waits for the answer before exiting.
- It listens on UDP, TCP and TLS whatever the config says (TLS on the SIP port + 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import orjson

from tests.clients.process import ClientError, ClientProcess, Sent, Shown
from tests.clients.trace import TracedMessage, baresip_trace
from tests.service.sipua import free_port

MODULE_PATH = "/usr/lib/baresip/modules"

# menu's message handler: ui_output("\r%r: \"%b\"\n", peer, body)
_SHOWN = re.compile(r'^\r?(sips?:\S+): "(.*)"$', re.MULTILINE)
_SEND_ERROR = re.compile(r"\x1b\[31m(\d{3} [^\x1b]*)\x1b\[;m")


def _free_ports() -> tuple[int, int]:
    """A SIP port P and a control port for one baresip.

    baresip 1.0 always listens on UDP and TCP P and on TLS P + 1 (its ``ua_init`` turns
    on all three transports; there is no setting), so P + 1 must be free for TCP too.
    The ports are held together while they are picked, so the control port is neither.
    """
    while True:
        sip = free_port()
        held: list[socket.socket] = []
        try:
            for port in (sip, sip + 1, 0):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return sip, int(held[-1].getsockname()[1])
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()


class Baresip(ClientProcess):
    """One baresip with one account ``user@domain``, registering through ``registrar``."""

    def __init__(
        self,
        workdir: Path,
        user: str,
        registrar: tuple[str, int],
        *,
        domain: str = "127.0.0.1",
        peers: tuple[str, ...] = (),
        instance: str | None = None,
        regint: int = 600,
    ) -> None:
        super().__init__(f"baresip[{user}]", workdir)
        self.user = user
        self.aor = f"sip:{user}@{domain}"
        self.registrar = registrar
        self.peers = peers
        self.instance = instance or str(uuid.uuid4())
        self.regint = regint
        self.sip_port, self.ctrl_port = _free_ports()
        self._tokens = itertools.count(1)
        self._responses: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ctrl_task: asyncio.Task[None] | None = None

    def _write_config(self) -> None:
        host, port = self.registrar
        # No audio module at all: MESSAGE needs none, and CI has no sound device.
        config = f"""\
poll_method		epoll
sip_listen		127.0.0.1:{self.sip_port}
module_path		{MODULE_PATH}
module			stdio.so
module_tmp		uuid.so
module_tmp		account.so
module_app		contact.so
module_app		menu.so
module_app		ctrl_tcp.so
ctrl_tcp_listen		127.0.0.1:{self.ctrl_port}
"""
        (self.workdir / "config").write_text(config)
        (self.workdir / "accounts").write_text(
            f'<{self.aor}>;outbound="sip:{host}:{port}";regint={self.regint}\n'
        )
        # contact's "message" goes to the current contact: every peer is listed here.
        (self.workdir / "contacts").write_text("".join(f"<{peer}>\n" for peer in self.peers))
        if self.peers:
            (self.workdir / "current_contact").write_text(f"<{self.peers[0]}>")
        # the uuid module reads the instance id from here (+sip.instance, RFC 5626 §4.1)
        (self.workdir / "uuid").write_text(self.instance)

    async def start(self) -> Baresip:
        """Start baresip (it registers on its own) and connect to its control port."""
        self._write_config()
        env = {**os.environ, "HOME": str(self.workdir)}
        # -s: print every SIP message (the trace the tests read); -f: config dir.
        await self._spawn(["baresip", "-f", str(self.workdir), "-s"], env)
        await self._connect()
        return self

    async def _connect(self, timeout: float = 10.0) -> None:
        async def attempt() -> bool | None:
            try:
                self._reader, self._writer = await asyncio.open_connection(
                    "127.0.0.1", self.ctrl_port
                )
            except OSError:
                return None
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await attempt() is None:
            if (
                self.proc is not None and self.proc.returncode is not None
            ) or loop.time() > deadline:
                raise ClientError(
                    f"{self.name}: no ctrl_tcp on {self.ctrl_port}\n" + self.diagnostics()
                )
            await asyncio.sleep(0.05)
        self._ctrl_task = asyncio.create_task(self._read_ctrl())

    async def _read_ctrl(self) -> None:
        assert self._reader is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                length = int((await self._reader.readuntil(b":"))[:-1])
                payload = await self._reader.readexactly(length + 1)  # the JSON and its ","
                message = orjson.loads(payload[:-1])
                if message.get("response"):
                    future = self._responses.pop(message.get("token", ""), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    self.events.append(message)

    async def command(
        self, command: str, params: str | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Run a baresip command over ctrl_tcp; returns its response object."""
        assert self._writer is not None
        token = str(next(self._tokens))
        request: dict[str, str] = {"command": command, "token": token}
        if params is not None:
            request["params"] = params
        payload = orjson.dumps(request)
        future = asyncio.get_running_loop().create_future()
        self._responses[token] = future
        self._writer.write(str(len(payload)).encode() + b":" + payload + b",")
        await self._writer.drain()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ClientError(
                f"{self.name}: no answer to {command!r}\n" + self.diagnostics()
            ) from None

    def trace(self) -> list[TracedMessage]:
        return baresip_trace(self.stdout, self.local)

    def shown(self) -> list[Shown]:
        return [Shown(m.group(1), m.group(2)) for m in _SHOWN.finditer(self.stderr)]

    async def _select_peer(self, uri: str) -> None:
        if uri not in self.peers:
            raise ValueError(f"{uri} is not one of this baresip's contacts {self.peers}")
        for _ in self.peers:  # back to the first contact...
            await self.command("contact_prev")
        for _ in range(self.peers.index(uri)):  # ...then forward to this one
            await self.command("contact_next")

    async def send_message(self, uri: str, text: str, timeout: float = 10.0) -> Sent:
        """Send ``text`` to ``uri`` (one of ``peers``) and wait for its final response."""
        await self._select_peer(uri)
        after = len(self.trace())
        errors_before = len(_SEND_ERROR.findall(self.stderr))
        response = await self.command("message", text)
        if not response.get("ok"):
            raise ClientError(
                f"{self.name}: message command failed: {response}\n" + self.diagnostics()
            )
        sent, final = await self._outcome(text, after, timeout)
        # what baresip tells its user: only a failure is printed (after the response)
        verdict = ""
        if final.status >= 300:
            errors = await self.wait_until(
                lambda: _SEND_ERROR.findall(self.stderr)[errors_before:] or None,
                5,
                "the error line",
            )
            verdict = errors[0].strip()
        return Sent(final.status, sent.call_id, verdict)

    def contact(self) -> str:
        """The Contact of its latest REGISTER."""
        pairs = self.registrations()
        if not pairs:
            raise ClientError(f"{self.name} has not registered\n" + self.diagnostics())
        return pairs[-1][0].header("contact") or ""

    async def quit(self, timeout: float = 15.0) -> int:
        """``quit``: baresip de-registers, waits for the answer, and exits."""
        await self.command("quit")
        code = await self._exit(timeout)
        await self._close_ctrl()
        return code

    async def _close_ctrl(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._ctrl_task is not None:
            self._ctrl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ctrl_task

    async def vanish(self) -> None:
        await super().vanish()
        await self._close_ctrl()
