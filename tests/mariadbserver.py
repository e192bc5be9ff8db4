"""A private, throwaway MariaDB server for the tests (Debian's ``mariadb-server``).

``mariadb-install-db`` into a temporary directory, then ``mariadbd`` on 127.0.0.1 on a free
port with its socket inside that directory, no grant tables (any user may connect, as the
PostgreSQL cluster's trust auth), and real durability (``innodb_flush_log_at_trx_commit``
stays 1: "acknowledged means committed" is what the store tests check).  The machine's own
server on 3306, if any, is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.service.sipua import free_port

# OpenSIPS's MySQL layout (its scripts' silo table: INT UNSIGNED id, CHAR columns, a 64 KiB
# BLOB, index account_idx), in the server's default character set.
OPENSIPS_MYSQL = """
CREATE TABLE IF NOT EXISTS version (
    table_name CHAR(32) NOT NULL,
    table_version INT UNSIGNED DEFAULT 0 NOT NULL,
    CONSTRAINT t_name_idx UNIQUE (table_name)
) ENGINE=InnoDB;
INSERT INTO version (table_name, table_version) values ('{t}','6');
CREATE TABLE {t} (
    id INT(10) UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
    src_addr CHAR(255) DEFAULT '' NOT NULL,
    dst_addr CHAR(255) DEFAULT '' NOT NULL,
    username CHAR(64) DEFAULT '' NOT NULL,
    domain CHAR(64) DEFAULT '' NOT NULL,
    inc_time INT DEFAULT 0 NOT NULL,
    exp_time INT DEFAULT 0 NOT NULL,
    snd_time INT DEFAULT 0 NOT NULL,
    ctype CHAR(255) DEFAULT NULL,
    body BLOB DEFAULT NULL
) ENGINE=InnoDB DEFAULT CHARSET=latin1;
CREATE INDEX account_idx ON {t} (username, domain);
INSERT INTO {t} (src_addr, dst_addr, username, domain, inc_time, exp_time, snd_time, ctype, body)
VALUES ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', X'6f6c64206f6e65'),
       ('sip:bob@example.org', 'sip:alice@example.com', 'alice', 'example.com',
        {now}, {exp}, 0, 'text/plain', NULL);
"""

PREFIX = "msilo-mariadb-"
OWNER_FILE = "owner.pid"
START_WAIT = 60.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, however it dies
    (PR_SET_PDEATHSIG), so a SIGKILLed pytest leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ServerUnavailable(Exception):
    """The MariaDB binaries are missing on this machine."""


def _binary(*names: str) -> str:
    for name in names:
        for where in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if where and os.access(where, os.X_OK):
                return where
    raise ServerUnavailable(
        f"no {names[0]} on this machine: install mariadb-server (make test-deps does)"
    )


class MariaDBServer:
    """One private server: ``start()``, ``stop()``, ``destroy()``."""

    def __init__(self, *, settings: dict[str, str] | None = None, grants: bool = False) -> None:
        """``grants``: a server with its grant tables (users, passwords; ``root`` without a
        password over the socket), for tests of the README's CREATE USER steps."""
        self.mariadbd = _binary("mariadbd", "mysqld")
        self.install_db = _binary("mariadb-install-db", "mysql_install_db")
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.base / OWNER_FILE).write_text(str(os.getpid()))
        self.data = self.base / "data"
        self.socket = self.base / "mysqld.sock"
        self.log = self.base / "mariadb.err"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.settings = settings or {}
        self.grants = grants
        self._process: subprocess.Popen[bytes] | None = None
        self._root = os.geteuid() == 0
        self._served = False  # once it has accepted, its address is known and kept

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's error log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no server log>"

    def init(self) -> None:
        """Create the system tables in the data directory."""
        argv = [
            self.install_db, "--no-defaults", f"--datadir={self.data}",
            "--auth-root-authentication-method=normal", "--skip-test-db",
        ]  # fmt: skip
        if self._root:
            argv.append("--user=root")
        out = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {out.returncode}:\n"
                f"{out.stdout.decode(errors='replace')}{out.stderr.decode(errors='replace')}"
            )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        argv = [
            self.mariadbd, "--no-defaults", f"--datadir={self.data}",
            f"--port={self.port}", f"--bind-address={self.host}", f"--socket={self.socket}",
            f"--pid-file={self.base / 'mariadb.pid'}", f"--log-error={self.log}",
            *(() if self.grants else ("--skip-grant-tables",)),
            "--skip-log-bin", "--skip-name-resolve",
            "--innodb-buffer-pool-size=128M", "--max-connections=400",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            *(f"--{key}={value}" for key, value in self.settings.items()),
        ]  # fmt: skip
        if self._root:
            argv.append("--user=root")
        # Its output goes to the log file, never to a pipe nobody reads.
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if not self._served and "Address already in use" in self.log_tail():
                    # Taken between free_port() and the bind (an outgoing connection's
                    # ephemeral port): nobody holds this address yet, so take another.
                    self.port = free_port()
                    self.log.unlink(missing_ok=True)  # judge the next try by its own log
                    self.start()
                    return
                raise RuntimeError(
                    f"mariadbd exited {self._process.returncode}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1) as sock,
            ):
                if sock.recv(1):  # the server's greeting: it is accepting
                    self._served = True
                    return
            time.sleep(0.1)
        self.destroy()
        raise RuntimeError(f"mariadbd did not accept connections in {START_WAIT} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown) and wait for it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def destroy(self) -> None:
        """Stop whatever runs and remove the directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    @classmethod
    def reap_orphans(cls) -> list[Path]:
        """Remove the directories of servers whose test process died without cleaning up
        (their server went with it: ``_die_with_parent``); returns them."""
        reaped: list[Path] = []
        for base in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
            try:
                owner = int((base / OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                shutil.rmtree(base, ignore_errors=True)
                reaped.append(base)
            except PermissionError:
                pass
        return reaped

    def url(self, database: str) -> str:
        """``mysql://`` URL of ``database`` on this server."""
        return f"mysql://root@{self.host}:{self.port}/{database}"
