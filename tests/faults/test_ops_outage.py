"""A PostgreSQL outage as an operator sees it: readiness turns 503 while liveness stays 200,
and the log keeps one line per event (no library traceback, no repeated library warning)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.pgcluster import PgCluster
from tests.server.conftest import Instance, serve, wait_for  # noqa: F401  (fixture)
from tests.service.sipua import UserAgent


def _status(instance: Instance, path: str) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    import orjson

    url = f"http://127.0.0.1:{instance.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


async def test_outage_makes_health_503_live_200_and_logs_no_library_noise(
    serve: Callable[..., Instance],  # noqa: F811
    fault_db: str,
    pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    srv = serve(fault_db, "server.workers=2", "server.mode=silo")
    await srv.wait_ready(2)
    assert _status(srv, "/health")[0] == 200
    await pg_cluster.stop("fast")
    try:
        _, body = await wait_for(
            lambda: _status(srv, "/health"), lambda r: r[0] == 503, 20, "readiness 503", srv
        )
        assert body["status"] == "unavailable"
        assert any(str(r).startswith("database: ") for r in body["reasons"]), body  # type: ignore[attr-defined]
        live = _status(srv, "/health/live")
        assert live[0] == 200 and live[1]["status"] == "alive"
        # Traffic during the outage: 503s, and the pools keep trying to reconnect.
        ua = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
        try:
            for i in range(10):
                reply = await ua.message("sip:bob@127.0.0.1", f"during outage {i}")
                assert reply.status == 503
                await asyncio.sleep(0.8)
        finally:
            ua.close()
    finally:
        await pg_cluster.start()
    await wait_for(lambda: _status(srv, "/health"), lambda r: r[0] == 200, 30, "ready again", srv)
    log = srv.log()
    assert "Traceback" not in log
    library = [line for line in log.splitlines() if "event=library" in line]
    # A library message is logged once per process per database state, not on every retry.
    per_process = Counter(
        (re.search(r"pid=(\d+)", line).group(1), line.split("message=", 1)[1])  # type: ignore[union-attr]
        for line in library
    )
    assert all(n == 1 for n in per_process.values()), per_process
    for line in log.splitlines():
        assert re.match(r"\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ pid=\d+ proc=", line), (
            line
        )
    print(f"{len(library)} library lines: {library[:3]}")
