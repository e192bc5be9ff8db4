"""[limits] on TCP: the connection cap and the idle timeout, on a running worker."""

from __future__ import annotations

import asyncio

from tests.service.conftest import ServerFactory


def _message(port: int, n: int) -> bytes:
    body = b"over tcp"
    return (
        f"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKl{n}"
        f"\r\nFrom: <sip:alice@127.0.0.1>;tag=l{n}\r\nTo: <sip:bob@127.0.0.1>"
        f"\r\nCall-ID: l{n}@x\r\n"
        f"CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except (TimeoutError, ConnectionError):
        return False


async def test_connections_over_the_cap_are_refused(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.max_connections=2")
    conns = [await asyncio.open_connection(*srv.address) for _ in range(3)]
    try:
        assert await _closed_by_server(conns[2][0], 2.0)  # the third one
        reader, writer = conns[0]
        writer.write(_message(writer.get_extra_info("sockname")[1], 1))
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert reply.startswith(b"SIP/2.0 202")
    finally:
        for _, writer in conns:
            writer.close()


async def test_idle_connections_are_closed(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.idle_timeout=1")
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        assert await _closed_by_server(reader, 4.0)
    finally:
        writer.close()


async def _trickle(address: tuple[str, int], stop: asyncio.Event, n: int) -> None:
    """A slow-loris client: one byte of a MESSAGE a second, until closed or told to stop."""
    try:
        reader, writer = await asyncio.open_connection(*address)
    except OSError:
        return
    data = _message(5060, 10_000 + n)
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof():
                return
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
                return
            except TimeoutError:
                pass
    except OSError:
        return
    finally:
        writer.close()


async def _try_message(address: tuple[str, int], n: int) -> bool:
    """Connect, send one MESSAGE, True when it was answered 202."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(_message(writer.get_extra_info("sockname")[1], n))
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
        return reply.startswith(b"SIP/2.0 202")
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_slow_clients_do_not_keep_a_new_client_out(server: ServerFactory) -> None:
    # Every slot is taken by a client that trickles a byte a second: bytes arriving do not
    # extend limits.message_timeout, so slots free up within it.
    srv = await server("server.mode=silo", "limits.max_connections=200", "limits.message_timeout=2")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    slow = [loop.create_task(_trickle(srv.address, stop, n)) for n in range(200)]
    try:
        assert srv.worker.transports is not None
        pool = srv.worker.transports.pool
        for _ in range(100):  # every slow client is connected and trickling
            if len(pool) == 200:
                break
            await asyncio.sleep(0.05)
        first_try = loop.time()
        n = 0
        while not await _try_message(srv.address, n):
            n += 1
            assert loop.time() - first_try < 6, "a new client was kept out"
            await asyncio.sleep(0.05)
        assert loop.time() - first_try <= 2.0
        assert pool.message_timeouts >= 1
    finally:
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)


async def test_a_connection_that_never_sends_a_message_is_closed(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.message_timeout=1")
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        writer.write(b"\r\n\r\n")  # a keep-alive is not a message
        assert await reader.readexactly(2) == b"\r\n"
        assert await _closed_by_server(reader, 3.0)
    finally:
        writer.close()


async def test_a_whole_message_in_time_keeps_the_connection(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.message_timeout=1")
    reader, writer = await asyncio.open_connection(*srv.address)
    try:
        port = writer.get_extra_info("sockname")[1]
        for n in range(3):  # each message arrives in time, in pieces
            data = _message(port, 20 + n)
            writer.write(data[:30])
            await asyncio.sleep(0.6)
            writer.write(data[30:])
            reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert reply.startswith(b"SIP/2.0 202")
        assert not await _closed_by_server(reader, 0.5)  # no message in progress: idle is fine
    finally:
        writer.close()


def _big_head(port: int, n: int, size: int) -> bytes:
    return (
        f"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKb{n}"
        f"\r\nFrom: <sip:alice@127.0.0.1>;tag=b{n}\r\nTo: <sip:bob@127.0.0.1>"
        f"\r\nCall-ID: b{n}@x\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain"
        f"\r\nContent-Length: {size}\r\n\r\n"
    ).encode()


async def test_incomplete_messages_are_capped_per_worker(server: ServerFactory) -> None:
    srv = await server("server.mode=silo", "limits.max_buffered=65536")
    first = await asyncio.open_connection(*srv.address)
    second = await asyncio.open_connection(*srv.address)
    try:
        port = first[1].get_extra_info("sockname")[1]
        first[1].write(_big_head(port, 1, 60000) + b"x" * 40000)
        await first[1].drain()
        await asyncio.sleep(0.3)
        second[1].write(_big_head(port, 2, 60000) + b"y" * 40000)  # 80 KB held: over
        assert await _closed_by_server(second[0], 3.0)
        first[1].write(b"x" * 20000)  # the first one, under the cap, still completes
        reply = await asyncio.wait_for(first[0].readuntil(b"\r\n\r\n"), 5)
        assert reply.startswith(b"SIP/2.0 202")
        assert srv.worker.transports is not None
        assert srv.worker.transports.pool.budget.held == 0
    finally:
        first[1].close()
        second[1].close()
