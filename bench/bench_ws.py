"""Compare WebSocket server libraries for SIP over WebSocket (issue 17): websockets and picows.

Each library runs an echo server in a child process (uvloop, one core); the same
client (picows, the fastest client, so the client is not the bottleneck) measures:

* round trips per second on one connection (a 600-byte SIP-sized text frame, one at a time),
* messages per second over 50 connections each with 8 in flight,
* the RSS growth per idle connection of a fresh server process (2,000 connections open),

and then the RSS growth per idle connection of msilo's own ``ws:`` listener
(``msilo.transport.ws`` on picows, with its per-connection state).

    PYTHONPATH=$PWD python3 bench/bench_ws.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from typing import Any

import uvloop

# Spawned, not forked: a forked child inherits the parent's resident heap and fills its
# free space without growing RSS, which hides what a connection costs.
_SPAWN = multiprocessing.get_context("spawn")
PAYLOAD = b"MESSAGE sip:bob@example.com SIP/2.0\r\n" + b"X" * 560 + b"\r\n\r\n"


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _websockets_server(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", port, subprotocols=["sip"], compression=None):  # type: ignore[list-item]
        await asyncio.Future()


async def _picows_server(port: int) -> None:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

    class Echo(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
                transport.send(frame.msg_type, frame.get_payload_as_bytes())
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    server = await ws_create_server(lambda _request: Echo(), "127.0.0.1", port)
    async with server:
        await asyncio.Future()


async def _msilo_server(port: int) -> None:
    from msilo.transport import Transports

    transports = Transports(on_message=lambda data, source: None, ws_ping=30.0)
    await transports.listen_ws("127.0.0.1", port)
    await asyncio.Future()


def _serve(kind: str, port: int) -> None:
    servers = {"websockets": _websockets_server, "picows": _picows_server, "msilo": _msilo_server}
    uvloop.run(servers[kind](port))


async def _client(port: int, seconds: float) -> dict[str, Any]:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    class Counter(WSListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.got = 0
            self.wake: asyncio.Event = asyncio.Event()

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                self.got += 1
                self.wake.set()

    url = f"ws://127.0.0.1:{port}/"
    # Sequential round trips on one connection.
    transport, listener = await ws_connect(
        Counter, url, extra_headers={"Sec-WebSocket-Protocol": "sip"}
    )
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        listener.wake.clear()
        transport.send(WSMsgType.TEXT, PAYLOAD)
        await listener.wake.wait()
        n += 1
    transport.disconnect()
    sequential = n / seconds

    # 50 connections, 8 in flight each.
    conns = [
        await ws_connect(Counter, url, extra_headers={"Sec-WebSocket-Protocol": "sip"})
        for _ in range(50)
    ]

    async def pump(t: WSTransport, lst: Counter, stop: float) -> None:
        sent = 0
        for _ in range(8):
            t.send(WSMsgType.TEXT, PAYLOAD)
            sent += 1
        while time.monotonic() < stop:
            lst.wake.clear()
            await lst.wake.wait()
            while sent - lst.got < 8:
                t.send(WSMsgType.TEXT, PAYLOAD)
                sent += 1

    stop = time.monotonic() + seconds
    await asyncio.gather(*(pump(t, lst, stop) for t, lst in conns))
    parallel = sum(lst.got for _, lst in conns) / seconds
    for t, _ in conns:
        t.disconnect()
    return {"round_trips_per_s": round(sequential), "messages_per_s_50x8": round(parallel)}


async def _idle(port: int, pid: int, count: int) -> float:
    from picows import WSListener, ws_connect

    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    for _ in range(count):
        conns.append(
            await ws_connect(
                WSListener,
                f"ws://127.0.0.1:{port}/",
                extra_headers={"Sec-WebSocket-Protocol": "sip"},
            )
        )
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    for t, _ in conns:
        t.disconnect()
    return (after - before) * 1024 / count


def _fresh_idle(kind: str, port: int, idle: int) -> int:
    """RSS growth per idle connection of a server process that served nothing before
    (after a throughput run the allocator has memory to reuse, which hides the cost)."""
    proc = _SPAWN.Process(target=_serve, args=(kind, port), daemon=True)
    proc.start()
    time.sleep(1.0)
    try:
        assert proc.pid is not None
        return round(uvloop.run(_idle(port, proc.pid, idle)))
    finally:
        proc.terminate()
        proc.join(5)


def run(kind: str, port: int, seconds: float, idle: int) -> dict[str, Any]:
    """Measure one library's server."""
    proc = _SPAWN.Process(target=_serve, args=(kind, port), daemon=True)
    proc.start()
    time.sleep(1.0)
    try:
        result = uvloop.run(_client(port, seconds))
    finally:
        proc.terminate()
        proc.join(5)
    result["rss_bytes_per_idle_conn"] = _fresh_idle(kind, port + 50, idle)
    import importlib.metadata

    result["version"] = importlib.metadata.version(kind)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=2000, help="idle connections to open")
    args = parser.parse_args()
    results = {}
    base = 18700 + os.getpid() % 100 * 3  # +50: the idle servers
    for i, kind in enumerate(("websockets", "picows")):
        results[kind] = run(kind, base + i, args.seconds, args.idle)
    results["msilo ws: listener"] = {
        "rss_bytes_per_idle_conn": _fresh_idle("msilo", base + 2, args.idle)
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
