"""The supervisor: ``server.workers`` SIP workers plus one leader process, kept alive.

gunicorn's arbiter semantics at uvicorn's size.  Children are started with the
multiprocessing *spawn* method and create their own sockets (``SO_REUSEPORT``),
database pools and event loops; the supervisor holds none of those.  Its main
loop is synchronous:

    wait (signals, child exits, child messages; ≤ 0.5 s)
      → dispatch queued signals to ``handle_<name>``
      → read child messages, reap exited children
      → kill children whose heartbeat is stale → retire an old generation
      → spawn what is missing (with back-off after a crash)

Signal handlers only enqueue.  SIGTERM/SIGINT: graceful stop within
``server.grace_period`` (children stop reading, drain, flush; SIGKILL for what is
left at the deadline); a second SIGINT or a SIGQUIT: fast exit.  SIGHUP: rolling
restart with the re-read configuration — a new generation binds next to the old
one and the old one is told to stop only when every new child reported ready.
A child that exits with :data:`~msilo.server.child.EXIT_BOOT_ERROR` while its
generation is starting stops the server (or, during a reload, aborts the reload).

Statistics: one shared block with a row per child slot; when a child is reaped
its row is folded into a retired total before the slot is reused, so totals
never go backwards.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_handles
from multiprocessing.process import BaseProcess
from typing import Any

from msilo.config import Config
from msilo.errors import ConfigError, DatabaseUnavailable, MsiloError
from msilo.server.child import (
    BOOT_CONFIG,
    BOOT_DATABASE,
    BOOT_RUNTIME,
    EXIT_BOOT_ERROR,
    LEADER,
    WORKER,
    ChildSpec,
    child_main,
)
from msilo.server.heartbeat import Heartbeats
from msilo.server.portguard import PortGuard
from msilo.server.stats import NAMES, StatsBlock
from msilo.server.status import ChildView, StatusEndpoint
from msilo.storage.base import Store

log = logging.getLogger("msilo.supervisor")

MAX_WORKERS = 256  # server.workers' upper bound in config.py
# A rolling restart runs two generations side by side: room for both, leader included.
SLOTS = 2 * (MAX_WORKERS + 1)
TICK = 0.5
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a child up this long has its crash count forgotten
FAST_EXIT = 1.0

SIGNAMES: dict[int, str] = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGCHLD: "chld",
}

Key = tuple[str, int]


@dataclass(eq=False)
class Child:
    """One spawned process and what the supervisor knows about it."""

    role: str
    index: int
    slot: int
    generation: int
    process: BaseProcess
    conn: Connection
    spawned: float
    pid: int
    state: str = "booting"  # booting -> ready -> stopping
    conn_open: bool = True
    kill_at: float | None = None
    killed: bool = False
    stuck: bool = False
    boot_error: tuple[str, str] | None = None

    @property
    def key(self) -> Key:
        return self.role, self.index

    @property
    def title(self) -> str:
        return f"{self.role}{self.index}" if self.role == WORKER else self.role


class Supervisor:
    """Runs and supervises the children until a signal stops it; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        store_factory: Callable[[Config], Store],
        reload: Callable[[], Config] | None = None,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self.config = config
        self.store_factory = store_factory
        self.reload = reload
        self.heartbeat_timeout = heartbeat_timeout
        self.ctx = multiprocessing.get_context("spawn")
        # Unique on the host even across PID namespaces sharing a network namespace; the
        # same for every generation, so an old child can still hand off to a new one.
        self.deployment = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.children: list[Child] = []
        self.generation = 1
        self._serving_generation = 0  # the last generation whose children all became ready
        self._previous_config: Config | None = None
        self._signals: deque[int] = deque()
        self._stopping = False
        self._fast = False
        self._deadline: float | None = None
        self._boot_error: tuple[str, str] | None = None
        self._restart_at: dict[Key, float] = {}
        self._crashes: dict[Key, int] = {}
        self._free_slots: list[int] = list(range(SLOTS))
        # The HTTP thread reads children and counters while this thread changes them.
        self._lock = threading.Lock()
        self._retired: dict[str, int] = dict.fromkeys(NAMES, 0)
        self._retired_histograms: list[int] | None = None
        self.stats: StatsBlock | None = None
        self.beats: Heartbeats | None = None
        self.http: StatusEndpoint | None = None
        self.guard = PortGuard()

    # -- the main loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped; 0 after a clean stop.

        Raises ConfigError / DatabaseUnavailable / MsiloError (one line, as the CLI
        prints it) when a child could not boot.
        """
        self.stats = StatsBlock(SLOTS, shared=True)
        self.beats = Heartbeats(SLOTS)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = {sig: signal.getsignal(sig) for sig in SIGNAMES}
        previous_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            for sig in SIGNAMES:
                signal.signal(sig, self._enqueue)
            # Before anything binds: one deployment per SIP address (server/portguard.py).
            self.guard.claim(self.config.server.listen)
            self._start_http()
            log.info(
                "event=starting pid=%d workers=%d grace_period=%s",
                os.getpid(),
                self.config.server.worker_count,
                self.config.server.grace_period,
            )
            self._manage()
            while self.children or not self._stopping:
                self._wait(wake_r)
                self._dispatch_signals()
                self._poll_children()
                self._enforce_deadlines()
                if self._stopping:
                    continue
                self._check_heartbeats()
                self._retire_old_generation()
                self._manage()
        finally:
            self._kill_all()
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            if self.http is not None:
                self.http.stop()
            self.guard.release()
            self.stats.close()
            self.beats.close()
        if self._boot_error is not None:
            kind, message = self._boot_error
            if kind == BOOT_CONFIG:
                raise ConfigError(message)
            if kind == BOOT_DATABASE:
                raise DatabaseUnavailable(message)
            raise MsiloError(message)
        log.info("event=stopped pid=%d", os.getpid())
        return 0

    def _enqueue(self, signum: int, frame: object) -> None:
        # Nothing else here: no logging, no locks (the main loop does the work).
        self._signals.append(signum)

    def _wait(self, wake_r: int) -> None:
        timeout = TICK
        deadlines = [c.kill_at for c in self.children if c.kill_at is not None]
        if self._stopping and self._deadline is not None:
            deadlines.append(self._deadline)
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
        handles: list[Any] = [wake_r]
        for child in self.children:
            handles.append(child.process.sentinel)
            if child.conn_open:
                handles.append(child.conn)
        if not self._signals:
            wait_for_handles(handles, timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 512):
                pass

    def _dispatch_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            name = SIGNAMES.get(signum)
            if name is not None:
                getattr(self, f"handle_{name}")()

    # -- signals -----------------------------------------------------------------------------

    def handle_term(self) -> None:
        """SIGTERM: graceful stop."""
        self._begin_stop("SIGTERM")

    def handle_int(self) -> None:
        """SIGINT: graceful stop; a second one: fast exit."""
        self._begin_stop("SIGINT", fast=self._stopping)

    def handle_quit(self) -> None:
        """SIGQUIT: fast exit."""
        self._begin_stop("SIGQUIT", fast=True)

    def handle_hup(self) -> None:
        """SIGHUP: rolling restart with the configuration read again."""
        if self._stopping:
            return
        try:
            config = self.reload() if self.reload is not None else self.config
            # The same supervisor keeps its addresses; only new ones are checked.
            self.guard.claim(config.server.listen)
        except MsiloError as exc:
            log.error("event=reload_failed error=%s action=keep_running", exc)
            return
        self._previous_config = self.config
        self.config = config
        self.generation += 1
        log.info(
            "event=reloading generation=%d workers=%d", self.generation, config.server.worker_count
        )

    def handle_chld(self) -> None:
        """SIGCHLD: reap now (the main loop also wakes on each child's exit)."""
        self._poll_children()

    # -- children ----------------------------------------------------------------------------

    def _wanted(self) -> list[Key]:
        workers = [(WORKER, i) for i in range(self.config.server.worker_count)]
        return [*workers, (LEADER, 0)]

    def _manage(self) -> None:
        """Spawn every wanted child of the current generation that is missing."""
        if self._stopping:
            return
        now = time.monotonic()
        live = {
            c.key
            for c in self.children
            if c.generation == self.generation and c.state != "stopping"
        }
        for key in self._wanted():
            if key not in live and now >= self._restart_at.get(key, 0.0):
                self._spawn(*key)

    def _spawn(self, role: str, index: int) -> None:
        assert self.stats is not None and self.beats is not None
        grace = self.config.server.grace_period
        slot = self._free_slots.pop(0)
        self.beats.reset(slot)
        spec = ChildSpec(
            role=role,
            index=index,
            slot=slot,
            generation=self.generation,
            config=self.config,
            store_factory=self.store_factory,
            stats_name=self.stats.name or "",
            stats_rows=SLOTS,
            beats_name=self.beats.name,
            beats_slots=SLOTS,
            parent_pid=os.getpid(),
            deployment=self.deployment,
            drain_seconds=_drain_seconds(grace),
            heartbeat_interval=HEARTBEAT_INTERVAL,
        )
        receiver, sender = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=child_main, args=(spec, sender), name=f"msilo-{spec.title}"
        )
        process.start()
        sender.close()
        assert process.pid is not None
        child = Child(
            role, index, slot, self.generation, process, receiver, time.monotonic(), process.pid
        )
        with self._lock:
            self.children.append(child)
        log.info(
            "event=spawned role=%s pid=%s slot=%d generation=%d",
            child.title,
            child.pid,
            slot,
            child.generation,
        )

    def _poll_children(self) -> None:
        for child in list(self.children):
            self._read(child)
            if child.process.exitcode is not None:
                self._read(child)
                self._exited(child)

    def _read(self, child: Child) -> None:
        while child.conn_open:
            try:
                if not child.conn.poll():
                    return
                message = child.conn.recv()
            except (EOFError, OSError):
                child.conn_open = False
                return
            if message[0] == "ready":
                if child.state == "booting":
                    child.state = "ready"
                log.info("event=child_ready role=%s pid=%s", child.title, child.pid)
            elif message[0] == "boot_error":
                child.boot_error = (message[1], message[2])

    def _exited(self, child: Child) -> None:
        code = child.process.exitcode
        assert code is not None
        self._release(child)
        how = f"exit={code}" if code >= 0 else f"signal={signal.Signals(-code).name}"
        if child.boot_error is not None or code == EXIT_BOOT_ERROR:
            kind, message = child.boot_error or (BOOT_RUNTIME, f"{child.title} failed to boot")
            if self._stopping or child.state == "stopping":
                return
            if child.generation > self._serving_generation:
                if self._serving_generation and child.generation == self.generation:
                    self._abort_reload(message)
                    return
                if not self._serving_generation:
                    log.error(
                        "event=boot_failed role=%s pid=%s %s action=stop_server",
                        child.title,
                        child.pid,
                        how,
                    )
                    self._boot_error = (kind, message)
                    self._begin_stop("boot_error")
                    return
        if self._stopping or child.state == "stopping":
            log.info("event=child_exited role=%s pid=%s %s", child.title, child.pid, how)
            return
        # A crash (or a stuck child we killed): replace it, backing off if it keeps dying.
        now = time.monotonic()
        count = 1 if now - child.spawned > STABLE_AFTER else self._crashes.get(child.key, 0) + 1
        self._crashes[child.key] = count
        delay = min(BACKOFF_FIRST * 2 ** (count - 1), BACKOFF_MAX)
        self._restart_at[child.key] = now + delay
        reason = "stuck" if child.stuck else "crashed"
        if child.boot_error is not None:
            reason = f"boot_failed error={child.boot_error[1]!r}"
        log.warning(
            "event=child_died role=%s pid=%s %s reason=%s restart_in=%.1f",
            child.title,
            child.pid,
            how,
            reason,
            delay,
        )

    def _release(self, child: Child) -> None:
        """Forget an exited child: fold its counters into the retired total, free its slot."""
        assert self.stats is not None
        with self._lock:
            for name, value in self.stats.row(child.slot).items():
                self._retired[name] += value
            cells = self.stats.histogram_cells(child.slot)
            if self._retired_histograms is None:
                self._retired_histograms = [0] * len(cells)
            for i, value in enumerate(cells):
                self._retired_histograms[i] += value
            self.stats.reset_row(child.slot)
            self.children.remove(child)
        self._free_slots.append(child.slot)
        child.conn.close()
        child.process.close()

    def _check_heartbeats(self) -> None:
        assert self.beats is not None
        for child in self.children:
            if child.state == "stopping" or child.stuck:
                continue
            age = self.beats.age(child.slot)
            if age > self.heartbeat_timeout:
                # A stuck loop cannot drain: SIGKILL, and the reaper replaces it.
                child.stuck = True
                log.warning(
                    "event=child_stuck role=%s pid=%s heartbeat_age=%.1f action=kill",
                    child.title,
                    child.pid,
                    age,
                )
                self._signal(child, signal.SIGKILL)

    def _retire_old_generation(self) -> None:
        """Once every wanted child of the newest generation is ready, stop the older ones."""
        ready = {
            c.key for c in self.children if c.generation == self.generation and c.state == "ready"
        }
        if not all(key in ready for key in self._wanted()):
            return
        if self._serving_generation != self.generation:
            self._serving_generation = self.generation
            self.guard.keep_only(self.config.server.listen)
            log.info(
                "event=ready generation=%d workers=%d pids=%s",
                self.generation,
                len(ready) - 1,
                ",".join(str(c.pid) for c in self.children if c.generation == self.generation),
            )
        old = [c for c in self.children if c.generation < self.generation and c.state != "stopping"]
        for child in old:
            self._stop_child(child, signal.SIGTERM)

    def _abort_reload(self, message: str) -> None:
        log.error(
            "event=reload_failed generation=%d error=%s action=keep_previous",
            self.generation,
            message,
        )
        for child in self.children:
            if child.generation == self.generation and child.state != "stopping":
                self._stop_child(child, signal.SIGTERM)
        if self._previous_config is not None:
            self.config = self._previous_config
            self.guard.keep_only(self.config.server.listen)
        # The survivors carry on as the current generation.
        self.generation += 1
        self._serving_generation = self.generation
        for child in self.children:
            if child.state != "stopping":
                child.generation = self.generation

    # -- stopping ----------------------------------------------------------------------------

    def _begin_stop(self, reason: str, *, fast: bool = False) -> None:
        now = time.monotonic()
        if not self._stopping:
            self._stopping = True
            grace = self.config.server.grace_period
            # Leave room to reap and clean up, so the whole server is gone within grace.
            self._deadline = now + max(grace - 0.5, grace * 0.8)
            log.info("event=stopping reason=%s grace_period=%s", reason, grace)
            for child in self.children:
                self._stop_child(child, signal.SIGTERM)
        if fast and not self._fast:
            self._fast = True
            self._deadline = min(self._deadline or now, now + FAST_EXIT)
            log.info("event=stopping_fast reason=%s", reason)
            for child in self.children:
                self._signal(child, signal.SIGQUIT)

    def _stop_child(self, child: Child, sig: int) -> None:
        child.state = "stopping"
        child.kill_at = time.monotonic() + self.config.server.grace_period
        self._signal(child, sig)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for child in self.children:
            deadline = child.kill_at
            if self._stopping and self._deadline is not None:
                deadline = min(deadline or self._deadline, self._deadline)
            if deadline is not None and now >= deadline and not child.killed:
                child.killed = True
                log.warning(
                    "event=child_killed role=%s pid=%s reason=grace_expired", child.title, child.pid
                )
                self._signal(child, signal.SIGKILL)

    def _signal(self, child: Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _kill_all(self) -> None:
        """Last resort on the way out (also after an exception): no child outlives us."""
        for child in list(self.children):
            if child.process.exitcode is None:
                self._signal(child, signal.SIGKILL)
            child.process.join(5.0)
            with contextlib.suppress(ValueError):
                self._release(child)

    # -- management HTTP ---------------------------------------------------------------------

    def _start_http(self) -> None:
        address = self.config.server.http
        if not address:
            return
        self.http = StatusEndpoint(
            address,
            db_url=self.config.msilo.db_url,
            totals=self.totals,
            histograms=self.histograms,
            children=self.child_views,
            serving=lambda: not self._stopping,
            wanted_workers=lambda: self.config.server.worker_count,
            expire_time=lambda: self.config.msilo.expire_time,
        )
        try:
            self.http.start()
        except OSError as exc:
            self.http = None
            raise ConfigError(
                f"server.http: cannot bind {address} ({exc.strerror or exc})"
            ) from None

    def totals(self) -> dict[str, int]:
        """Every counter summed over live children and every child that ever exited."""
        assert self.stats is not None
        with self._lock:
            live = self.stats.total()
            return {name: live[name] + self._retired[name] for name in NAMES}

    def histograms(self) -> list[int]:
        """Every histogram cell summed over live children and every child that exited."""
        assert self.stats is not None
        with self._lock:
            live = self.stats.histogram_total()
            retired = self._retired_histograms or [0] * len(live)
            return [a + b for a, b in zip(live, retired, strict=True)]

    def child_views(self) -> list[ChildView]:
        """The children, for /stats and /health."""
        assert self.stats is not None and self.beats is not None
        with self._lock:
            return [
                ChildView(
                    role=c.role,
                    index=c.index,
                    slot=c.slot,
                    pid=c.pid,
                    state=c.state,
                    generation=c.generation,
                    heartbeat_age=self.beats.age(c.slot),
                    is_leader=self.beats.is_leader(c.slot),
                    counters=self.stats.row(c.slot),
                    gauges=self.stats.gauges(c.slot),
                )
                for c in self.children
            ]


def _drain_seconds(grace: float) -> float:
    """How long a child may wait for requests in flight: the grace less room to flush and exit."""
    return max(grace - 2.0, grace * 0.5)
