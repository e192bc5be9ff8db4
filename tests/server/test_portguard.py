"""The port guard (msilo.server.portguard) on real sockets and real lock files."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from msilo.errors import ConfigError
from msilo.server.portguard import PortGuard
from tests.service.sipua import free_port


def test_a_listener_held_by_another_guard_is_refused_even_before_it_binds(
    tmp_path: Path,
) -> None:
    # Two servers starting at once: neither has bound yet, the lock decides.
    port = free_port()
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"]
    first, second = PortGuard(str(tmp_path)), PortGuard(str(tmp_path))
    first.claim(listen)
    with pytest.raises(ConfigError, match=rf"udp:127\.0\.0\.1:{port} is already served"):
        second.claim(listen)
    first.claim(listen)  # its own addresses again: a rolling restart keeps them
    first.release()
    second.claim(listen)
    second.release()


def test_an_address_bound_with_so_reuseport_is_refused(tmp_path: Path) -> None:
    # What a running worker of another deployment looks like.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as worker:
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", 0))
        worker.listen()
        port = worker.getsockname()[1]
        guard = PortGuard(str(tmp_path))
        with pytest.raises(ConfigError, match=rf"tcp:127\.0\.0\.1:{port} is already served"):
            guard.claim([f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"])
        assert guard._held == {}  # all or nothing: the UDP one was let go again
    PortGuard(str(tmp_path)).claim([f"tcp:127.0.0.1:{port}"])  # free once it is gone


def test_a_wildcard_listener_covers_every_address(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("0.0.0.0", 0))
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match="already served"):
            PortGuard(str(tmp_path)).claim([f"udp:127.0.0.1:{port}"])


def test_keep_only_lets_go_of_addresses_no_longer_served(tmp_path: Path) -> None:
    a, b = f"udp:127.0.0.1:{free_port()}", f"udp:127.0.0.1:{free_port()}"
    guard = PortGuard(str(tmp_path))
    guard.claim([a, b])
    guard.keep_only([b])
    PortGuard(str(tmp_path)).claim([a])
    with pytest.raises(ConfigError):
        PortGuard(str(tmp_path)).claim([b])
    guard.release()
