"""What a response handed between workers costs (msilo.transport.handoff).

Two "workers" (transports + transaction layer + hand-off socket each) share one UDP port in
this process; a UA in another process answers every MESSAGE with a 200 at once.  Worker 0
sends MESSAGEs, a window of them in flight at a time; a reuseport program sends every
response either to worker 0 (direct: what every response cost before) or to worker 1, which
hands it to worker 0 (handed off).  Rounds alternate the two; the figure is the CPU time
of this process (both workers; the UA is not counted) per completed transaction, median of
the rounds (and of the differences between neighbouring rounds).  With N workers sharing
a port, (N-1)/N of the responses are handed off.

    python bench/bench_handoff.py                 # 10 rounds of 5,000 transactions each way
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from msilo.sip.parser import IMPLEMENTATION, parse_message
from msilo.transaction import TransactionLayer
from msilo.transaction.client import ClientResult
from msilo.transport import Target, Transports
from msilo.transport.base import UDP, Source
from msilo.transport.handoff import WORKER, Handoff, process_tag
from msilo.transport.spread import always, attach

_COPIED = (b"via:", b"from:", b"to:", b"call-id:", b"cseq:")  # RFC 3261 §8.2.6.2


def _ua(port_out: Any, stop: Any) -> None:
    """Answer every request with a 200 built from its own headers (another process)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    port_out.put(sock.getsockname()[1])
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        head = b"\r\n".join(line for line in lines if line.lower().startswith(_COPIED))
        sock.sendto(b"SIP/2.0 200 OK\r\n" + head + b"\r\nContent-Length: 0\r\n\r\n", addr)


class Worker:
    def __init__(self, deployment: str, slot: int) -> None:
        self.transports = Transports()
        tag = process_tag(WORKER, slot)
        self.handoff = Handoff(
            deployment,
            tag,
            on_response=lambda data, peer: self.layer.receive(
                data, Source(UDP, peer, self.handoff), handed=True
            ),
            on_send=self.transports.send_from_listener,
        )
        self.layer = TransactionLayer(
            lambda request, txn: txn.respond(200, "OK"),
            self.transports.send,
            sent_by=self.transports.sent_by,
            parse=parse_message,
            tag=tag,
            forward=self.handoff.forward,
        )
        self.transports.on_message = self.layer.receive

    async def start(self, port: int) -> None:
        self.handoff.open()
        await self.transports.listen_udp("127.0.0.1", port)
        self.transports.use_handoff(self.handoff, [("127.0.0.1", port)])


async def _round(sender: Worker, ua_port: int, count: int, window: int) -> float:
    """CPU seconds per completed transaction for ``count`` MESSAGEs, ``window`` in flight."""
    target = Target("127.0.0.1", ua_port)
    done = asyncio.Event()
    finished = 0
    started = 0
    failed = 0

    def send_one() -> None:
        nonlocal started
        started += 1
        txn = sender.layer.request(
            "MESSAGE",
            f"sip:bob@127.0.0.1:{ua_port}",
            target,
            from_="sip:msilo@127.0.0.1",
            to="sip:bob@127.0.0.1",
            body=b"x" * 120,
            content_type="text/plain",
        )
        txn.add_done_callback(completed)

    def completed(result: ClientResult) -> None:
        nonlocal finished, failed
        finished += 1
        failed += result.status != 200
        if started < count:
            send_one()
        elif finished == count:
            done.set()

    cpu = time.process_time()
    for _ in range(min(window, count)):
        send_one()
    await asyncio.wait_for(done.wait(), 120)
    cpu = time.process_time() - cpu
    if failed:
        raise RuntimeError(f"{failed} transactions did not get their 200")
    return cpu / count


async def main(args: argparse.Namespace) -> None:
    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    stop = ctx.Event()
    ua = ctx.Process(target=_ua, args=(port_queue, stop), daemon=True)
    ua.start()
    ua_port = port_queue.get(timeout=10)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    deployment = f"bench{uuid.uuid4().hex[:8]}"
    owner, other = Worker(deployment, 0), Worker(deployment, 1)
    await owner.start(port)
    await other.start(port)
    sock = owner.transports.udp_listeners[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
    results: dict[str, list[float]] = {"direct": [], "handed off": []}
    started = time.monotonic()
    try:
        await _round(owner, ua_port, min(1000, args.count), args.window)  # warm-up
        for _ in range(args.rounds):
            for name, index in (("direct", 0), ("handed off", 1)):
                attach(sock, always(index))
                results[name].append(await _round(owner, ua_port, args.count, args.window))
        forwarded = other.layer.stats.responses_forwarded
        retransmitted = owner.layer.stats.requests_retransmitted
        undeliverable = other.handoff.stats.undeliverable
        wall = time.monotonic() - started
    finally:
        stop.set()
        ua.join(5)
        for worker in (owner, other):
            worker.layer.close()
            await worker.transports.close()
    direct = statistics.median(results["direct"]) * 1e6
    handed = statistics.median(results["handed off"]) * 1e6
    # This VM flips between a fast and a slow state (bench/README.md): compare each round
    # with its neighbour of the other kind, and take the median of those differences.
    deltas = [(h - d) * 1e6 for d, h in zip(results["direct"], results["handed off"], strict=True)]
    delta = statistics.median(deltas)
    print(f"python {platform.python_version()}, parser {IMPLEMENTATION}, {platform.machine()}")
    print(f"{args.rounds} rounds x {args.count} MESSAGE transactions, {args.window} in flight")
    print(f"direct:     {direct:6.1f} us CPU per transaction (response reached its sender)")
    print(f"handed off: {handed:6.1f} us CPU per transaction (every response handed over)")
    print(f"hand-off:   {delta:6.1f} us per handed-off response, median of the rounds' "
          f"differences (+{delta / direct * 100:.0f} %); with 2 workers half the responses: "
          f"+{delta / direct * 50:.0f} % per transaction")  # fmt: skip
    print(f"responses handed off in all: {forwarded}, lost on the way: {undeliverable}, "
          f"requests retransmitted (Timer E): {retransmitted}, wall time {wall:.1f} s")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="transactions per round")
    parser.add_argument("--window", type=int, default=100, help="transactions in flight")
    parser.add_argument("--rounds", type=int, default=10)
    uvloop.run(main(parser.parse_args()))
