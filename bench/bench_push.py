"""Push provider cost: pushes per second and the latency of one ``send()`` against the fake
FCM, APNs and webhook servers of tests/push, which run in a child process (their own event
loop and core), over TLS + HTTP/2 for FCM and APNs, plain HTTP/1.1 for the webhook.

N pushes are sent at a fixed offered rate (default 1,000/s, the issue 16 benchmark's store
rate) after a warm-up; every push must be accepted, and the fake's count must match.

    python bench/bench_push.py --rate 1000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msilo.config import Config
from msilo.push.base import PushOutcome, PushProvider, PushRequest, PushTarget
from msilo.push.base import build_providers as build
from tests.push.fakes import FakeApns, FakeFcm, FakeServer, FakeWebhook, make_tls

FAKES: dict[str, type[FakeServer]] = {"fcm": FakeFcm, "apns": FakeApns, "webhook": FakeWebhook}
APNS_TOKEN = "a1" * 32


def _serve(name: str, directory: str, conn: Any) -> None:
    """Child: run one fake, send its [push.NAME] table, answer its request count on demand."""

    async def main() -> None:
        tls = make_tls(Path(directory) / "tls") if name != "webhook" else None
        async with FAKES[name].running(tls) as fake:
            conn.send(fake.settings(Path(directory)))  # type: ignore[attr-defined]
            loop = asyncio.get_running_loop()
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "count":
                    conn.send((len(fake.accepted), time.process_time()))
                else:
                    return

    asyncio.run(main())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(provider: PushProvider, name: str, rate: int, seconds: float) -> dict[str, Any]:
    target = PushTarget("bob", "example.com", "dev", name, APNS_TOKEN, None)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}

    async def one(i: int) -> None:
        start = time.perf_counter()
        result = await provider.send(PushRequest(target, 1, "sip:a@example.com", f"c{i}"))
        latencies.append(time.perf_counter() - start)
        outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1

    for i in range(50):  # warm-up: connection, access token, JWT
        await one(i)
    latencies.clear()
    outcomes.clear()
    total = int(rate * seconds)
    tasks = []
    cpu_began = time.process_time()
    began = time.perf_counter()
    for i in range(total):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu_began
    return {
        "provider": name,
        "offered_rate": rate,
        "pushes": total,
        "achieved_rate": round(total / elapsed, 1),
        "outcomes": outcomes,
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "elapsed_s": round(elapsed, 2),
        "client_cpu_s": round(cpu, 2),
    }


async def _measure(provider: PushProvider, name: str, rate: int, seconds: float) -> dict[str, Any]:
    try:
        return await _run(provider, name, rate, seconds)
    finally:
        await provider.aclose()


def main() -> int:
    """Run the benchmark; print one JSON object per provider."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--providers", default="fcm,apns,webhook")
    parser.add_argument("--profile", help="write a cProfile of the sending side here")
    args = parser.parse_args()
    failed = False
    for name in args.providers.split(","):
        with tempfile.TemporaryDirectory() as directory:
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.get_context("spawn").Process(
                target=_serve, args=(name, directory, child)
            )
            proc.start()
            table = parent.recv()
            providers = build(Config.from_mapping({"push": {name: table}}).push)

            work = _measure(providers[name], name, args.rate, args.seconds)
            if args.profile:
                import cProfile

                with cProfile.Profile() as profile:
                    row = asyncio.run(work)
                profile.dump_stats(f"{args.profile}.{name}")
            else:
                row = asyncio.run(work)
            parent.send("count")
            row["fake_accepted"], row["fake_cpu_s"] = parent.recv()
            row["fake_cpu_s"] = round(row["fake_cpu_s"], 2)
            parent.send("stop")
            proc.join(10)
            row["cpus"] = os.cpu_count()
            row["python"] = platform.python_version()
            print(json.dumps(row))
            sent = row["outcomes"].get(PushOutcome.SENT.value, 0)
            failed |= sent != row["pushes"] or row["fake_accepted"] != row["pushes"] + 50
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
