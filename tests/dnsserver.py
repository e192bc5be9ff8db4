"""A real DNS server for tests: dnsmasq (Debian's dnsmasq-base) on 127.0.0.1, answering
only for the ``test.`` names it is given and NXDOMAIN for every other ``test.`` name."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from tests.service.sipua import free_port

needs_dnsmasq = pytest.mark.skipif(
    shutil.which("dnsmasq") is None, reason="dnsmasq not installed (apt-get install dnsmasq-base)"
)


@contextmanager
def dns_server(
    srv: Sequence[tuple[str, str, int, int, int]] = (),
    hosts: Sequence[tuple[str, str]] = (),
) -> Iterator[str]:
    """Serve SRV records ``(name, target, port, priority, weight)`` and A/AAAA records
    ``(name, ip)``; yields the server as ``"127.0.0.1:port"`` (``server.dns`` syntax)."""
    # The port is free when picked but may be taken before dnsmasq binds it (an outgoing
    # connection of a server under test gets the same ephemeral port): pick another and retry.
    for attempt in range(5):
        try:
            with _dnsmasq(srv, hosts) as server:
                yield server
                return
        except _PortTaken:
            if attempt == 4:
                raise


class _PortTaken(RuntimeError):
    pass


@contextmanager
def _dnsmasq(
    srv: Sequence[tuple[str, str, int, int, int]], hosts: Sequence[tuple[str, str]]
) -> Iterator[str]:
    dnsmasq = shutil.which("dnsmasq")
    assert dnsmasq is not None
    port = free_port()
    args = [
        dnsmasq, "--keep-in-foreground", "--log-facility=-", "--user=root", "--pid-file=",
        f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
        "--no-resolv", "--no-hosts", "--local=/test/",
    ]  # fmt: skip
    args += [f"--srv-host={n},{t},{p},{prio},{w}" for n, t, p, prio, w in srv]
    args += [f"--host-record={name},{ip}" for name, ip in hosts]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 5
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                if "Address already in use" in out:
                    raise _PortTaken(f"dnsmasq did not start: {out}")
                raise RuntimeError(f"dnsmasq did not start: {out}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _answers(port: int) -> bool:
    # A minimal query (id 1, "test." SOA): any answer means the server is up.
    query = bytes.fromhex("0001010000010000000000000474657374000006000100")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            sock.recvfrom(512)
        except OSError:
            return False
    return True
