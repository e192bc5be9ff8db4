"""HEP v3 export (``server.hep``): packets decoded here by the specification's rules (a
6-byte header, then vendor/type/length chunks, network byte order), from a real worker;
and read by sngrep, the capture tool SIP operators use (tests/server/test_hep_sngrep.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from msilo.errors import ConfigError
from msilo.server.hep import HepSender, encode
from tests.service.conftest import ServerFactory

# Generic chunk types of HEP v3 (vendor 0): what the specification calls them.
CHUNKS = {
    1: "ip_family", 2: "ip_proto", 3: "ipv4_src", 4: "ipv4_dst", 5: "ipv6_src", 6: "ipv6_dst",
    7: "src_port", 8: "dst_port", 9: "ts_sec", 10: "ts_usec", 11: "proto_type",
    12: "capture_id", 15: "payload", 17: "correlation_id",
}  # fmt: skip


def decode(packet: bytes) -> dict[str, object]:
    """A HEP v3 packet as a dict; fails on anything the specification does not allow."""
    assert packet[:4] == b"HEP3"
    (total,) = struct.unpack("!H", packet[4:6])
    assert total == len(packet)
    out: dict[str, object] = {}
    offset = 6
    while offset < total:
        vendor, kind, length = struct.unpack("!HHH", packet[offset : offset + 6])
        assert vendor == 0 and length >= 6 and offset + length <= total
        value = packet[offset + 6 : offset + length]
        name = CHUNKS[kind]
        assert name not in out, f"chunk {name} twice"
        if name in ("ip_family", "ip_proto", "proto_type"):
            assert len(value) == 1
            out[name] = value[0]
        elif name in ("src_port", "dst_port"):
            out[name] = struct.unpack("!H", value)[0]
        elif name in ("ts_sec", "ts_usec", "capture_id"):
            out[name] = struct.unpack("!I", value)[0]
        elif name.startswith("ipv"):
            out[name] = str(ipaddress.ip_address(value))
        else:
            out[name] = value
        offset += length
    assert offset == total
    return out


def test_ipv4_udp_packet_carries_every_generic_chunk() -> None:
    msg = b"OPTIONS sip:x SIP/2.0\r\nCall-ID: c1@h\r\nContent-Length: 0\r\n\r\n"
    hep = decode(
        encode(msg, transport="UDP", src=("10.0.0.1", 5070), dst=("10.0.0.2", 5060),
               timestamp=1700000000.25, capture_id=2001)
    )  # fmt: skip
    assert hep == {
        "ip_family": 2, "ip_proto": 17, "ipv4_src": "10.0.0.1", "ipv4_dst": "10.0.0.2",
        "src_port": 5070, "dst_port": 5060, "ts_sec": 1700000000, "ts_usec": 250000,
        "proto_type": 1, "capture_id": 2001, "correlation_id": b"c1@h", "payload": msg,
    }  # fmt: skip


def test_ipv6_tcp_and_tls_and_mixed_families() -> None:
    hep = decode(
        encode(b"SIP/2.0 200 OK\r\n\r\n", transport="TLS", src=("[::1]", 5061),
               dst=("2001:db8::7", 40000), timestamp=1.0, capture_id=1)
    )  # fmt: skip
    assert (hep["ip_family"], hep["ip_proto"]) == (10, 6)  # TLS runs over TCP
    assert (hep["ipv6_src"], hep["ipv6_dst"]) == ("::1", "2001:db8::7")
    assert "correlation_id" not in hep  # no Call-ID in the message: no chunk
    mixed = decode(
        encode(b"x", transport="TCP", src=("192.0.2.1", 1), dst=("::1", 2), timestamp=0,
               capture_id=0)
    )  # fmt: skip
    mapped = ipaddress.IPv6Address(str(mixed["ipv6_src"])).ipv4_mapped
    assert (mapped, mixed["ipv6_dst"]) == (ipaddress.IPv4Address("192.0.2.1"), "::1")


def test_a_capture_too_big_for_udp_is_dropped_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sender = HepSender(f"udp:127.0.0.1:{sink.getsockname()[1]}", 1)
        caplog.set_level(logging.WARNING, logger="msilo.hep")
        for _ in range(3):
            sender.capture(b"x" * 70000, "TCP", ("127.0.0.1", 1), ("127.0.0.1", 2), time.time())
        sender.capture(b"small", "UDP", ("127.0.0.1", 1), ("127.0.0.1", 2), time.time())
        sender.close()
        assert (sender.dropped, sender.sent) == (3, 1)
        assert [r.getMessage().split()[0] for r in caplog.records] == ["event=hep_dropped"]
        assert decode(sink.recv(65535))["payload"] == b"small"


def test_a_capture_server_that_cannot_be_resolved_is_a_start_up_error() -> None:
    with pytest.raises(ConfigError, match=r"^server\.hep: cannot resolve 'no-such-host\.invalid'"):
        HepSender("udp:no-such-host.invalid:9060", 1)
    with pytest.raises(ConfigError, match=r"^server\.hep: must be udp:HOST:PORT"):
        HepSender("tcp:127.0.0.1:9060", 1)


@pytest.fixture
async def capture() -> AsyncIterator[tuple[int, asyncio.Queue[dict[str, object]]]]:
    """A HEP receiver on 127.0.0.1: its port and the decoded packets."""
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            queue.put_nowait(decode(data))

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Receiver, local_addr=("127.0.0.1", 0)
    )
    yield transport.get_extra_info("sockname")[1], queue
    transport.close()


async def _until(queue: asyncio.Queue[dict[str, object]], count: int) -> list[dict[str, object]]:
    got: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(await asyncio.wait_for(queue.get(), deadline - time.monotonic()))
        except TimeoutError:
            break
    return got


async def test_worker_exports_each_message_in_and_out(
    server: ServerFactory, capture: tuple[int, asyncio.Queue[dict[str, object]]]
) -> None:
    port, packets = capture
    srv = await server(f'server.hep="udp:127.0.0.1:{port}"', "server.hep_id=42")
    alice = await srv.agent("alice")
    data, branch = alice.build("MESSAGE", "sip:bob@127.0.0.1", body=b"hi bob", call_id="hep1@x")
    before = time.time()
    assert (await alice.send_and_wait(data, branch)).status == 202
    inbound, outbound = await _until(packets, 2)
    assert inbound["payload"] == data  # byte for byte what alice sent
    assert (inbound["ipv4_src"], inbound["src_port"]) == ("127.0.0.1", alice.port)
    assert (inbound["ipv4_dst"], inbound["dst_port"]) == ("127.0.0.1", srv.port)
    for hep in (inbound, outbound):
        assert (hep["ip_family"], hep["ip_proto"], hep["proto_type"]) == (2, 17, 1)
        assert hep["capture_id"] == 42 and hep["correlation_id"] == b"hep1@x"
        assert before - 1 <= hep["ts_sec"] <= time.time() + 1  # type: ignore[operator]
    assert bytes(outbound["payload"]).startswith(b"SIP/2.0 202 Accepted\r\n")  # type: ignore[arg-type]
    assert (outbound["src_port"], outbound["dst_port"]) == (srv.port, alice.port)

    # bob registers: his 200, then the dump (our request out) and bob's answer (in).
    bob = await srv.agent("bob")
    assert (await bob.register(600)).status == 200
    await bob.wait_requests(1)
    seen = await _until(packets, 4)
    firsts = [bytes(h["payload"]).split(b"\r\n", 1)[0] for h in seen]  # type: ignore[arg-type]
    assert firsts[:2] == [b"REGISTER sip:127.0.0.1 SIP/2.0", b"SIP/2.0 200 OK"]
    [dump] = [h for h, f in zip(seen, firsts, strict=True) if f.startswith(b"MESSAGE ")]
    assert dump["dst_port"] == bob.port and b"hi bob" in dump["payload"]  # type: ignore[operator]
    [answer] = [h for h, f in zip(seen, firsts, strict=True) if f == b"SIP/2.0 200 OK"][1:]
    assert answer["src_port"] == bob.port and answer["dst_port"] == dump["src_port"]


@pytest.mark.parametrize("value", ['"tcp:127.0.0.1:9060"', '"udp:127.0.0.1"', '"udp:h:70000"'])
def test_a_bad_hep_setting_names_the_key(value: str) -> None:
    from msilo.config import load_config

    with pytest.raises(ConfigError, match=r'^server\.hep: must be udp:HOST:PORT, or "" for off'):
        load_config(overrides=[f"server.hep={value}"])


def test_check_config_resolves_the_capture_server(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "msilo", "check-config", "--set", 'server.hep="udp:localhost:9060"'],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "# server.hep: HEP v3 copies go to " in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "msilo", "check-config", "--set",
         'server.hep="udp:no-such-host.invalid:9060"'],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("msilo: error: server.hep: cannot resolve 'no-such-host.invalid'")
