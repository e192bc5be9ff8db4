"""The multi-process server: workers share the port, statistics add up, failures are handled.

Every test runs the real ``msilo serve`` (supervisor, workers, leader) against a
real PostgreSQL schema and talks real SIP on 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import ROOT, Instance, wait_for
from tests.server.loadgen import send_load, start_agents
from tests.service.sipua import UserAgent, free_port

pytestmark = pytest.mark.pg

COUNTED = ("requests", "requests_message", "stored_messages", "replies_2xx", "batch_rows")


def _by_worker(stats: dict[str, object], name: str) -> list[int]:
    workers = stats["workers"]
    assert isinstance(workers, list)
    return [w["counters"][name] for w in workers if w["role"] == "worker"]


async def test_two_workers_share_the_traffic_and_every_path_works(serve, pg_url: str) -> None:
    srv: Instance = serve(pg_url, "server.workers=2")
    await srv.wait_ready(2)
    agents = await start_agents(srv.address, 40)
    receivers: list[UserAgent] = []
    try:
        # A burst from 40 source ports: the kernel spreads it over both workers.
        result = await send_load(
            agents, tag="burst", count=80, rate=400, to=lambda n: f"sip:user{n % 16}@127.0.0.1"
        )
        assert result.with_status(202) == set(range(80))
        stats = srv.get("/stats")
        stored = _by_worker(stats, "stored_messages")
        assert len(stored) == 2 and all(n > 0 for n in stored), stored
        assert stats["stored_messages"] == 80
        for name in COUNTED:  # totals are exactly the sum of the processes' rows
            assert stats[name] == sum(w["counters"][name] for w in stats["workers"]), name
        assert "msilo_stored_messages_total 80.0" in srv.text("/metrics")

        # Each user registers from its own port: whichever worker gets the REGISTER dumps
        # from its own client socket, and the 200s come back to it (else: failed_messages).
        for i in range(16):
            ua = await UserAgent(srv.address, user=f"user{i}", domain="127.0.0.1").start()
            receivers.append(ua)
            assert (await ua.register(600)).status == 200
        for ua in receivers:
            got = await ua.wait_requests(5, timeout=10)
            assert len(got) == 5
        stats = await wait_for(
            lambda: srv.get("/stats"), lambda s: s["dumped_messages"] == 80, 10, "dumps", srv
        )
        assert stats["failed_messages"] == 0
        assert all(n > 0 for n in _by_worker(stats, "dumped_messages")), stats["workers"]

        # Relays: bob is online; senders on 40 ports reach both workers, every relay answers.
        bob = await UserAgent(srv.address, user="bob", domain="127.0.0.1").start()
        receivers.append(bob)
        assert (await bob.register(600, headers=["Allow: MESSAGE"])).status == 200
        relayed = await send_load(agents, tag="relay", count=40, rate=200, to="sip:bob@127.0.0.1")
        assert set(relayed.statuses.values()) == {200}
        assert len(bob.received) == 40
        stats = srv.get("/stats")
        assert all(n > 0 for n in _by_worker(stats, "relayed_messages")), stats["workers"]
        assert stats["relayed_messages"] == 40

        # The endpoint asks the database who holds the leader lock every 2 s.
        health = await wait_for(
            lambda: srv.get("/health"),
            lambda h: h["leader"]["holder"] is not None,
            8,
            "leader holder",
            srv,
        )
        assert health["status"] == "ok" and health["database"]["ok"] is True
        assert health["leader"]["holder"]["pid"] == health["leader"]["process"]["pid"]
        assert health["leader"]["here"] is True
    finally:
        for ua in [*agents, *receivers]:
            ua.close()


async def test_one_peer_is_spread_over_both_workers_and_retransmissions_stay_put(
    serve, pg_url: str
) -> None:
    # In production every MESSAGE comes from the one proxy in front of us (one address
    # and port); the kernel's SO_REUSEPORT hash alone would hand all of it to one worker.
    srv: Instance = serve(pg_url, "server.workers=2")
    await srv.wait_ready(2)
    (proxy,) = await start_agents(srv.address, 1)
    try:
        result = await send_load(
            [proxy], tag="proxy", count=60, rate=300, to=lambda n: f"sip:user{n % 8}@127.0.0.1"
        )
        assert result.with_status(202) == set(range(60))
        stats = srv.get("/stats")
        handled = _by_worker(stats, "requests_message")
        assert len(handled) == 2 and all(n > 0 for n in handled), handled
        assert stats["stored_messages"] == 60

        # Every request sent three times at once, as a UAC retransmits: each must be
        # handled once, by one worker (a copy on the other would count as a new request).
        for n in range(20):
            data, branch = proxy.build("MESSAGE", "sip:user1@127.0.0.1", body=b"again %d" % n)
            proxy.send_raw(data)
            proxy.send_raw(data)
            assert (await proxy.send_and_wait(data, branch)).status == 202
        stats = await wait_for(
            lambda: srv.get("/stats"), lambda s: s["replies_2xx"] >= 80, 5, "202s", srv
        )
        assert stats["requests_message"] == 80
        assert stats["stored_messages"] == 80
    finally:
        proxy.close()


async def test_a_worker_whose_event_loop_blocks_is_replaced(serve, pg_url: str) -> None:
    srv: Instance = serve(
        pg_url, "server.workers=2", 'server.route="tests.server.routes_blocking:block_when_marked"'
    )
    await srv.wait_ready(2)
    before = srv.worker_pids()
    ua = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
    try:
        data, _ = ua.build("MESSAGE", "sip:bob@127.0.0.1", body=b"freeze", headers=["X-Block: 1"])
        ua.send_raw(data)
        # No heartbeat from the frozen loop for HEARTBEAT_TIMEOUT (10 s): killed, replaced.
        after = await wait_for(
            srv.worker_pids,
            lambda p: len(p) == 2 and len(set(p.values()) - set(before.values())) == 1,
            25,
            "the stuck worker replaced",
            srv,
        )
        [replaced] = [i for i in before if before[i] != after[i]]
        log = srv.log()
        assert f"event=child_stuck role=worker{replaced} pid={before[replaced]}" in log
        assert f"event=child_died role=worker{replaced} pid={before[replaced]}" in log
        reply = await ua.message("sip:bob@127.0.0.1", "still serving")
        assert reply.status == 202
    finally:
        ua.close()


def _serve_once(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "msilo", "serve", "--set", 'server.http=""',
            "--set", "server.workers=2"]  # fmt: skip
    for item in overrides:
        argv += ["--set", item]
    return subprocess.run(
        argv,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("msilo: error:")]


def test_a_taken_port_stops_the_server_with_one_line_and_no_restart_loop(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        out = _serve_once(tmp_path, f'server.listen=["udp:127.0.0.1:{port}"]')
    assert out.returncode == 2, out.stderr
    assert _error_lines(out.stderr) == [
        f"msilo: error: server.listen: cannot bind udp:127.0.0.1:{port} (Address already in use)"
    ]
    assert out.stderr.count("event=spawned") == 3  # two workers and the leader, once each
    assert "event=child_died" not in out.stderr and "Traceback" not in out.stderr


def test_a_route_that_cannot_load_stops_the_server(tmp_path: Path) -> None:
    out = _serve_once(
        tmp_path,
        f'server.listen=["udp:127.0.0.1:{free_port()}"]',
        'server.route="tests.server.no_such_module:route"',
    )
    assert out.returncode == 2, out.stderr
    [line] = _error_lines(out.stderr)
    assert line.startswith("msilo: error: server.route:")
    assert out.stderr.count("event=spawned") == 3


def test_an_unreachable_database_stops_the_server(tmp_path: Path) -> None:
    closed = free_port()
    out = _serve_once(
        tmp_path,
        f'server.listen=["udp:127.0.0.1:{free_port()}"]',
        f'msilo.db_url="postgres://postgres@127.0.0.1:{closed}/msilo"',
    )
    assert out.returncode == 1, out.stderr
    [line] = _error_lines(out.stderr)
    assert line.startswith("msilo: error: database: cannot connect to PostgreSQL")
    assert "event=spawned" not in out.stderr and "Traceback" not in out.stderr
