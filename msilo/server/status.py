"""What the supervisor shows on the management HTTP endpoint, served from one thread.

The supervisor's main loop is synchronous (it waits on signals and child
processes), so the endpoint runs its own small event loop in a daemon thread.
The views only read: counters from the shared statistics block, child states from
a snapshot the supervisor publishes, and the deployment's leader, which a task
on that loop asks the database (or lock file) every few seconds so that a
``GET /health`` never waits for a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msilo.errors import MsiloError
from msilo.leader.election import leader_election_for
from msilo.server.http import ManagementViews, start_management_http
from msilo.server.stats import prometheus_text

log = logging.getLogger("msilo.supervisor")

LEADER_REFRESH = 2.0
# The database check runs every LEADER_REFRESH s with a 3x timeout: older than this, it hangs.
DB_STALE_AFTER = LEADER_REFRESH * 5


@dataclass(frozen=True)
class ChildView:
    """One child as ``/stats`` and ``/health`` show it."""

    role: str
    index: int
    slot: int
    pid: int | None
    state: str
    generation: int
    heartbeat_age: float
    is_leader: bool
    counters: dict[str, int] = field(default_factory=dict)

    def public(self, *, counters: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "index": self.index,
            "pid": self.pid,
            "state": self.state,
            "generation": self.generation,
            "heartbeat_age": round(self.heartbeat_age, 3),
        }
        if self.role == "leader":
            out["is_leader"] = self.is_leader
        if counters:
            out["counters"] = self.counters
        return out


@dataclass
class DeploymentLeader:
    """The last answer about who holds the leader lock, and whether the database answered."""

    holder: dict[str, Any] | None = None
    database_ok: bool | None = None
    error: str | None = None
    checked_at: float | None = None


class StatusEndpoint:
    """``/health``, ``/stats`` and ``/metrics`` for the whole server, in a daemon thread."""

    def __init__(
        self,
        address: str,
        *,
        db_url: str,
        totals: Callable[[], dict[str, int]],
        children: Callable[[], list[ChildView]],
        serving: Callable[[], bool],
        wanted_workers: Callable[[], int] = lambda: 1,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.db_url = db_url
        self._totals = totals
        self._children = children
        self._serving = serving
        self._wanted_workers = wanted_workers
        self.leader = DeploymentLeader()
        self.started_at = time.time()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None

    # -- views ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals over every process that ever ran, plus each live child's own counters."""
        result: dict[str, Any] = dict(self._totals())
        result["workers"] = [c.public(counters=True) for c in self._children()]
        return result

    def metrics(self) -> bytes:
        children = self._children()
        gauges = {
            "workers_ready": float(
                sum(1 for c in children if c.role == "worker" and c.state == "ready")
            ),
            "leader_here": float(any(c.role == "leader" and c.is_leader for c in children)),
        }
        return prometheus_text(self._totals(), gauges)

    def live(self) -> dict[str, Any]:
        """Liveness: the supervisor runs and its endpoint answers (restart it if not)."""
        return {"status": "alive", "pid": os.getpid(), "uptime": int(time.time() - self.started_at)}

    def readiness(self) -> tuple[str, list[str]]:
        """("ok" | "starting" | "stopping" | "unavailable", reasons): ready means every
        wanted worker is ready and the database answered the last check (recently)."""
        if not self._serving():
            return "stopping", ["server is stopping"]
        reasons: list[str] = []
        wanted = self._wanted_workers()
        ready = sum(1 for c in self._children() if c.role == "worker" and c.state == "ready")
        if ready < wanted:
            reasons.append(f"workers: {ready} of {wanted} ready")
        lead = self.leader
        fresh = lead.checked_at is not None and time.time() - lead.checked_at <= DB_STALE_AFTER
        if lead.database_ok is None:
            reasons.append("database: not checked yet")
        elif not lead.database_ok:
            reasons.append(f"database: {lead.error or 'not answering'}")
        elif not fresh:
            reasons.append("database: no answer for a while")
        if not reasons:
            return "ok", []
        booting = lead.database_ok is None or (ready == 0 and lead.database_ok)
        return ("starting" if booting else "unavailable"), reasons

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Readiness (``/health``): 200 only when this host can take SIP traffic."""
        children = self._children()
        workers = [c for c in children if c.role == "worker"]
        status, reasons = self.readiness()
        local = next((c for c in children if c.role == "leader" and c.state != "stopping"), None)
        lead = self.leader
        return status == "ok", {
            "status": status,
            "reasons": reasons,
            "pid": os.getpid(),
            "uptime": int(time.time() - self.started_at),
            "workers": [c.public(counters=False) for c in workers],
            "leader": {
                "holder": lead.holder,
                "here": bool(local is not None and local.is_leader),
                "process": local.public(counters=False) if local is not None else None,
                "checked_at": lead.checked_at,
            },
            "database": {
                "url": _redact(self.db_url),
                "ok": lead.database_ok,
                "error": lead.error,
            },
        }

    # -- thread -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Bind and serve in a daemon thread; raise OSError here if the port cannot be bound."""
        self._thread = threading.Thread(target=self._run, name="msilo-http", daemon=True)
        self._thread.start()
        if not self._bound.wait(timeout):
            raise OSError(f"management HTTP did not start within {timeout} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop serving and join the thread (bounded)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() or logged once
            if not self._bound.is_set():
                self._error = exc
                self._bound.set()
            else:
                log.error("event=http_failed error=%s", exc)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        views = ManagementViews(
            health=self.health, stats=self.stats, metrics=self.metrics, live=self.live
        )
        server = await start_management_http(views, self.host, self.port)
        self._bound.set()
        log.info("event=http_listening address=%s:%d", self.host, self.port)
        refresher = asyncio.get_running_loop().create_task(self._refresh_leader())
        try:
            await self._stop.wait()
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            server.close()
            await server.wait_closed()

    async def _refresh_leader(self) -> None:
        election = leader_election_for(self.db_url)
        while True:
            try:
                holder = await asyncio.wait_for(election.current_leader(), LEADER_REFRESH * 3)
            except (MsiloError, OSError, TimeoutError) as exc:
                self.leader = DeploymentLeader(
                    None, False, str(exc) or type(exc).__name__, time.time()
                )
            else:
                ok = True
                if self.db_url.startswith("sqlite:///"):
                    ok = os.path.exists(self.db_url[len("sqlite:///") :])
                self.leader = DeploymentLeader(holder, ok, None, time.time())
            await asyncio.sleep(LEADER_REFRESH)


def _redact(url: str) -> str:
    # Never show a database password.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url
