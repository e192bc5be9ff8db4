"""sngrep (Debian's SIP capture viewer) receives a real ``msilo serve``'s HEP v3 export and
rebuilds the exchange: the pcap it writes holds each SIP message with its addresses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.server.conftest import Instance, wait_for
from tests.service.sipua import UserAgent, free_port


def _listening_udp(port: int) -> bool:
    text = Path("/proc/net/udp").read_text()
    return f"0100007F:{port:04X}" in text


def read_pcap(path: Path) -> list[tuple[tuple[str, int], tuple[str, int], bytes]]:
    """(source, destination, UDP payload) of each IPv4/UDP frame of an Ethernet pcap."""
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack("<IHHiIII", data[:24])
    assert magic == 0xA1B2C3D4 and linktype == 1, (hex(magic), linktype)
    out = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, incl, _ = struct.unpack("<IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        if len(frame) < incl or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            continue
        src = ".".join(str(b) for b in ip[12:16])
        dst = ".".join(str(b) for b in ip[16:20])
        sport, dport, length, _ = struct.unpack("!HHHH", ip[ihl : ihl + 8])
        out.append(((src, sport), (dst, dport), ip[ihl + 8 : ihl + length]))
    return out


async def test_sngrep_rebuilds_the_exchange_from_our_hep_export(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    sngrep = shutil.which("sngrep")
    assert sngrep is not None, "sngrep is installed by make test-deps"
    hep_port = free_port()
    pcap = tmp_path / "capture.pcap"
    capture = subprocess.Popen(
        [sngrep, "-N", "-q", "-L", f"udp:127.0.0.1:{hep_port}", "-O", str(pcap)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        await wait_for(lambda: _listening_udp(hep_port), bool, 10, "sngrep listening")
        srv = serve(
            f"sqlite:///{tmp_path}/m.db", "server.workers=1",
            f'server.hep="udp:127.0.0.1:{hep_port}"',
        )  # fmt: skip
        await srv.wait_ready(1)
        alice = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
        try:
            data, branch = alice.build(
                "MESSAGE", "sip:bob@127.0.0.1", body=b"seen by sngrep", call_id="sng@x"
            )
            assert (await alice.send_and_wait(data, branch)).status == 202
        finally:
            alice.close()

        def frames() -> list[tuple[tuple[str, int], tuple[str, int], bytes]]:
            return read_pcap(pcap) if pcap.exists() and pcap.stat().st_size > 24 else []

        got = await wait_for(frames, lambda f: len(f) >= 2, 10, "two frames in the pcap")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(capture.pid, signal.SIGTERM)
        try:
            capture.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(capture.pid, signal.SIGKILL)
            capture.wait(5)
    request, response = got[:2]
    assert request == (("127.0.0.1", alice.port), ("127.0.0.1", srv.port), data)
    assert response[0] == ("127.0.0.1", srv.port) and response[1] == ("127.0.0.1", alice.port)
    assert response[2].startswith(b"SIP/2.0 202 Accepted\r\n") and b"Call-ID: sng@x" in response[2]
