"""Statistics block and the management HTTP endpoint, over a real socket."""

from __future__ import annotations

import asyncio
import multiprocessing

import orjson
import pytest

from msilo.server.http import ManagementViews, start_management_http
from msilo.server.stats import MSILO_COUNTERS, StatsBlock, prometheus_text


def test_documented_msilo_counters_exist() -> None:
    assert set(MSILO_COUNTERS) == {
        "stored_messages",
        "dumped_messages",
        "failed_messages",
        "dumped_reminders",
        "failed_reminders",
    }


def test_rows_are_summed() -> None:
    block = StatsBlock(rows=3)
    block.counters(0).incr("stored_messages")
    block.counters(2).incr("stored_messages", 4)
    block.counters(1).incr("dumped_messages")
    assert block.total()["stored_messages"] == 5
    assert block.total()["dumped_messages"] == 1
    assert block.row(2)["stored_messages"] == 4
    with pytest.raises(KeyError):
        block.counters(0).incr("no_such_counter")
    block.close()


def _child(name: str, row: int) -> None:
    block = StatsBlock(rows=2, name=name)
    block.counters(row).incr("stored_messages", 10 + row)
    block.close()


def test_children_write_their_rows_in_shared_memory() -> None:
    block = StatsBlock(rows=2, shared=True)
    assert block.name is not None
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(block.name, row)) for row in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert block.total()["stored_messages"] == 21
    block.close()


def test_prometheus_names_end_in_total() -> None:
    text = prometheus_text({"stored_messages": 7}, {"leader": 1.0}).decode()
    assert "msilo_stored_messages_total 7.0" in text
    assert "msilo_leader 1.0" in text


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_endpoint_serves_health_stats_and_metrics() -> None:
    block = StatsBlock()
    block.counters().incr("stored_messages", 3)
    healthy = {"ok": True}
    views = ManagementViews(
        health=lambda: (healthy["ok"], {"status": "ok" if healthy["ok"] else "down"}),
        stats=block.total,
        metrics=lambda: prometheus_text(block.total()),
    )
    server = await start_management_http(views, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, body = await _get(port, "/stats")
        assert status == 200 and orjson.loads(body)["stored_messages"] == 3
        status, body = await _get(port, "/metrics")
        assert status == 200 and b"msilo_stored_messages_total 3.0" in body
        assert (await _get(port, "/health"))[0] == 200
        healthy["ok"] = False
        assert (await _get(port, "/health"))[0] == 503
        assert (await _get(port, "/nope"))[0] == 404
        assert (await _get(port, "/stats", "POST"))[0] == 405
    finally:
        server.close()
        await server.wait_closed()
        block.close()
