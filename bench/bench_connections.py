"""Many connections (issue 19, workload 3): N registered TCP or TLS devices on one msilo.

One ``msilo serve`` (registrar mode, PostgreSQL in a database of its own, the default two
workers on this 2-CPU machine, a UDP and a ``tcp:`` or ``tls:`` listener) and, from this
process, N devices that each open a connection (from 127.0.0.2 ... 127.0.0.<1 + sources>,
so no one source address runs out of ephemeral ports) and REGISTER over it as an RFC 5626
outbound client does (``+sip.instance``, ``reg-id``, ``ob``): msilo reaches the binding's
contact over that connection. Measured:

* the RSS growth of msilo (supervisor, workers and leader together) per connection, after
  the connections are open and after each has registered, against a warmed-up server
  (goals: <= 5 kB per TCP connection, <= 30 kB per TLS connection);
* then, for ``--duration`` s while every connection stays open: ``--reregister-rate``
  re-REGISTERs/s over the open connections (round robin) and ``--message-rate`` MESSAGEs/s
  from a UDP sender to registered devices: MESSAGE sent -> arrival on the device's
  connection (the device answers 200), p50/p99 (goal: p99 <= 20 ms), and the REGISTER
  round trips.

The open-file limit of this process (and so of the msilo it starts) is raised first; msilo's
``limits.max_connections`` (per worker) is raised to N + 1,000, and its
``limits.message_timeout`` (which closes a connection whose first message is late) to
``--message-timeout`` so that all N can be opened before the first REGISTER.

    flock /work/bench.lock python -m bench.bench_connections --transport tcp \\
        --connections 50000 --json bench/RESULTS-connections-tcp.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvloop

if __package__ in (None, ""):  # run as a script: bench/ is a package of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e.procs import BenchError, Proc, wait_idle
from bench.e2e.servers import HOST, run_pg
from bench.e2e.sipp import summarize
from bench.streamserver import StreamMsilo, connections_per_pid, raise_nofile
from msilo.sip.framing import StreamFramer

GOAL_BYTES_PER_CONN = {"tcp": 5_000, "tls": 30_000}
GOAL_P99_MS = 20.0
MAX_CONNECTIONS = 60_000
_ANSWER_HEADERS = re.compile(rb"^(via|v|from|f|call-id|i|cseq)[ \t]*:", re.IGNORECASE)
_TO = re.compile(rb"^(to|t)[ \t]*:", re.IGNORECASE)
_CALL_ID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_CSEQ = re.compile(rb"\r\ncseq[ \t]*:[ \t]*\d+[ \t]+([A-Z]+)", re.IGNORECASE)


def status_of(data: bytes) -> int:
    """The status code of a response, 0 for a request."""
    return int(data[8:11]) if data.startswith(b"SIP/2.0 ") else 0


def answer_200(request: bytes) -> bytes:
    """A 200 OK for ``request`` (its Vias, From, Call-ID, CSeq; To with a tag)."""
    lines = [b"SIP/2.0 200 OK"]
    for line in request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        if _ANSWER_HEADERS.match(line):
            lines.append(line)
        elif _TO.match(line):
            lines.append(line if b";tag=" in line else line + b";tag=dev")
    return b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n"


class Recorder:
    """When each bench MESSAGE (Call-ID ``bcm-<n>``) reached a device."""

    __slots__ = ("arrived", "duplicates")

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.duplicates = 0

    def message(self, call_id: bytes, now: float) -> None:
        if call_id.startswith(b"bcm-"):
            n = int(call_id[4:])
            if n in self.arrived:
                self.duplicates += 1
            else:
                self.arrived[n] = now


class Device(asyncio.Protocol):
    """One registered device: a connection, its REGISTERs, and 200s to what it receives."""

    def __init__(self, index: int, scheme: str, recorder: Recorder) -> None:
        self.index = index
        self.user = f"dev{index}"
        self.scheme = scheme
        self.recorder = recorder
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.local = ""
        self.cseq = 0
        self.instance = f"urn:uuid:{uuid.uuid4()}"
        self.waiter: asyncio.Future[tuple[int, float]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ip, port = transport.get_extra_info("sockname")[:2]
        self.local = f"{ip}:{port}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((0, time.monotonic()))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        for item in self.framer.feed(data):
            if not isinstance(item, bytes):
                continue  # a keep-alive pong
            code = status_of(item)
            if code == 0:
                found = _CALL_ID.search(item)
                if found is not None and item.startswith(b"MESSAGE "):
                    self.recorder.message(found.group(1).strip(), now)
                if self.transport is not None:
                    self.transport.write(answer_200(item))
            elif code >= 200 and self.waiter is not None and not self.waiter.done():
                method = _CSEQ.search(item)
                if method is not None and method.group(1) == b"REGISTER":
                    self.waiter.set_result((code, now))

    def register_request(self, expires: int = 600) -> bytes:
        """The next REGISTER of this device (same Call-ID, CSeq + 1, a new branch)."""
        self.cseq += 1
        via = f"SIP/2.0/{self.scheme.upper()} {self.local}"
        return (
            f"REGISTER sip:{HOST} SIP/2.0\r\n"
            f"Via: {via};branch=z9hG4bKr{self.index}x{self.cseq};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{self.user}@{HOST}>;tag=r{self.index}\r\n"
            f"To: <sip:{self.user}@{HOST}>\r\n"
            f"Call-ID: reg-{self.index}-{self.instance[9:17]}\r\n"
            f"CSeq: {self.cseq} REGISTER\r\n"
            f"Contact: <sip:{self.user}@{self.local};transport={self.scheme};ob>"
            f';+sip.instance="<{self.instance}>";reg-id=1;expires={expires}\r\n'
            "Supported: path, outbound\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    def send_register(self) -> asyncio.Future[tuple[int, float]]:
        """Send the next REGISTER; the future gets (final status, arrival time)."""
        waiter = asyncio.get_running_loop().create_future()
        if self.transport is None:
            waiter.set_result((0, time.monotonic()))
            return waiter
        self.waiter = waiter
        self.transport.write(self.register_request())
        return waiter

    async def register(self, timeout: float = 30.0, tries: int = 4) -> int:
        """REGISTER until 200 (a 503 from msilo's overload guard is retried); the status."""
        code = 0
        for attempt in range(tries):
            try:
                code, _ = await asyncio.wait_for(self.send_register(), timeout)
            except TimeoutError:
                code = 0
            if code != 503:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        return code

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Sender(asyncio.DatagramProtocol):
    """The UDP sender of the MESSAGEs: their final answers by number."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.answers: dict[int, tuple[int, float]] = {}
        self.local = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ip, port = transport.get_extra_info("sockname")[:2]
        self.local = f"{ip}:{port}"

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        code = status_of(data)
        found = _CALL_ID.search(data)
        if code >= 200 and found is not None and found.group(1).startswith(b"bcm-"):
            self.answers.setdefault(int(found.group(1)[4:]), (code, time.monotonic()))

    def message(self, n: int, to: str, port: int) -> None:
        body = f"bench message {n} to {to}: lorem ipsum dolor sit amet".encode()
        data = (
            f"MESSAGE sip:{to}@{HOST} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {self.local};branch=z9hG4bKm{n}x{os.getpid()};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:sender@{HOST}>;tag=m{n}\r\n"
            f"To: <sip:{to}@{HOST}>\r\n"
            f"Call-ID: bcm-{n}\r\n"
            "CSeq: 1 MESSAGE\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))


class Client:
    """Opens, registers and drives one process's share of the devices."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.scheme: str = spec["scheme"]
        self.port: int = spec["port"]
        self.recorder = Recorder()
        self.ssl: ssl.SSLContext | None = None
        if self.scheme == "tls":
            self.ssl = ssl.create_default_context(cafile=spec["certificate"])
        self.sources = itertools.cycle([f"127.0.0.{2 + i}" for i in range(spec["sources"])])
        self.index = itertools.count(spec["offset"])
        self.devices: list[Device] = []

    async def _connect(self) -> Device:
        index = next(self.index)
        loop = asyncio.get_running_loop()
        _, device = await loop.create_connection(
            lambda: Device(index, self.scheme, self.recorder),
            HOST,
            self.port,
            local_addr=(next(self.sources), 0),
            ssl=self.ssl,
            server_hostname=HOST if self.ssl is not None else None,
            ssl_handshake_timeout=60 if self.ssl is not None else None,
        )
        return device

    async def _open(self, count: int, parallel: int) -> list[Device]:
        devices: list[Device] = []
        gate = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with gate:
                devices.append(await asyncio.wait_for(self._connect(), 60))

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 900)
        return devices

    @staticmethod
    async def _register(devices: list[Device], parallel: int) -> dict[int, int]:
        gate = asyncio.Semaphore(parallel)
        codes: dict[int, int] = {}

        async def one(device: Device) -> None:
            async with gate:
                code = await device.register()
                codes[code] = codes.get(code, 0) + 1

        await asyncio.wait_for(asyncio.gather(*(one(d) for d in devices)), 900)
        return codes

    # --- the commands the parent sends (each returns something picklable)

    async def warm(self, count: int) -> dict[int, int]:
        """Open, register and close ``count`` connections (numbered apart from the rest)."""
        devices = await self._open(count, 50)
        codes = await self._register(devices, 50)
        for device in devices:
            device.close()
        return codes

    async def open(self, parallel: int) -> float:
        """Open this process's devices' connections; seconds it took."""
        t0 = time.monotonic()
        self.devices = await self._open(self.spec["count"], parallel)
        self.devices.sort(key=lambda d: d.index)
        return time.monotonic() - t0

    async def register(self, parallel: int) -> dict[int, int]:
        """REGISTER every device once; how many got each final status."""
        return await self._register(self.devices, parallel)

    async def load(self, start: float, seconds: float, rate: float, grace: float) -> dict[str, Any]:
        """Re-REGISTER round robin at ``rate``/s from ``start`` for ``seconds``; then wait up
        to ``grace`` s for the answers. Returns the REGISTERs' statuses and round trips and
        when each bench MESSAGE arrived."""
        devices = self.devices
        order = list(range(len(devices)))
        random.Random(self.spec["offset"]).shuffle(order)
        registers: list[tuple[float, asyncio.Future[tuple[int, float]]]] = []
        # The client's own full collections (its devices are thousands of tracked objects
        # each) would stall this process for tens of ms and be measured as msilo's latency:
        # none during the (bounded) load.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            return await self._load(devices, order, registers, start, seconds, rate, grace)
        finally:
            gc.enable()
            gc.unfreeze()

    async def _load(
        self,
        devices: list[Device],
        order: list[int],
        registers: list[tuple[float, asyncio.Future[tuple[int, float]]]],
        start: float,
        seconds: float,
        rate: float,
        grace: float,
    ) -> dict[str, Any]:
        skipped = 0
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        end = start + seconds
        sent = cursor = 0
        while (now := time.monotonic()) < end:
            due = int((now - start) * rate) + 1
            while sent < due:
                sent += 1
                for _ in range(len(order)):  # the next device with no REGISTER in flight
                    device = devices[order[cursor]]
                    cursor = (cursor + 1) % len(order)
                    if device.waiter is None or device.waiter.done():
                        registers.append((now, device.send_register()))
                        break
                else:
                    skipped += 1
            await asyncio.sleep(0.001)  # uvloop timers are whole ms
        until = time.monotonic() + grace
        while time.monotonic() < until and not all(f.done() for _, f in registers):
            await asyncio.sleep(0.05)
        rtts: list[float] = []
        codes: dict[int, int] = {}
        for at, fut in registers:
            code, answered = fut.result() if fut.done() else (-1, 0.0)
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                rtts.append((answered - at) * 1000)
        return {
            "sent": len(registers),
            "skipped": skipped,
            "codes": codes,
            "rtt_ms": rtts,
            "arrived": dict(self.recorder.arrived),
            "duplicates": self.recorder.duplicates,
        }

    async def close(self) -> int:
        """Close every connection; how many were still open before."""
        still_open = sum(1 for d in self.devices if d.transport is not None and not d.lost)
        for device in self.devices:
            device.close()
        await asyncio.sleep(0.5)
        return still_open


def client_process(pipe: Connection, spec: dict[str, Any]) -> None:
    """A client process: runs the parent's commands one after another until ``exit``."""
    uvloop.run(_commands(pipe, spec))


async def _commands(pipe: Connection, spec: dict[str, Any]) -> None:
    client = Client(spec)
    loop = asyncio.get_running_loop()
    while True:
        command, kwargs = await loop.run_in_executor(None, pipe.recv)
        if command == "exit":
            return
        try:
            result = await getattr(client, command)(**kwargs)
        except Exception as exc:  # handed to the parent, which stops the run with it
            result = BenchError(f"client {spec['offset']}: {command} failed: {exc!r}")
        pipe.send(result)


class Clients:
    """The client processes, each holding up to ``--per-client`` devices (each process's
    open-file limit is the hard limit; the parent's commands go to all of them at once)."""

    def __init__(self, args: argparse.Namespace, port: int, warm: int) -> None:
        context = multiprocessing.get_context("spawn")
        n = args.connections
        k = -(-n // args.per_client)
        self.pipes: list[Connection] = []
        self.procs: list[BaseProcess] = []
        for i in range(k):
            count = n // k + (1 if i < n % k else 0)
            spec = {
                "scheme": args.transport,
                "port": port,
                "certificate": getattr(args, "certificate", ""),
                "sources": args.sources,
                # Device numbers: the warm-up's from 10**6 on, apart from the measured ones.
                "offset": sum(n // k + (1 if j < n % k else 0) for j in range(i)),
                "count": count,
            }
            if i == 0:
                self.warmer = (warm, spec)
            parent, child = context.Pipe()
            proc = context.Process(target=client_process, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    async def call(self, command: str, timeout: float, **kwargs: Any) -> list[Any]:
        """``command`` in every client process at once; their results, in order."""
        for pipe in self.pipes:
            pipe.send((command, kwargs))
        loop = asyncio.get_running_loop()

        def receive(pipe: Connection) -> Any:
            if not pipe.poll(timeout):
                raise BenchError(f"a client process did not finish {command} in {timeout} s")
            return pipe.recv()

        results = await asyncio.gather(
            *(loop.run_in_executor(None, receive, pipe) for pipe in self.pipes)
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def warm(self, count: int) -> dict[int, int]:
        """The warm-up, from a process of its own (its devices numbered from 10**6)."""
        _, spec = self.warmer
        loop = asyncio.get_running_loop()
        parent, child = multiprocessing.get_context("spawn").Pipe()
        proc = multiprocessing.get_context("spawn").Process(
            target=client_process, args=(child, {**spec, "offset": 10**6}), daemon=True
        )
        proc.start()
        child.close()
        parent.send(("warm", {"count": count}))
        ready = await loop.run_in_executor(None, parent.poll, 300)
        if not ready:
            proc.kill()
            raise BenchError("the warm-up client did not finish in 300 s")
        codes = parent.recv()
        parent.send(("exit", {}))
        await loop.run_in_executor(None, proc.join, 10)
        if isinstance(codes, BaseException):
            raise codes
        return dict(codes)

    def stop(self) -> None:
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            with contextlib.suppress(OSError):
                pipe.send(("exit", {}))
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def total_kib(server: StreamMsilo) -> tuple[int, int]:
    """(all msilo processes, the workers only) resident KiB."""
    return sum(server.total_rss_kib().values()), server.workers_rss_kib()


async def _settle(server: StreamMsilo, seconds: float) -> tuple[int, int]:
    """RSS after ``seconds`` of quiet (the allocator and the workers' timers settle)."""
    await asyncio.sleep(seconds)
    return total_kib(server)


def _merge(counts: list[dict[int, int]]) -> dict[str, int]:
    out: dict[int, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return {str(k): v for k, v in sorted(out.items())}


async def _messages(
    args: argparse.Namespace, server: StreamMsilo, start: float
) -> tuple[dict[int, tuple[float, int]], Sender]:
    """The UDP sender's MESSAGEs to random registered devices at ``--message-rate``."""
    loop = asyncio.get_running_loop()
    transport, sender = await loop.create_datagram_endpoint(Sender, local_addr=(HOST, 0))
    rng = random.Random(19)
    sent_at: dict[int, tuple[float, int]] = {}
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    end = start + args.duration
    n = 0
    while (now := time.monotonic()) < end:
        due = int((now - start) * args.message_rate) + 1
        while n < due:
            target = rng.randrange(args.connections)
            sent_at[n] = (time.monotonic(), target)
            sender.message(n, f"dev{target}", server.port)
            n += 1
        await asyncio.sleep(0.001)
    until = time.monotonic() + args.grace
    while time.monotonic() < until and len(sender.answers) < n:
        await asyncio.sleep(0.05)
    transport.close()
    return sent_at, sender


async def _load(clients: Clients, server: StreamMsilo, args: argparse.Namespace) -> dict[str, Any]:
    """Re-REGISTERs (in the client processes) and MESSAGEs (from here) at once."""
    start = time.monotonic() + 1.0  # every process starts at the same moment
    share = args.reregister_rate / len(clients.pipes)
    gc.collect()  # as in the client processes: no collection of ours inside the window
    gc.disable()
    load = clients.call(
        "load", args.duration + args.grace + 60,
        start=start, seconds=args.duration, rate=share, grace=args.grace,
    )  # fmt: skip
    try:
        parts, (sent_at, sender) = await asyncio.gather(load, _messages(args, server, start))
    finally:
        gc.enable()
    arrived: dict[int, float] = {}
    for part in parts:
        arrived.update(part["arrived"])
    delivery_ms = [(arrived[n] - sent_at[n][0]) * 1000 for n in sent_at if n in arrived]
    answer_ms = []
    answer_codes: dict[int, int] = {}
    for n, (at, _) in sent_at.items():
        code, answered = sender.answers.get(n, (-1, 0.0))
        answer_codes[code] = answer_codes.get(code, 0) + 1
        if code == 200:
            answer_ms.append((answered - at) * 1000)
    sent = sum(p["sent"] for p in parts)
    return {
        "seconds": args.duration,
        "reregisters_sent": sent,
        "reregisters_skipped_busy": sum(p["skipped"] for p in parts),
        "reregister_rate_achieved": round(sent / args.duration, 1),
        "reregister_status": _merge([p["codes"] for p in parts]),
        "reregister_rtt_ms": summarize([x for p in parts for x in p["rtt_ms"]]),
        "messages_sent": len(sent_at),
        "messages_delivered": len(delivery_ms),
        "messages_delivered_twice": sum(p["duplicates"] for p in parts),
        "message_final_status_at_sender": _merge([answer_codes]),
        "message_delivery_ms": summarize(delivery_ms),
        "message_to_200_at_sender_ms": summarize(answer_ms),
    }


async def measure(server: StreamMsilo, args: argparse.Namespace) -> dict[str, Any]:
    clients = Clients(args, server.stream_port, args.warmup)
    try:
        return await _measure(clients, server, args)
    finally:
        clients.stop()


async def _measure(
    clients: Clients, server: StreamMsilo, args: argparse.Namespace
) -> dict[str, Any]:
    # Warm-up: every code path a connection and a REGISTER take, then closed again, so the
    # baseline is a server that has served (imports, caches, pools), not a cold one.
    await clients.warm(args.warmup)
    base = await _settle(server, args.settle)
    t0 = time.monotonic()
    await clients.call("open", 900, parallel=max(1, args.parallel // len(clients.pipes)))
    opened_s = time.monotonic() - t0
    after_open = await _settle(server, args.settle)
    t0 = time.monotonic()
    codes = _merge(
        await clients.call("register", 900, parallel=max(1, args.parallel // len(clients.pipes)))
    )
    register_s = time.monotonic() - t0
    after_register = await _settle(server, args.settle)
    spread = sorted(connections_per_pid(server.stream_port).values(), reverse=True)
    load = await _load(clients, server, args)
    after_load = total_kib(server)
    still_open = sum(await clients.call("close", 120))
    n = args.connections
    per_open = (after_open[0] - base[0]) * 1024 / n
    per_registered = (after_register[0] - base[0]) * 1024 / n
    goal = GOAL_BYTES_PER_CONN[args.transport]
    p99 = load["message_delivery_ms"]["p99"]
    return {
        "transport": args.transport,
        "connections": n,
        "client_processes": len(clients.pipes),
        "opened_in_s": round(opened_s, 2),
        "register_status": codes,
        "registered_in_s": round(register_s, 2),
        "connections_per_worker": spread,
        "still_open_after_load": still_open,
        "rss_kib_all_processes": {
            "warm_baseline": base[0],
            "after_open": after_open[0],
            "after_register": after_register[0],
            "after_load": after_load[0],
        },
        "rss_kib_workers": {
            "warm_baseline": base[1],
            "after_open": after_open[1],
            "after_register": after_register[1],
            "after_load": after_load[1],
        },
        "rss_bytes_per_conn_open": round(per_open),
        "rss_bytes_per_conn_registered": round(per_registered),
        "rss_bytes_per_conn_registered_workers": round((after_register[1] - base[1]) * 1024 / n),
        "load": load,
        "goals": {
            f"rss_bytes_per_conn <= {goal // 1000} kB": per_registered <= goal,
            f"MESSAGE delivery p99 <= {GOAL_P99_MS:g} ms": p99 <= GOAL_P99_MS,
            "every MESSAGE delivered": load["messages_delivered"] == load["messages_sent"],
            "every connection registered": codes.get("200", 0) == n,
            "every connection still open": still_open == n,
        },
    }


def make_certificate(where: Path) -> tuple[str, str]:
    """A self-signed P-256 certificate for 127.0.0.1 and its key (PEM files)."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    load = result["load"]
    d, r = load["message_delivery_ms"], load["reregister_rtt_ms"]
    rss = result["rss_kib_all_processes"]
    goals = result["goals"].items()
    lines = [
        f"{result['transport'].upper()} connections: {result['connections']} "
        f"(opened in {result['opened_in_s']} s, registered in {result['registered_in_s']} s, "
        f"REGISTER status {result['register_status']}, "
        f"per worker {result['connections_per_worker']})",
        f"msilo RSS KiB: warm {rss['warm_baseline']}, open {rss['after_open']}, "
        f"registered {rss['after_register']}, after load {rss['after_load']}",
        f"RSS per connection: open {result['rss_bytes_per_conn_open']} B, "
        f"registered {result['rss_bytes_per_conn_registered']} B "
        f"(workers only {result['rss_bytes_per_conn_registered_workers']} B)",
        f"load {load['seconds']} s: {load['reregister_rate_achieved']} re-REGISTER/s "
        f"(status {load['reregister_status']}, RTT p50/p99 {r['p50']:.1f}/{r['p99']:.1f} ms); "
        f"MESSAGEs {load['messages_delivered']}/{load['messages_sent']} delivered, "
        f"p50/p99/max {d['p50']:.1f}/{d['p99']:.1f}/{d['max']:.1f} ms",
        "goals: " + ", ".join(f"{k}: {'met' if ok else 'FAILED'}" for k, ok in goals),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("tcp", "tls"), default="tcp")
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--sources", type=int, default=16, help="client source addresses")
    parser.add_argument("--parallel", type=int, default=200, help="connects/REGISTERs at once")
    parser.add_argument("--warmup", type=int, default=200, help="connections before baseline")
    parser.add_argument("--settle", type=float, default=3.0, help="quiet seconds before RSS")
    parser.add_argument("--duration", type=float, default=20.0, help="load phase, seconds")
    parser.add_argument("--reregister-rate", type=int, default=1000)
    parser.add_argument("--message-rate", type=int, default=50)
    parser.add_argument("--grace", type=float, default=5.0, help="s for the last answers")
    parser.add_argument("--message-timeout", type=float, default=900.0)
    parser.add_argument(
        "--workers", type=int, default=0,
        help="msilo workers (0 = one per CPU, more when one worker's share of the connections"
        " would not fit under the open-file limit)",
    )  # fmt: skip
    parser.add_argument("--per-client", type=int, default=15_000, help="devices per client process")
    parser.add_argument("--dsn", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--set", action="append", default=[], help="more msilo settings")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--wait-idle", type=float, default=0.6, help="host idle share first")
    args = parser.parse_args()
    if not 0 < args.connections <= MAX_CONNECTIONS or not 0 < args.duration <= 120:
        parser.error(f"--connections in 1..{MAX_CONNECTIONS}, --duration in (0, 120]")
    if not 1 <= args.sources <= 250 or not 0 < args.reregister_rate <= 10_000:
        parser.error("--sources in 1..250, --reregister-rate in 1..10000")
    if not 0 < args.message_rate <= 1_000 or not 0 < args.grace <= 60:
        parser.error("--message-rate in 1..1000, --grace in (0, 60]")

    # Each process's open-file limit: the hard limit, which a process without
    # CAP_SYS_RESOURCE cannot raise (20,000 on this VM). So the devices are spread over
    # client processes, and msilo gets enough workers that each one's share (the kernel's
    # SO_REUSEPORT hash spreads them evenly, within a few %) fits with room to spare.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = raise_nofile(
        min(hard, max(args.per_client, args.connections) + 4_000)
        if hard != resource.RLIM_INFINITY
        else args.connections + 4_000
    )
    room = limit - 1_500  # a worker's own sockets: database pool, hand-off, listeners
    if args.per_client > room:
        parser.error(f"--per-client {args.per_client} does not fit the open-file limit {limit}")
    workers = args.workers or max(os.cpu_count() or 1, -(-args.connections * 11 // 10 // room))
    if args.connections * 11 // 10 // workers > room:
        parser.error(f"{workers} workers cannot hold {args.connections} under {limit} files each")
    database = f"msilo_bench_conn_{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-conn-"))
    sets = [
        f"limits.max_connections={args.connections + 1000}",
        f"limits.message_timeout={args.message_timeout}",
    ]
    if args.transport == "tls":
        args.certificate, key = make_certificate(workdir)
        sets += [f'tls.certificate="{args.certificate}"', f'tls.private_key="{key}"']
    server = StreamMsilo(args.dsn, database, workdir, workers, [*sets, *args.set])
    server.scheme = args.transport
    idle, waited = wait_idle(args.wait_idle, 120.0)
    server.prepare()
    try:
        server.start()
        result = uvloop.run(measure(server, args))
        server.check_alive()

        async def bindings(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM location"))

        result["bindings_in_db"] = run_pg(server.dsn, bindings)
    finally:
        server.stop()
        Proc.stop_all()
        server.cleanup()
    result["setup"] = {
        "msilo": server.info,
        "nofile_limit": limit,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "idle_share_before": idle,
        "waited_for_idle_s": round(waited, 1),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    print(summary(result))
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_connections: {exc}", file=sys.stderr)
        sys.exit(1)
