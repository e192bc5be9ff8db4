"""A private, throwaway PostgreSQL cluster that a test may stop, kill and restart.

The machine's shared PostgreSQL must never be touched by fault tests, so each test
module gets its own cluster: ``initdb`` into a temporary directory, trust auth,
listening on 127.0.0.1 on a free port (and a Unix socket inside that directory).
PostgreSQL refuses to run as root, so when we are root every binary runs as the
``postgres`` user through ``runuser``.

Start and stop exist twice: blocking (for fixture set-up and teardown) and async
(for tests, whose msilo worker shares the event loop and must keep serving while
the cluster goes down and comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.service.sipua import free_port

OS_USER = "postgres"
PREFIX = "msilo-pgfault-"
# Written into each cluster's directory: the pid of the test process that owns it.
OWNER_FILE = "owner.pid"
# pg_ctl's own wait limit (seconds) for start and stop; our subprocess timeouts are longer.
PG_CTL_WAIT = 30


class ClusterUnavailable(Exception):
    """The PostgreSQL binaries (or a way to run them) are missing on this machine."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: ``MSILO_PG_BINDIR``, then
    ``pg_config --bindir``, then the newest ``/usr/lib/postgresql/*/bin`` (Debian)."""
    candidates: list[str] = []
    if env := os.environ.get("MSILO_PG_BINDIR"):
        candidates.append(env)
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
    # Debian keeps server binaries off PATH; sort by major version, newest first.
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=lambda p: _major(p), reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    raise ClusterUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl): set MSILO_PG_BINDIR or install postgresql"
    )


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.name.split(".")[0])
    except ValueError:
        return 0


class PgCluster:
    """One private cluster: ``init()``, ``start()``/``stop()``, ``destroy()``."""

    def __init__(self, bindir: Path | None = None, *, adopt: Path | None = None) -> None:
        """A new cluster directory, or (``adopt``) an existing one to destroy."""
        self.bindir = bindir or find_bindir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            if shutil.which("runuser") is None:
                raise ClusterUnavailable("running as root but `runuser` is missing")
            try:
                self._owner = pwd.getpwnam(OS_USER)
            except KeyError:
                raise ClusterUnavailable(
                    f"running as root but there is no `{OS_USER}` user to run PostgreSQL as"
                ) from None
        if adopt is None:
            self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
            (self.base / OWNER_FILE).write_text(str(os.getpid()))
        else:
            self.base = adopt
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.running = False

    # -- plumbing ---------------------------------------------------------------------

    def _argv(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bindir / tool), *args]
        return ["runuser", "-u", OS_USER, "--", *argv] if self._as_root else argv

    def _ctl(self, *args: str) -> list[str]:
        return self._argv("pg_ctl", "-D", str(self.data), "-l", str(self.log), *args)

    def _start_argv(self) -> list[str]:
        return self._ctl("-w", "-t", str(PG_CTL_WAIT), "start")

    def _stop_argv(self, mode: str) -> list[str]:
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        return self._ctl("-w", "-t", str(PG_CTL_WAIT), "-m", mode, "stop")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no server log>"

    def _output(self) -> Path:
        # pg_ctl's output goes to a file, never to a pipe: the postmaster it starts would
        # inherit the pipe and hold it open, so reading to EOF would wait for ever.
        return self.base / "pg_ctl.out"

    def _check(self, argv: list[str], returncode: int) -> None:
        if returncode != 0:
            output = self._output().read_text(errors="replace")
            raise RuntimeError(
                f"{' '.join(argv)} exited {returncode}:\n{output}\nserver log:\n{self.log_tail()}"
            )

    def _run(self, argv: list[str], timeout: float = PG_CTL_WAIT + 15) -> None:
        with self._output().open("wb") as out:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
        self._check(argv, result.returncode)

    # -- blocking (fixtures) ----------------------------------------------------------

    def init(self) -> None:
        """initdb with trust auth and a configuration for 127.0.0.1:port only."""
        if self._as_root:
            # The postgres user must own the whole tree (data, socket, log).
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        self.base.chmod(0o700)
        self._run(
            self._argv(
                "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--no-sync", "--no-instructions",
            ),
            timeout=120,
        )  # fmt: skip
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "50",
            "shared_buffers": "'32MB'",
            # Keep durability real (fsync stays on): "acknowledged means committed" is
            # exactly what these tests check across an immediate shutdown.
            "logging_collector": "off",
        }
        self.configure(settings)

    def configure(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (a later line wins over an earlier one)."""
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# msilo fault tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def init_standby(self, primary: PgCluster) -> None:
        """Make this cluster a streaming-replication standby of ``primary`` (running).

        ``pg_basebackup -R`` copies the primary's data directory and configuration and
        writes ``standby.signal`` and ``primary_conninfo``; our own port and socket
        directory are appended.  ``synchronous_standby_names`` is cleared here: set on
        the primary only, it must not follow this copy, or once promoted it would wait
        for a standby of its own that does not exist (every commit would hang).
        """
        if self._as_root:
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        self.base.chmod(0o700)
        self._run(
            self._argv(
                "pg_basebackup", "-D", str(self.data), "-h", primary.host,
                "-p", str(primary.port), "-U", "postgres", "-X", "stream", "-R",
                "--no-sync", "-c", "fast",
            ),
            timeout=120,
        )  # fmt: skip
        self.configure(
            {
                "port": str(self.port),
                "unix_socket_directories": f"'{self.base}'",
                "synchronous_standby_names": "''",
            }
        )

    def start_blocking(self) -> None:
        self._run(self._start_argv())
        self.running = True

    def stop_blocking(self, mode: str = "fast") -> None:
        self._run(self._stop_argv(mode))
        self.running = False

    def destroy(self) -> None:
        """Stop whatever runs (however it was left) and remove the directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    self._run(self._stop_argv("immediate"), timeout=20)
                self._kill_leftover()
        finally:
            self.running = False
            shutil.rmtree(self.base, ignore_errors=True)

    @classmethod
    def reap_orphans(cls, bindir: Path | None = None) -> list[Path]:
        """Stop and remove clusters whose test process died without cleaning up
        (SIGKILLed by a CI time limit, say); returns their directories."""
        reaped: list[Path] = []
        for base in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
            try:
                owner = int((base / OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue  # not one of ours, or still being created
            if _alive(owner):
                continue
            cls(bindir, adopt=base).destroy()
            reaped.append(base)
        return reaped

    def _kill_leftover(self) -> None:
        """SIGKILL the postmaster if pg_ctl could not stop it (its children follow)."""
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises once it is gone
                time.sleep(0.05)

    # -- async (tests) ----------------------------------------------------------------

    async def _arun(self, argv: list[str], timeout: float = PG_CTL_WAIT + 15) -> None:
        with self._output().open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        try:
            returncode = await asyncio.wait_for(process.wait(), timeout)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        self._check(argv, returncode)

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        await self._arun(self._start_argv())
        self.running = True

    async def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back and disconnect; ``immediate``: crash-like,
        recovery from WAL at the next start) and wait until it is gone."""
        await self._arun(self._stop_argv(mode))
        self.running = False

    async def promote(self) -> None:
        """Promote a standby to primary and wait until it accepts writes."""
        await self._arun(self._ctl("-w", "-t", str(PG_CTL_WAIT), "promote"))

    def dsn(self, database: str = "postgres") -> str:
        return f"postgres://postgres@{self.host}:{self.port}/{database}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
