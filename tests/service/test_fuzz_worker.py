"""Fuzzing a running worker: random and mutated datagrams and TCP streams go through
parser + transactions + route; the worker never dies and keeps answering."""

from __future__ import annotations

import asyncio
import random
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.conftest import ServerFactory

VALID = (
    b"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKfuzz;rport\r\n"
    b'Max-Forwards: 70\r\nFrom: "A" <sip:alice@127.0.0.1>;tag=f1\r\n'
    b"To: <sip:bob@127.0.0.1>\r\nCall-ID: fuzz@x\r\nCSeq: 1 MESSAGE\r\n"
    b"Contact: <sip:alice@127.0.0.1:5999>;expires=60, *\r\nExpires: 30\r\n"
    b"Content-Type: text/plain;charset=utf-8\r\nContent-Length: 5\r\n\r\nhello"
)
REGISTER = VALID.replace(b"MESSAGE sip:bob@127.0.0.1", b"REGISTER sip:127.0.0.1").replace(
    b"CSeq: 1 MESSAGE", b"CSeq: 1 REGISTER"
)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Byte flips, cuts, duplicated or dropped lines: what broken stacks and attackers send."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.randrange(6)
        if choice == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice == 1:
            del out[rng.randrange(len(out) + 1) :]
        elif choice == 2:
            lines = bytes(out).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            out = bytearray(b"\r\n".join(lines))
        elif choice == 3:
            lines = bytes(out).split(b"\r\n")
            if len(lines) > 1:
                del lines[rng.randrange(len(lines))]
            out = bytearray(b"\r\n".join(lines))
        elif choice == 4:
            at = rng.randrange(len(out) + 1)
            out[at:at] = rng.choice(
                [b";;", b"<", b'"', b"%", b"\x00", b"\r\n ", b",", b"99999999999"]
            )
        else:
            out = bytearray(bytes(out).replace(b"Content-Length: 5", b"Content-Length: -1"))
    return bytes(out)


inputs = st.one_of(
    st.binary(max_size=600),
    st.tuples(st.sampled_from([VALID, REGISTER]), st.integers(0, 2**32)).map(
        lambda pair: _mutate(pair[0], random.Random(pair[1]))
    ),
)


async def test_the_worker_survives_fuzzed_datagrams_and_streams(server: ServerFactory) -> None:
    srv = await server("server.mode=silo")
    alice = await srv.agent("alice")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    _reader, writer = await asyncio.open_connection(*srv.address)
    sent: list[bytes] = []

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(inputs)
    def collect(data: bytes) -> None:
        sent.append(data)

    collect()
    for i, data in enumerate(sent):
        if data:
            udp.sendto(data, srv.address)
        if i % 3 == 0 and not writer.is_closing():
            writer.write(data)  # a broken stream gets a 400/513 and is closed: fine
        if i % 25 == 0:
            await asyncio.sleep(0.01)  # let the worker keep up, as a real network would
    udp.close()
    writer.close()
    # Still answering, and still storing exactly what it is asked to.
    for i in range(3):
        reply = await alice.message("sip:carol@127.0.0.1", f"alive {i}")
        assert reply.status == 202
    bodies = [r.body for r in await srv.store.list("carol", "127.0.0.1")]
    assert bodies == [b"alive 0", b"alive 1", b"alive 2"]
    assert srv.stats()["parse_errors"] > 0  # the garbage did reach the parser
