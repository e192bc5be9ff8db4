"""What the SIP-over-WebSocket benchmarks share: msilo with a ``ws:`` listener, and a
WebSocket SIP client of our own (picows, the library msilo's listener uses: Cython
framing, so the load generator costs little of the two CPUs it shares with msilo).

The client is what a browser's JsSIP sends (RFC 7118): the ``sip`` subprotocol, a Via
and Contact on an ``.invalid`` host, so msilo can only answer over the connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.e2e.procs import BenchError, Proc, free_port, wait_for_sip
from bench.e2e.servers import HOST, MsiloServer

SIP_PROTOCOL = {"Sec-WebSocket-Protocol": "sip"}  # RFC 7118 §4.1: required by msilo
BODY = "from a ws client: lorem ipsum dolor sit amet, consectetur adipiscing elit."


class WsMsilo(MsiloServer):
    """``msilo serve`` (registrar mode, PostgreSQL) with a UDP and a ``ws:`` listener."""

    name = "msilo"

    def __init__(
        self, admin_dsn: str, database: str, workdir: Path, workers: int, extra: list[str]
    ) -> None:
        super().__init__(admin_dsn, database, workdir, workers)
        self.ws_port = 0
        self.extra = extra  # more --set KEY=VALUE settings

    def settings(self) -> list[str]:
        sets = super().settings()
        listen = f'server.listen=["udp:{HOST}:{self.port}", "ws:{HOST}:{self.ws_port}"]'
        sets[sets.index(f'server.listen=["udp:{HOST}:{self.port}"]')] = listen
        return [*sets, *(arg for item in self.extra for arg in ("--set", item))]

    def start(self) -> None:
        # Three ports free now and distinct (free_port alone may hand out one twice).
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.port, self.http_port, self.ws_port = sorted(ports)
        argv = [*self._msilo(), "serve", *self.settings()]
        self.info["command"] = " ".join(argv)
        self.proc = Proc(
            "msilo", argv, self.workdir / "msilo.log", cwd=self.workdir, env=self._env()
        )
        wait_for_sip(self.proc, HOST, self.port, timeout=60)

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.ws_port}/"

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/health", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def worker_pids(self) -> list[int]:
        """The pids of the ready workers (they hold the connections)."""
        return [w["pid"] for w in self.health()["workers"] if w["state"] == "ready"]

    def workers_cpu_seconds(self) -> float:
        """CPU time all the workers have used, seconds."""
        return sum(cpu_seconds(pid) for pid in self.worker_pids())

    def workers_rss_kib(self) -> int:
        """Resident memory of all the workers together, KiB."""
        return sum(rss_kib(pid) for pid in self.worker_pids())


def connections_per_pid(port: int) -> dict[int, int]:
    """Established TCP connections on local ``port``, by the pid holding them (from ``ss``):
    how the kernel's SO_REUSEPORT hash spread the WebSocket clients over the workers."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out.stdout):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used, seconds (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile(needed: int) -> int:
    """Raise this process's open-file limit (inherited by the msilo it starts) to at least
    ``needed`` (up to the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn)")
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


class SipWs(WSListener):  # type: ignore[misc]
    """One client connection; each SIP message received goes to ``on_message``."""

    def __init__(self, on_message: Callable[[bytes, float], None] | None = None) -> None:
        self.on_message = on_message
        self.transport: WSTransport | None = None
        self.host = f"{uuid.uuid4().hex[:12]}.invalid"  # RFC 7118 §5.2, as JsSIP does
        self.waiter: asyncio.Future[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT or frame.msg_type is WSMsgType.BINARY:
            data = frame.get_payload_as_bytes()
            if self.on_message is not None:
                self.on_message(data, time.monotonic())
            if self.waiter is not None and not self.waiter.done() and data[8:9] != b"1":
                self.waiter.set_result(data)
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.disconnect()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, data)

    async def request(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send one request and wait for its final response (one at a time)."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.send(data)
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


async def connect(
    url: str,
    on_message: Callable[[bytes, float], None] | None = None,
    *,
    timeout: float = 10.0,
) -> SipWs:
    """A connected client (the handshake done, ``sip`` agreed)."""
    _, listener = await ws_connect(
        lambda: SipWs(on_message),
        url,
        extra_headers=SIP_PROTOCOL,
        websocket_handshake_timeout=timeout,
        read_buffer_init_size=1024,  # the bench holds 10,000 of these
    )
    assert isinstance(listener, SipWs)
    return listener


def register(conn: SipWs, user: str, n: int, expires: int = 600) -> bytes:
    """A REGISTER like JsSIP's: outbound contact on the connection's ``.invalid`` host."""
    host = conn.host
    return (
        f"REGISTER sip:{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/WS {host};branch=z9hG4bKr{n}x{host[:8]}\r\n"
        "Max-Forwards: 69\r\n"
        f"From: <sip:{user}@{HOST}>;tag=r{n}\r\n"
        f"To: <sip:{user}@{HOST}>\r\n"
        f"Call-ID: reg-{user}-{host}\r\n"
        f"CSeq: {n} REGISTER\r\n"
        f'Contact: <sip:{user}x@{host};transport=ws>;+sip.instance="<urn:uuid:{uuid.uuid4()}>"'
        f";reg-id=1;expires={expires}\r\n"
        "Supported: path, outbound\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def message(conn: SipWs, to: str, n: int, call_id: str) -> bytes:
    """A ~100-byte text/plain MESSAGE to ``to`` (the sipp store scenario's size)."""
    body = f"Offline message {n} for {to} {BODY}".encode()
    host = conn.host
    return (
        f"MESSAGE sip:{to}@{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/WS {host};branch=z9hG4bKm{call_id}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:wsload@{HOST}>;tag=m{n}\r\n"
        f"To: <sip:{to}@{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 MESSAGE\r\n"
        "User-Agent: bench wsload\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def status_of(response: bytes) -> int:
    """The status code of a response, 0 for a request."""
    if not response.startswith(b"SIP/2.0 "):
        return 0
    return int(response[8:11])


def header(response: bytes, name: bytes) -> bytes:
    """The value of the first header ``name`` (as msilo writes it: ``Name: value``)."""
    start = response.find(b"\r\n" + name + b": ")
    if start < 0:
        return b""
    start += len(name) + 4
    return response[start : response.find(b"\r\n", start)]
