"""Liveness and readiness on a real ``msilo serve``: ``/health`` is 200 only when every
worker is ready and the database answers; ``/health/live`` whenever the supervisor runs.
(The database outage itself is in tests/faults/test_ops_outage.py.)"""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.server.conftest import Instance, wait_for


def _get(instance: Instance, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{instance.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())
    except OSError:
        return 0, {}


async def test_ready_only_with_every_worker_and_live_throughout(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=2")
    health = await srv.wait_ready(2)
    code, body = _get(srv, "/health")
    assert (code, body["status"], body["reasons"]) == (200, "ok", [])
    assert health["reasons"] == []
    live = _get(srv, "/health/live")
    assert live[0] == 200 and live[1]["status"] == "alive" and live[1]["pid"] == srv.pid
    # A worker dies: not every worker is ready until its replacement is, and readiness
    # says so (the supervisor restarts it within a second).
    victim = health["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    _, body = await wait_for(
        lambda: _get(srv, "/health"),
        lambda r: r[0] == 503,
        10, "readiness 503 without a worker", srv, interval=0.02,
    )  # fmt: skip
    assert body["status"] == "unavailable" and body["reasons"] == ["workers: 1 of 2 ready"]
    assert _get(srv, "/health/live")[0] == 200
    await srv.wait_ready(2)
    assert _get(srv, "/health")[0] == 200


async def test_a_missing_database_is_not_ready(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=1")
    await srv.wait_ready(1)
    (tmp_path / "m.db").rename(tmp_path / "moved.db")
    _, body = await wait_for(
        lambda: _get(srv, "/health"), lambda r: r[0] == 503, 10, "readiness 503", srv
    )
    assert body["reasons"] == ["database: not answering"], body
    assert _get(srv, "/health/live")[0] == 200
    (tmp_path / "moved.db").rename(tmp_path / "m.db")
    await wait_for(lambda: _get(srv, "/health"), lambda r: r[0] == 200, 10, "ready again", srv)


async def test_a_file_that_is_not_a_database_is_not_ready(
    serve: Callable[..., Instance], tmp_path: Path
) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=1")
    await srv.wait_ready(1)
    (tmp_path / "m.db").rename(tmp_path / "kept.db")
    (tmp_path / "m.db").write_bytes(b"this is not an SQLite database" * 100)
    _, body = await wait_for(
        lambda: _get(srv, "/health"), lambda r: r[0] == 503, 10, "readiness 503", srv
    )
    assert body["reasons"] == ["database: DatabaseError: file is not a database"], body
    assert _get(srv, "/health/live")[0] == 200
