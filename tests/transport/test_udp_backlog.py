"""What a UDP endpoint says about the requests waiting unread in its socket (SO_MEMINFO)."""

from __future__ import annotations

import asyncio
import socket

from msilo.transport.udp import UdpEndpoint, queued_size


def test_queued_size_follows_the_kernels_buffer_accounting() -> None:
    # Measured on Linux 6.x loopback: 1,280 bytes a datagram of 200-600, 2,304 to 1,700.
    assert queued_size(200) == queued_size(600) == 1280
    assert queued_size(800) == queued_size(1400) == 2304
    assert queued_size(2000) == 4352


async def test_backlog_counts_datagrams_not_yet_read() -> None:
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    transport, endpoint = await loop.create_datagram_endpoint(
        lambda: UdpEndpoint(lambda data, source: got.append(data)), local_addr=("127.0.0.1", 0)
    )
    try:
        assert endpoint.backlog() == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            datagram = b"OPTIONS sip:x SIP/2.0\r\n" + b"X" * 480
            for _ in range(100):
                peer.sendto(datagram, endpoint.local)
            # Not read yet: the loop has not run since.
            assert 90 <= endpoint.backlog() <= 100
            for _ in range(100):
                if len(got) == 100:
                    break
                await asyncio.sleep(0.01)
        assert len(got) == 100 and endpoint.backlog() == 0
    finally:
        transport.close()
