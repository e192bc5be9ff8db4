"""Child processes that are always cleaned up, and small helpers around them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class BenchError(Exception):
    """A piece of the benchmark failed; the message says which and what to do."""


class Proc:
    """A child in its own process group, so stopping it also stops what it forked."""

    _live: list[Proc] = []  # noqa: RUF012 - registry of every started child, for cleanup

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._log_file = log.open("wb")
        try:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            self._log_file.close()
            raise BenchError(f"cannot start {name} ({argv[0]}): {exc}") from None
        Proc._live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None if still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """``sig`` to the leader, then SIGKILL to the whole group after ``grace`` seconds."""
        if self.running():
            self.send_signal(sig)
            self.wait(grace)
        # Children of a leader that already exited (e.g. Kamailio's) are still in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        code = self.wait(5.0)
        self._log_file.close()
        if self in Proc._live:
            Proc._live.remove(self)
        return code

    def tail(self, lines: int = 15) -> str:
        """The last lines of the child's output, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(cls._live):
            proc.stop(grace=3.0)


def cpu_sample() -> tuple[int, int]:
    """(idle + iowait, all) jiffies of the whole host since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return fields[3] + fields[4], sum(fields[:8])


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of the host's CPU time that was idle between two ``cpu_sample`` calls."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def wait_idle(share: float, longest: float, probe: float = 2.0) -> tuple[float | None, float]:
    """Until the host was at least ``share`` idle over ``probe`` seconds, at most ``longest``
    seconds: (the idle share last seen, seconds waited). The machine is shared; a step
    measured while other jobs take the CPUs measures them."""
    waited = 0.0
    seen = None
    while True:
        before = cpu_sample()
        time.sleep(probe)
        waited += probe
        seen = idle_share(before, cpu_sample())
        if seen is None or seen >= share or waited >= longest:
            return seen, waited


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on both UDP and TCP right now (msilo may listen on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
            return port
    raise BenchError("no free port found on 127.0.0.1")


def sip_ping(host: str, port: int, timeout: float = 0.5) -> int | None:
    """Send an OPTIONS over UDP and return the status code of the answer (None: no answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(timeout)
        lport = sock.getsockname()[1]
        tag = f"{os.getpid()}{time.monotonic_ns()}"
        request = (
            f"OPTIONS sip:ping@{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{lport};branch=z9hG4bK{tag};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:bench@{host}:{lport}>;tag={tag}\r\n"
            f"To: <sip:ping@{host}:{port}>\r\n"
            f"Call-ID: ping-{tag}@{host}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        try:
            sock.sendto(request.encode(), (host, port))
            while True:
                data = sock.recv(65535)
                if data.startswith(b"SIP/2.0 ") and data[8:11].isdigit():
                    code = int(data[8:11])
                    if code >= 200:
                        return code
        except OSError:  # timeout or ICMP port unreachable
            return None


def wait_for_sip(proc: Proc, host: str, port: int, timeout: float) -> None:
    """Until the server answers an OPTIONS; a clear error if it dies or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise BenchError(
                f"{proc.name} exited with status {proc.popen.returncode} while starting; "
                f"its output ({proc.log}):\n{proc.tail()}"
            )
        if sip_ping(host, port) is not None:
            return
        time.sleep(0.2)
    raise BenchError(
        f"{proc.name} did not answer SIP on {host}:{port} within {timeout:.0f} s; "
        f"its output ({proc.log}):\n{proc.tail()}"
    )
