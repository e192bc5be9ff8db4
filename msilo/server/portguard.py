"""The port guard: one deployment per SIP address.

Workers bind with SO_REUSEPORT, so a second ``msilo serve`` (another database, another
``server.http``) on the same address would join the first one's group and take part of
its traffic.  Before spawning anything the supervisor checks every listener:

* a probe bound without SO_REUSEPORT (``sockets.check_unused``) fails when anybody
  already serves the address;
* an exclusive ``flock`` on a per-address lock file, held by the supervisor for its whole
  life, closes the race between two servers starting at once (the probe passes for both
  until the first worker binds).  The lock is per user and per network namespace (only
  processes of one user can share a SO_REUSEPORT group, and a namespace has its own
  ports); the kernel drops it when the supervisor dies.

A rolling restart (SIGHUP) is the same supervisor: it keeps its locks, checks only the
addresses a reloaded configuration adds, and lets go of those it no longer serves once
the new generation is ready.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterable

from msilo.errors import ConfigError
from msilo.transport.sockets import check_unused


def _namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:  # pragma: no cover - not Linux
        return "host"


def lock_dir() -> str:
    """Where the lock files live: the user's runtime directory, else the temp directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"msilo-{os.getuid()}")


class PortGuard:
    """Holds the SIP addresses this supervisor serves (see the module docstring)."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or lock_dir()
        self._held: dict[str, int] = {}  # listener ("udp:HOST:PORT") -> locked fd

    def claim(self, listeners: Iterable[str]) -> None:
        """Take every listener not held yet; ConfigError naming the first one in use.

        All or nothing: on error, what this call took is released again.
        """
        taken: list[str] = []
        try:
            for item in listeners:
                if item in self._held:
                    continue
                self._claim_one(item)
                taken.append(item)
        except ConfigError:
            self.release(taken)
            raise

    def keep_only(self, listeners: Iterable[str]) -> None:
        """Release every held listener not in ``listeners``."""
        wanted = set(listeners)
        self.release([item for item in self._held if item not in wanted])

    def release(self, listeners: Iterable[str] | None = None) -> None:
        """Let go of ``listeners`` (default: all)."""
        for item in list(self._held if listeners is None else listeners):
            fd = self._held.pop(item, None)
            if fd is not None:
                os.close(fd)  # closing drops the flock

    def _claim_one(self, item: str) -> None:
        transport, rest = item.split(":", 1)
        host, _, port = rest.rpartition(":")
        in_use = ConfigError(
            f"server.listen: {item} is already served by another process (another msilo"
            " deployment would share it with SO_REUSEPORT and take part of its traffic);"
            " stop it or choose another address"
        )
        fd = self._lock(transport, host.strip("[]"), port)
        if fd is None:
            raise in_use
        try:
            check_unused(transport, host, int(port))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EADDRINUSE:
                raise in_use from None
            raise ConfigError(
                f"server.listen: cannot bind {item} ({exc.strerror or exc})"
            ) from None
        self._held[item] = fd

    def _lock(self, transport: str, host: str, port: str) -> int | None:
        """The locked fd; None when another process holds the lock.  Where no lock file
        can be made (a read-only runtime directory) a placeholder fd is returned and the
        probe alone decides."""
        # TLS listens on TCP: they collide on the same port, so they share one lock.
        proto = "udp" if transport == "udp" else "tcp"
        name = f"{_namespace()}-{proto}-{host.replace(':', '_')}-{port}.lock"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return os.open(os.devnull, os.O_RDONLY)  # no lock possible: rely on the probe
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
