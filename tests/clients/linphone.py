"""linphonec (Debian ``linphone-cli``, liblinphone 5.1) as a test client, driven on stdin.

``linphonecsh`` is no use here: it talks to one daemon per Unix user through a fixed
socket (``/tmp/linphonec-<uid>``), so two clients on one machine would share it.
linphonec itself reads commands from a pipe (no terminal needed) and prints what its
user would see on stdout; with ``-d 6 -l FILE`` it logs every SIP message.

What linphonec 5.1 needs and does, as observed (and read in liblinphone's source):
- ``[sip] auto_net_state_mon=0``: without it liblinphone waits for a default route
  before it opens its sockets (none on a CI box limited to loopback). But then the
  network is never "reachable", and it would not register either:
  ``register_only_when_network_is_up=0`` is needed too.
- REGISTER Contact is ``<sip:USER@host:port;transport=udp>;+sip.instance="<urn:uuid:X>"``
  with X from ``[misc] uuid`` (generated and saved on first start when absent).
- A received MESSAGE is printed ``Message received from <from>: <text>``. Incoming
  MESSAGEs are de-duplicated on their Call-ID (the IMDN id of a basic chat room is
  the Call-ID): a second one with the same Call-ID is answered but not shown.
- ``chat <uri> <text>`` sends the rest of the line as the body, verbatim (quotes
  included). Any 2xx, 202 included, moves the message to state ``Delivered``; a
  failure to ``NotDelivered``. Neither is printed; the log says it.
- ``quit`` exits without de-registering; ``unregister`` de-registers.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from tests.clients.process import ClientError, ClientProcess, Sent, Shown
from tests.clients.trace import TracedMessage, belle_sip_trace
from tests.service.sipua import free_port

_SHOWN = re.compile(r"Message received from (\S+): (.*)$", re.MULTILINE)
_STATE = re.compile(r"Chat message (0x[0-9a-f]+) of chat room .*? : moving from (\w+) to (\w+)")


class Linphonec(ClientProcess):
    """One linphonec with one account ``user@domain``, registering through ``registrar``."""

    def __init__(
        self,
        workdir: Path,
        user: str,
        registrar: tuple[str, int],
        *,
        domain: str = "127.0.0.1",
        instance: str | None = None,
        expires: int = 600,
    ) -> None:
        super().__init__(f"linphonec[{user}]", workdir)
        self.user = user
        self.aor = f"sip:{user}@{domain}"
        self.registrar = registrar
        self.instance = instance or str(uuid.uuid4())
        self.expires = expires
        self.sip_port = free_port()
        self.rc = workdir / "linphonerc"
        self.log_path = workdir / "linphonec.log"

    def _write_config(self) -> None:
        host, port = self.registrar
        rc = f"""\
[sip]
sip_port={self.sip_port}
sip_tcp_port=0
sip_tls_port=0
bind_address=127.0.0.1
auto_net_state_mon=0
register_only_when_network_is_up=0
default_proxy=0

[proxy_0]
reg_proxy=<sip:{host}:{port};transport=udp>
reg_identity={self.aor}
reg_expires={self.expires}
reg_sendregister=1
publish=0

[misc]
uuid={self.instance}

[video]
capture=0
display=0
"""
        self.rc.write_text(rc)
        # liblinphone keeps its chat database under $HOME; it must exist beforehand.
        (self.workdir / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)

    async def start(self) -> Linphonec:
        """Start linphonec; it registers on its own."""
        self._write_config()
        env = {**os.environ, "HOME": str(self.workdir)}
        argv = ["linphonec", "-c", str(self.rc), "-d", "6", "-l", str(self.log_path)]
        await self._spawn(argv, env)
        await self.wait_until(
            lambda: True if "linphonec> " in self.stdout else None, 10, "its prompt"
        )
        return self

    async def command(self, line: str) -> None:
        """Type one command line into linphonec."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def trace(self) -> list[TracedMessage]:
        return belle_sip_trace(self.log())

    def shown(self) -> list[Shown]:
        return [Shown(m.group(1), m.group(2)) for m in _SHOWN.finditer(self.stdout)]

    async def send_message(self, uri: str, text: str, timeout: float = 40.0) -> Sent:
        """``chat uri text``; waits for the final response and the message's state."""
        after = len(self.trace())
        log_from = len(self.log())
        await self.command(f"chat {uri} {text}")
        sent, final = await self._outcome(text, after, timeout)

        def state() -> str | None:
            # the message is the one that left Idle after the command; its last state
            log = self.log()[log_from:]
            changes = _STATE.findall(log)
            mine = next((ptr for ptr, old, _new in changes if old == "Idle"), None)
            final_states = [
                new for ptr, _old, new in changes if ptr == mine and new != "InProgress"
            ]
            return final_states[-1] if final_states else None

        return Sent(
            final.status, sent.call_id, await self.wait_until(state, 5, "the message's state")
        )

    def contact(self) -> str:
        """The Contact of its latest REGISTER."""
        pairs = self.registrations()
        if not pairs:
            raise ClientError(f"{self.name} has not registered\n" + self.diagnostics())
        return pairs[-1][0].header("contact") or ""

    async def unregister(self, timeout: float = 10.0) -> None:
        """``unregister``: a REGISTER with expiry 0, answered 2xx."""
        await self.command("unregister")
        await self.wait_unregistered(timeout)

    async def quit(self, timeout: float = 15.0) -> int:
        """``quit``: linphonec exits (without de-registering)."""
        await self.command("quit")
        return await self._exit(timeout)

    def diagnostics(self) -> str:
        return super().diagnostics() + f"\n--- {self.name} log (tail) ---\n{self.log()[-3000:]}"
