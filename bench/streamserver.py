"""What the many-connection benchmarks share: msilo with one stream listener (``ws:``,
``tcp:``, ``tls:``) beside UDP, the memory and CPU of its processes from /proc, and the
open-file limit they all need raised.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e.procs import BenchError, Proc, free_port, wait_for_sip
from bench.e2e.servers import HOST, MsiloServer


class StreamMsilo(MsiloServer):
    """``msilo serve`` (registrar mode, PostgreSQL) with a UDP and a ``scheme:`` listener."""

    name = "msilo"
    scheme = "tcp"  # the stream listener's kind: tcp, tls, ws or wss

    def __init__(
        self, admin_dsn: str, database: str, workdir: Path, workers: int, extra: list[str]
    ) -> None:
        super().__init__(admin_dsn, database, workdir, workers)
        self.stream_port = 0
        self.extra = extra  # more --set KEY=VALUE settings

    def settings(self) -> list[str]:
        sets = super().settings()
        stream = f"{self.scheme}:{HOST}:{self.stream_port}"
        listen = f'server.listen=["udp:{HOST}:{self.port}", "{stream}"]'
        sets[sets.index(f'server.listen=["udp:{HOST}:{self.port}"]')] = listen
        return [*sets, *(arg for item in self.extra for arg in ("--set", item))]

    def start(self) -> None:
        # Three ports free now and distinct (free_port alone may hand out one twice).
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.port, self.http_port, self.stream_port = sorted(ports)
        argv = [*self._msilo(), "serve", *self.settings()]
        self.info["command"] = " ".join(argv)
        self.proc = Proc(
            "msilo", argv, self.workdir / "msilo.log", cwd=self.workdir, env=self._env()
        )
        wait_for_sip(self.proc, HOST, self.port, timeout=60)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/health", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def worker_pids(self) -> list[int]:
        """The pids of the ready workers (they hold the connections)."""
        return [w["pid"] for w in self.health()["workers"] if w["state"] == "ready"]

    def all_pids(self) -> list[int]:
        """The supervisor and every process under it (workers, leader)."""
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def workers_cpu_seconds(self) -> float:
        """CPU time all the workers have used, seconds."""
        return sum(cpu_seconds(pid) for pid in self.worker_pids())

    def workers_rss_kib(self) -> int:
        """Resident memory of all the workers together, KiB."""
        return sum(rss_kib(pid) for pid in self.worker_pids())

    def total_rss_kib(self) -> dict[int, int]:
        """Resident memory of the supervisor and each process under it, KiB, by pid."""
        return {pid: rss_kib(pid) for pid in self.all_pids()}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's children lists), children first."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 1000:  # bounded: msilo starts a handful
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:
            continue
        out.extend(kids)
        todo.extend(kids)
    return out


def connections_per_pid(port: int) -> dict[int, int]:
    """Established TCP connections on local ``port``, by the pid holding them (from ``ss``):
    how the kernel's SO_REUSEPORT hash spread the clients over the workers."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out.stdout):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used, seconds (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from /proc; 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_nofile(needed: int) -> int:
    """Raise this process's open-file limit (inherited by the msilo it starts) to at least
    ``needed``; returns the new soft limit.

    The hard limit is raised too when this process may (root, or CAP_SYS_RESOURCE: up to
    ``fs.nr_open``); otherwise a hard limit below ``needed`` is an error that says so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            raise BenchError(
                f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn)"
            ) from None
        return needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed
