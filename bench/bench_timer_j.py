"""Garbage-collection pause caused by completed transactions waiting out Timer J.

Over UDP a server transaction lives 64·T1 = 32 s after its final response; at R
requests per second about 32·R of them are alive.  This script fills a transaction
layer (fake transport, C parser) with that many answered MESSAGEs and times a full
``gc.collect()``, with the transactions retired (only the replay state kept) and,
in the same run, with the whole parsed request kept (the behaviour before).

    python bench/bench_timer_j.py --rate 1500
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msilo.sip.parser import parse_message
from msilo.transaction import ManualClock, ServerTransaction, TransactionLayer
from msilo.transport.base import Source

MESSAGE = (
    "MESSAGE sip:bob@example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK-{n};rport\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a{n}\r\n"
    "To: <sip:bob@example.com>\r\nCall-ID: c{n}@example.com\r\nCSeq: 1 MESSAGE\r\n"
    "Content-Type: text/plain\r\nContent-Length: 100\r\n\r\n" + "x" * 100
)


class _Channel:
    def reply(self, data: bytes, addr: object, via: object) -> None:
        pass


def _pause_ms(count: int, retire: bool, rounds: int = 5) -> tuple[float, int]:
    original = ServerTransaction._retire, ServerTransaction.replay_state
    if not retire:
        # As before: the whole transaction (and its parsed request) waits out Timer J.
        ServerTransaction._retire = lambda self: None  # type: ignore[method-assign]
        ServerTransaction.replay_state = lambda self: self  # type: ignore[method-assign,assignment,return-value]
    try:
        layer = TransactionLayer(
            lambda request, txn: txn.respond(202, "Accepted"),
            lambda data, target, on_error: None,
            clock=ManualClock(),
            parse=parse_message,
        )
        channel = _Channel()
        for n in range(count):
            layer.receive(
                MESSAGE.format(n=n).encode(), Source("UDP", ("192.0.2.10", 5070), channel)
            )
        gc.collect()
        tracked = len(gc.get_objects())
        pauses = []
        for _ in range(rounds):
            started = time.perf_counter()
            gc.collect()
            pauses.append((time.perf_counter() - started) * 1000)
        assert layer.server_count == count
        layer.close()
        return statistics.median(pauses), tracked
    finally:
        ServerTransaction._retire, ServerTransaction.replay_state = original  # type: ignore[method-assign]


def main() -> None:
    """Print the full-GC pause with and without retirement, and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1500, help="requests per second")
    parser.add_argument("--timer-j", type=float, default=32.0, help="seconds (64·T1)")
    args = parser.parse_args()
    count = int(args.rate * args.timer_j)
    kept, kept_objects = _pause_ms(count, retire=False)
    retired, retired_objects = _pause_ms(count, retire=True)
    print(f"{count} completed transactions ({args.rate}/s x {args.timer_j:g} s of Timer J)")
    print(f"  parsed request kept : full GC {kept:6.1f} ms, {kept_objects} tracked objects")
    print(f"  replay tuple only   : full GC {retired:6.1f} ms, {retired_objects} tracked objects")
    print(f"  ratio               : {kept / retired:.1f}x shorter pauses")


if __name__ == "__main__":
    main()
