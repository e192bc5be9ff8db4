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
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msilo.errors import MsiloError
from msilo.leader.election import leader_election_for
from msilo.log import redact_url
from msilo.server.http import ManagementViews, start_management_http
from msilo.server.stats import LabelledGauge, prometheus_text

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
    gauges: dict[str, int] = field(default_factory=dict)

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
        histograms: Callable[[], list[int]] | None = None,
        serving: Callable[[], bool],
        wanted_workers: Callable[[], int] = lambda: 1,
        expire_time: Callable[[], int] | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.db_url = db_url
        self._totals = totals
        self._children = children
        self._histograms = histograms
        self._serving = serving
        self._wanted_workers = wanted_workers
        self._expire_time = expire_time
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
        """``/metrics``: counters and histograms summed over every process, and gauges."""
        children = self._children()
        workers = [c for c in children if c.role == "worker" and c.state != "stopping"]
        gauges: dict[str, float] = {
            "workers_ready": float(sum(1 for c in workers if c.state == "ready")),
            "leader_here": float(any(c.role == "leader" and c.is_leader for c in children)),
            "database_up": float(bool(self.leader.database_ok)),
        }
        helps = {
            "workers_ready": "workers ready to take SIP traffic on this host",
            "leader_here": "1 when this host's leader process holds the deployment lock",
            "database_up": "1 when the database answered the supervisor's last check",
        }
        if self._expire_time is not None:
            # Exported so an alert can compare the oldest message with it (contrib/prometheus).
            gauges["expire_time_seconds"] = float(self._expire_time())
            helps["expire_time_seconds"] = "msilo.expire_time: a stored message's lifetime"
        # The silo table's size and age come from the leader that holds the lock (one per
        # deployment): only the host it runs on exports them, so max() across hosts works.
        summary = next(
            (
                c.gauges
                for c in children
                if c.role == "leader" and c.is_leader and c.gauges.get("summary_at", 0) > 0
            ),
            None,
        )
        if summary is not None:
            gauges["silo_rows"] = float(summary["silo_rows"])
            helps["silo_rows"] = "messages stored in the silo table (counted by the leader)"
            oldest = summary["oldest_inc_time"]
            gauges["oldest_message_age_seconds"] = (
                max(0.0, time.time() - oldest) if oldest > 0 else 0.0
            )
            helps["oldest_message_age_seconds"] = (
                "age of the oldest stored message (0: none stored); read by the leader"
            )
        labelled = {
            "queue_depth": LabelledGauge(
                "MESSAGEs waiting in a worker's batch-writer queue",
                ("worker",),
                [((str(c.index),), float(c.gauges.get("queue_depth", 0))) for c in workers],
            ),
            "queue_capacity": LabelledGauge(
                "size of a worker's batch-writer queue (full: 503 + Retry-After)",
                ("worker",),
                [((str(c.index),), float(c.gauges.get("queue_capacity", 0))) for c in workers],
            ),
        }
        return prometheus_text(
            self._totals(),
            gauges,
            histograms=self._histograms() if self._histograms is not None else None,
            labelled=labelled,
            gauge_help=helps,
        )

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
                "url": redact_url(self.db_url),
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
                ok, error = True, None
                if self.db_url.startswith("sqlite:///"):
                    path = self.db_url[len("sqlite:///") :]
                    error = await asyncio.to_thread(_sqlite_fails, path)
                    ok = error is None
                self.leader = DeploymentLeader(holder, ok, error, time.time())
            await asyncio.sleep(LEADER_REFRESH)


def _sqlite_fails(path: str) -> str | None:
    """Why the SQLite database does not answer a read, or None when it does.

    Read-only and ``mode=ro``: a readiness probe never creates or locks the database.
    """
    if not os.path.exists(path):
        return "not answering"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
