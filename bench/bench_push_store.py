"""Push wake-up under store load (issue 16): the 202 -> push latency, and what push costs
the store path, measured against the same server without push parameters in one run.

    python -m bench.bench_push_store                       # 1,000/s, 10 s a step, 2 rounds
    python -m bench.bench_push_store --rate 1000 --seconds 10 --repeat 2 --json out.json

One ``msilo serve`` (registrar mode, 2 workers, PostgreSQL, ``[push.webhook]`` pointed at a
receiver of the bench's own in a child process (aiohttp), ``push.coalesce`` 10 s). Two groups of
``--users`` users, each user one device (its own socket and ``+sip.instance``):

* **push**: the device registered with ``pn-provider=webhook;pn-prid=…`` in its Contact URI;
* **plain**: the same REGISTER without push parameters.

Every device registers once, then its binding is deleted in the database (the phone sleeps;
the device and its push target stay remembered). Then, per step, ``rate`` MESSAGEs a second
for ``seconds`` seconds go to random users of one group (alternating push, plain / plain,
push each round, the silo emptied and the push windows reset before each step), from 20
sender sockets that retransmit on Timer E. A step passes with every MESSAGE answered 202.

Reported per step: 202s per second over the window, p50/p99 of MESSAGE -> 202, and for the
push group the pushes the receiver got and p50/p99 of 202 -> push received (wall clock in
both processes; the push names the Call-ID of the MESSAGE that triggered it). Goals: p99
202 -> push <= 50 ms; push group's rate and p99 within 10 % of the plain group's.

Every loop is bounded in count and time; the server and the receiver are stopped at the end,
also on failure; the database is created for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_push_store.py` as well as `-m`
    sys.path.insert(0, str(ROOT))

from bench.bench_devices import Agent, CheckoutServer, open_agent, paced, pct  # noqa: E402
from bench.e2e.procs import BenchError  # noqa: E402
from bench.e2e.report import machine_info  # noqa: E402
from bench.e2e.servers import HOST, drop_database  # noqa: E402

SENDERS = 20


# --- the push receiver (a child process: its own core time, its own event loop) -------------


def _receiver(conn: multiprocessing.connection.Connection) -> None:
    """Answer every push 200 and note (call_id, arrival); hand the notes over on request.
    aiohttp's server: its C parser keeps the receiver's own CPU out of the way."""
    from aiohttp import web

    notes: list[tuple[str, float]] = []

    async def handle(request: web.Request) -> web.Response:
        arrived = time.time()
        try:
            call_id = str(json.loads(await request.read())["call_id"])
        except (ValueError, KeyError, TypeError):
            call_id = ""
        notes.append((call_id, arrived))
        return web.json_response({})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        conn.send(f"http://{HOST}:{port}")
        loop = asyncio.get_running_loop()
        try:
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command != "take":
                    return
                conn.send(list(notes))
                notes.clear()
        finally:
            await runner.cleanup()

    asyncio.run(main())


# --- the UAs ---------------------------------------------------------------------------------


class Device(Agent):
    """A device that registers with (or without) RFC 8599 parameters in its Contact URI."""

    def __init__(self, user: str, push: bool) -> None:
        super().__init__(user, str(uuid.uuid4()))
        self.push = push

    async def register(self, server: tuple[str, int], expires: int) -> int | None:
        """REGISTER the device (its push parameters in the URI, RFC 8599 §4.1)."""
        pn = f";pn-provider=webhook;pn-prid=tok-{self.user}" if self.push else ""
        headers = [
            f"From: <sip:{self.user}@{HOST}>;tag=r{self.port}",
            f"To: <sip:{self.user}@{HOST}>",
            f"Call-ID: reg-{self.user}-{self.port}@{HOST}",
            f'Contact: <sip:{self.user}@{HOST}:{self.port}{pn}>;+sip.instance="<urn:uuid:'
            f'{self.instance}>"',
            f"Expires: {expires}",
        ]
        data, branch = self.build("REGISTER", f"sip:{HOST}:{server[1]}", headers)
        return await self.send(data, branch, server)

    async def timed_message(
        self, server: tuple[str, int], to_user: str
    ) -> tuple[int | None, str, float]:
        """One MESSAGE: (final status, its Call-ID, wall time of the answer)."""
        n = self.cseq + 1
        call_id = f"p{n}-{self.port}-{random.getrandbits(40):x}@{HOST}"
        headers = [
            f"From: <sip:{self.user}@{HOST}>;tag=s{self.port}x{n}",
            f"To: <sip:{to_user}@{HOST}:{server[1]}>",
            f"Call-ID: {call_id}",
            "Content-Type: text/plain",
        ]
        data, branch = self.build(
            "MESSAGE", f"sip:{to_user}@{HOST}:{server[1]}", headers, b"wake up"
        )
        status = await self.send(data, branch, server)
        return status, call_id, time.time()


async def open_device(user: str, push: bool) -> Device:
    """A :class:`Device` on its own UDP socket."""
    device = await open_agent(user, None, factory=lambda: Device(user, push))
    assert isinstance(device, Device)
    return device


# --- the run ---------------------------------------------------------------------------------


class PushBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.database = f"msilo_bench_push_{uuid.uuid4().hex[:8]}"
        self.server: CheckoutServer | None = None
        self.hook: multiprocessing.connection.Connection | None = None

    async def register_group(self, name: str, push: bool) -> list[str]:
        users = [f"{name}{i}" for i in range(self.args.users)]
        assert self.server is not None
        target = (HOST, self.server.port)
        for start in range(0, len(users), 200):  # 200 sockets at a time
            devices = [await open_device(u, push) for u in users[start : start + 200]]
            try:
                answers, _ = await paced(
                    devices, 500.0, lambda d: d.register(target, 3600), limit=60
                )
            finally:
                for d in devices:
                    if d.transport is not None:
                        d.transport.close()
            if any(a != 200 for a in answers):
                raise BenchError(f"REGISTER failed for group {name}: {answers}")
        return users

    async def step(
        self, conn: asyncpg.Connection, name: str, users: list[str], senders: list[Device]
    ) -> dict[str, Any]:
        await conn.execute("DELETE FROM silo")
        await conn.execute("UPDATE msilo_push SET pushed_ms = NULL")
        assert self.server is not None and self.hook is not None
        self.hook.send("take")
        self.hook.recv()  # drop what a previous step left
        target = (HOST, self.server.port)
        count = int(self.args.rate * self.args.seconds)
        rng = random.Random(count)
        jobs = [(senders[i % len(senders)], rng.choice(users)) for i in range(count)]
        t0 = time.time()
        results, took = await paced(
            jobs,
            self.args.rate,
            lambda job: job[0].timed_message(target, job[1]),
            limit=self.args.seconds + 60,
        )
        ok = [r for r in results if r[0] == 202]
        end = max(r[2] for r in results)
        await asyncio.sleep(1.0)  # pushes still on their way
        self.hook.send("take")
        notes: list[tuple[str, float]] = self.hook.recv()
        answered = {call_id: at for status, call_id, at in ok}
        push_lat = [max(0.0, arrived - answered[c]) for c, arrived in notes if c in answered]
        rows = int(await conn.fetchval("SELECT count(*) FROM silo"))
        return {
            "group": name,
            "offered": self.args.rate,
            "messages": count,
            "accepted": len(ok),
            "failed": count - len(ok),
            "rows": rows,
            "rate": len(ok) / max(end - t0, 1e-9),
            "p50_ms": pct(took, 50) * 1000,
            "p99_ms": pct(took, 99) * 1000,
            "pushes": len(notes),
            "pushes_matched": len(push_lat),
            "push_p50_ms": pct(push_lat, 50) * 1000 if push_lat else None,
            "push_p99_ms": pct(push_lat, 99) * 1000 if push_lat else None,
        }

    async def measure(self) -> list[dict[str, Any]]:
        """Register both groups, then the steps (the server is running)."""
        assert self.server is not None
        conn = await asyncpg.connect(self.server.dsn)
        try:
            groups = {
                "push": await self.register_group("p", True),
                "plain": await self.register_group("q", False),
            }
            await conn.execute("DELETE FROM location")  # every phone sleeps
            senders = [await open_device(f"alice{i}", False) for i in range(SENDERS)]
            out = []
            for n in range(self.args.repeat):
                order = ["push", "plain"] if n % 2 == 0 else ["plain", "push"]
                for name in order:
                    result = await self.step(conn, name, groups[name], senders)
                    out.append(result)
                    print(_row(result), flush=True)
            return out
        finally:
            await conn.close()

    def run(self) -> dict[str, Any]:
        """The whole run: receiver, server, measurement, clean-up (also on failure)."""
        parent, child = multiprocessing.Pipe()
        receiver = multiprocessing.get_context("spawn").Process(target=_receiver, args=(child,))
        receiver.start()
        self.hook = parent
        try:
            endpoint = parent.recv() if parent.poll(30) else None
            if endpoint is None:
                raise BenchError("the push receiver did not start")
            self.server = CheckoutServer(
                self.args.dsn, self.database, self.workdir, self.args.workers, ROOT,
                extra={
                    "push.webhook.url": json.dumps(f"{endpoint}/push/$prid"),
                    "push.coalesce": "10",
                },
            )  # fmt: skip
            self.server.prepare()
            self.server.start()
            out = asyncio.run(self.measure())
        finally:
            if self.server is not None:
                self.server.stop()
            parent.send("stop")
            receiver.join(10)
            if receiver.is_alive():
                receiver.kill()
            drop_database(self.args.dsn, self.database)
        return {"steps": out, "summary": summary(out), "machine": machine_info(self.args.dsn)}


def _row(r: dict[str, Any]) -> str:
    push = (
        f" pushes {r['pushes']} (matched {r['pushes_matched']}), 202->push p50/p99 "
        f"{r['push_p50_ms']:.1f}/{r['push_p99_ms']:.1f} ms"
        if r["push_p99_ms"] is not None
        else ""
    )
    return (
        f"{r['group']:>5}: {r['accepted']}/{r['messages']} 202, {r['rate']:.0f}/s, "
        f"p50/p99 {r['p50_ms']:.1f}/{r['p99_ms']:.1f} ms{push}"
    )


def summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per group, the push/plain ratios and the goals."""

    def median(group: str, key: str) -> float:
        values = sorted(s[key] for s in steps if s["group"] == group and s[key] is not None)
        return values[len(values) // 2] if values else float("nan")

    rate = median("push", "rate") / median("plain", "rate")
    p99 = median("push", "p99_ms") / median("plain", "p99_ms")
    push_p99 = max(
        (s["push_p99_ms"] for s in steps if s["push_p99_ms"] is not None), default=float("nan")
    )
    failed = sum(s["failed"] for s in steps)
    return {
        "rate_ratio_push_vs_plain": rate,
        "p99_ratio_push_vs_plain": p99,
        "worst_push_p99_ms": push_p99,
        "failed": failed,
        "goal_push_p99_le_50ms": push_p99 <= 50,
        "goal_within_10pct": rate >= 0.9 and p99 <= 1.1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rate", type=float, default=1000.0, help="MESSAGEs per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="per step")
    parser.add_argument("--users", type=int, default=1000, help="per group")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of (push, plain)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="msilo-bench-push-") as tmp:
        result = PushBench(args, Path(tmp)).run()
    print(json.dumps(result["summary"], indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
