"""A UDP device behind a real NAT gets its stored messages and its relays (issue 13, item 4).

The test builds two network namespaces joined to this one by veth pairs::

    this namespace (msilo serve, 2 workers; alice; the database)
        10.200.N.1 ── veth ── 10.200.N.2   "router": forwards, masquerades out of its WAN side,
                                           and forwards nothing new inward
                              192.168.N.1 ── veth ── 192.168.N.2   "phone": bob's UA socket

Linux conntrack masquerading filters by address *and* port (RFC 4787 §5): once bob's
REGISTER to 10.200.N.1:PORT opened the mapping, only datagrams from exactly 10.200.N.1:PORT
come back in.  A delivery sent from any other port is dropped by the router, so bob would
never see it.  Bob's Contact names his private address, which this namespace cannot reach:
msilo must answer the REGISTER's source, from the port bob sent it to.

Nothing leaves the machine: every address lives in the namespaces this test creates.  The
namespaces and links are named and numbered at random per test, so runs side by side do not
collide; every one is deleted at teardown.  Needs root (CI runs as root), ``ip`` (iproute2)
and ``nft`` (nftables), which the Makefile's test-deps target installs.
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from msilo.cli import open_configured_store
from msilo.config import load_config
from msilo.storage.base import NewMessage
from tests.server.conftest import Instance, wait_for
from tests.service.sipua import UserAgent, free_port

CLONE_NEWNET = 0x40000000
PHONE_PORT = 5062


def _run(*argv: str, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


@dataclass
class Nat:
    """The namespaces, links and addresses of one test."""

    router: str
    phone: str
    wan_root: str  # our end of the router's WAN link
    server_ip: str  # 10.200.N.1: msilo listens here
    router_wan_ip: str  # 10.200.N.2: bob's public address as msilo sees it
    phone_ip: str  # 192.168.N.2: bob's private address

    def udp_socket(self, port: int) -> socket.socket:
        """A UDP socket created inside the phone namespace, bound to the phone's address."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def create() -> None:
            # setns() moves only this thread; the socket stays in the namespace it was
            # made in, whichever thread uses it later.
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                with open(f"/run/netns/{self.phone}") as target:
                    if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((self.phone_ip, port))
                made.append(sock)
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=create)
        thread.start()
        thread.join(10)
        if failed:
            raise failed[0]
        return made[0]


def _free_subnet() -> int:
    """A third octet N for 10.200.N.0/24 that no address of this namespace uses yet."""
    used = subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10
    ).stdout
    for _ in range(50):
        n = random.randint(1, 254)
        if f" 10.200.{n}." not in used and f" 192.168.{n}." not in used:
            return n
    raise RuntimeError("no free 10.200.N.0/24 subnet")


@pytest.fixture
def nat() -> Iterator[Nat]:
    """Build the router and phone namespaces (see the module docstring); delete them after."""
    assert os.geteuid() == 0, "the NAT test builds network namespaces: run it as root (CI does)"
    for tool in ("ip", "nft"):
        assert shutil.which(tool), f"{tool} is missing: make test-deps installs iproute2/nftables"
    tag = secrets.token_hex(3)
    n = _free_subnet()
    router, phone = f"msr{tag}", f"msp{tag}"
    wan0, wan1, lan0, lan1 = (f"ms{tag}{end}" for end in ("w0", "w1", "l0", "l1"))
    net = Nat(router, phone, wan0, f"10.200.{n}.1", f"10.200.{n}.2", f"192.168.{n}.2")
    try:
        _run("ip", "netns", "add", router)
        _run("ip", "netns", "add", phone)
        # WAN: this namespace <-> router.
        _run("ip", "link", "add", wan0, "type", "veth", "peer", "name", wan1)
        _run("ip", "link", "set", wan1, "netns", router)
        _run("ip", "addr", "add", f"{net.server_ip}/24", "dev", wan0)
        _run("ip", "link", "set", wan0, "up")
        # LAN: router <-> phone.
        _run("ip", "-n", router, "link", "add", lan0, "type", "veth", "peer", "name", lan1)
        _run("ip", "-n", router, "link", "set", lan1, "netns", phone)
        for ns, dev, address in (
            (router, wan1, f"{net.router_wan_ip}/24"),
            (router, lan0, f"192.168.{n}.1/24"),
            (phone, lan1, f"{net.phone_ip}/24"),
        ):
            _run("ip", "-n", ns, "addr", "add", address, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", router, "link", "set", "lo", "up")
        _run("ip", "-n", phone, "link", "set", "lo", "up")
        _run("ip", "-n", phone, "route", "add", "default", "via", f"192.168.{n}.1")
        _run("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Masquerade out of the WAN side; let in only what belongs to a mapping the
        # phone opened (conntrack matches the remote address and port exactly).
        _run(
            "ip", "netns", "exec", router, "nft", "-f", "-",
            stdin=f"""
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "{wan1}" masquerade
    }}
}}
table ip filter {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{lan0}" oifname "{wan1}" accept
    }}
}}
""",
        )  # fmt: skip
        yield net
    finally:
        for ns in (phone, router):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", wan0], capture_output=True, timeout=20)


def _start(serve: Callable[..., Instance], db_url: str, net: Nat) -> Instance:
    # Two UDP listeners (the NAT side and loopback for alice): deliveries to bob must leave
    # from the one he registered to, not from a client socket or the other listener.
    port = free_port()
    srv: Instance = serve(
        db_url,
        "server.workers=2",
        "msilo.add_date=0",
        'msilo.reminder="sip:reminder@127.0.0.1"',
        "msilo.send_time=1",
        f'server.listen=["udp:{net.server_ip}:{port}","udp:127.0.0.1:{port}",'
        f'"tcp:127.0.0.1:{port}"]',
    )
    srv.port = port
    srv.address = ("127.0.0.1", port)
    return srv


async def _store_reminder(db_url: str) -> None:
    """A reminder for bob, due now, written straight into his mailbox."""
    store = open_configured_store(load_config(overrides=[f'msilo.db_url="{db_url}"']))
    await store.open()
    now = int(time.time())
    try:
        await store.store_batch(
            [NewMessage("bob", "127.0.0.1", "sip:alice@127.0.0.1", "sip:bob@127.0.0.1",
                        b"meeting", "text/plain", now, now + 3600, snd_time=now - 1)],
            0,
        )  # fmt: skip
    finally:
        await store.close()


async def _scenario(srv: Instance, net: Nat) -> None:
    await srv.wait_ready(2)
    server = (net.server_ip, srv.port)
    alice = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
    bob = await UserAgent(
        server, user="bob", domain="127.0.0.1", sock=net.udp_socket(PHONE_PORT)
    ).start()
    try:
        # Bob is offline: three messages are stored.
        for i in range(3):
            assert (await alice.message("sip:bob@127.0.0.1", f"stored {i}")).status == 202
        # Bob registers from behind the NAT; his Contact is his private address.
        assert (await bob.register(600, headers=["Allow: MESSAGE"])).status == 200
        await bob.wait_requests(3, timeout=15)
        assert [r.request.body for r in bob.received] == [b"stored 0", b"stored 1", b"stored 2"]
        # Every one came through the mapping: from the address and port bob registered to.
        assert set(bob.sources) == {server}
        stats = await wait_for(
            lambda: srv.get("/stats"), lambda s: s["dumped_messages"] == 3, 10, "dumps", srv
        )
        assert stats["failed_messages"] == 0

        # Bob is online: relays reach him through the NAT, and alice sees his 200.
        for i in range(4):
            response = await alice.message("sip:bob@127.0.0.1", f"live {i}", timeout=10)
            assert response.status == 200, response
        assert [r.request.body for r in bob.received[3:]] == [
            f"live {i}".encode() for i in range(4)
        ]
        assert set(bob.sources) == {server}
        stats = srv.get("/stats")
        assert stats["relayed_messages"] == 4 and stats["stored_messages"] == 3
        assert stats["failed_messages"] == 0

        # A reminder: the leader, which listens on no port, sends it through a worker.
        await _store_reminder(srv.db_url)
        [*_, got] = await bob.wait_requests(8, timeout=10)
        assert got.request.body == b"meeting"  # msilo.add_date=0: no date prefix
        assert got.request.from_ is not None
        assert got.request.from_.uri == "sip:reminder@127.0.0.1"
        assert set(bob.sources) == {server}
        stats = await wait_for(
            lambda: srv.get("/stats"), lambda s: s["dumped_reminders"] == 1, 10, "reminder", srv
        )
        assert stats["failed_reminders"] == 0
    finally:
        alice.close()
        bob.close()


async def test_a_device_behind_nat_gets_stored_messages_and_relays_sqlite(
    serve: Callable[..., Instance], nat: Nat, tmp_path: Path
) -> None:
    await _scenario(_start(serve, f"sqlite:///{tmp_path}/msilo.db", nat), nat)


async def test_a_device_behind_nat_gets_stored_messages_and_relays_postgres(
    serve: Callable[..., Instance], nat: Nat, pg_url: str
) -> None:
    await _scenario(_start(serve, pg_url, nat), nat)


def test_the_nat_drops_what_does_not_come_from_the_registered_port(nat: Nat) -> None:
    """The router really filters by port: a datagram from another port never arrives."""
    phone = nat.udp_socket(PHONE_PORT + 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        listener.bind((nat.server_ip, 0))
        other.bind((nat.server_ip, 0))
        phone.settimeout(1.0)
        listener.settimeout(3.0)
        phone.sendto(b"open the mapping", listener.getsockname())
        data, mapped = listener.recvfrom(100)
        assert data == b"open the mapping" and mapped[0] == nat.router_wan_ip
        other.sendto(b"from another port", mapped)
        listener.sendto(b"from the mapped port", mapped)
        assert phone.recvfrom(100)[0] == b"from the mapped port"
        with pytest.raises(TimeoutError):
            phone.recvfrom(100)  # the other port's datagram was dropped
    finally:
        for sock in (phone, listener, other):
            sock.close()
