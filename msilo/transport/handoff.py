"""Hand-off between the processes sharing a UDP port: responses to their sender, leader's sends.

Every worker sends its UDP requests from the shared listening socket, so a device
behind a NAT with address- and port-dependent filtering (RFC 4787 §5) sees them come
from the address and port it registered to.  The price: the response can reach any
worker of the ``SO_REUSEPORT`` group.  The branch of every request we send names the
process that sent it (:func:`branch_with_tag`); a worker that receives a response it
holds no transaction for, and whose tag names another process, forwards the datagram
to that process over a Unix socket in the abstract namespace.  The leader,
which binds no listening socket, asks a worker to send its requests the same way, so
reminders leave from the listening port too.

TCP, TLS and WebSocket connections are accepted by whichever worker the kernel picks
(``SO_REUSEPORT``), and a device that registered over one is reachable only over it.  A
process that must send to such a connection and does not hold it asks the other workers
(:meth:`Handoff.ask`): the one that holds it writes the request on it and answers ``A``,
the others answer ``N``.  The device's response comes back on that connection to the
holder, whose branch tag check hands it to the sender as it does a UDP response.  No
answer within :data:`ASK_TIMEOUT` counts as "nobody has it", so a branch to a closed
connection fails at once instead of waiting for Timer F.

Why not a reuseport BPF program keyed on the tag: classic BPF returns an index into
the group's socket array, which is the order the sockets joined and is reshuffled when
one leaves (the kernel moves the last socket into the hole); a worker cannot learn its
own index, a rolling restart doubles the group, and the leader is not in it at all.

Each process listens on ``msilo/<deployment>/<tag>`` for the responses handed to it; a
worker also listens on ``msilo/<deployment>/s<slot>`` for the requests it sends for
others, and closes it (and the connections it accepted there) when it stops listening,
so those that look for a worker to send through (:func:`live_workers`) find only workers
that still listen.  Abstract names vanish with their socket (no stale files) and are
private to the network namespace, but any local process may connect to them: a
connection whose peer (``SO_PEERCRED``) is not our own user is closed at once, and so is
one we made to a name another user listens on.

``SOCK_SEQPACKET`` rather than datagrams: a Unix datagram socket queues at most
``net.unix.max_dgram_qlen`` (10 by default) datagrams, and a worker that took a burst
of responses in one loop iteration overflowed it; a connection's queue is bounded by
its buffer in bytes (4 MB asked).  Each process connects once to each peer it needs and
keeps the connection.  Frames are one packet each: a kind byte, an ASCII header line,
the SIP datagram::

    R<ip> <port>\\n<response>                         response from ip:port, for you
    S<ip> <port> <local ip> <local port>\\n<request>  send this from your listener
    C<transport> <ip> <port> <id>\\n<request>         write this on the connection
                                                      from ip:port, if you hold it
    A<id> or N<id>                                    the answer to C, on its connection:
                                                      written / no such connection here

A frame longer than :data:`MAX_FRAME` is never sent (the request goes the way it would
without the hand-off) and one that arrives longer is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final

from msilo.transport.base import Address

log = logging.getLogger("msilo.transport")

MAGIC_COOKIE: Final = "z9hG4bK"  # RFC 3261 §8.1.1.7
WORKER: Final = "w"
LEADER: Final = "l"
SENDER: Final = "s"  # a worker's socket for the requests it sends for others
MAX_SLOT: Final = 0xFFF  # three hex digits in the branch
_TAG_LEN: Final = 4  # role letter + three hex digits
_HEX: Final = frozenset("0123456789abcdef")
_CREDS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_FRAME: Final = 65535 + 128
_ID_DIGITS: Final = 20  # an ask's id: decimal, at most this long
_STREAMS: Final = frozenset({"TCP", "TLS", "WS", "WSS"})
ASK_TIMEOUT: Final = 0.15  # s for the holder of a connection to answer; then "nobody has it"
_MAX_ASKS: Final = 10_000  # asks waiting for answers; past that, send as if alone
_BATCH: Final = 64  # frames read per wake-up before yielding to the loop
_BACKLOG: Final = 512
_BUFFER: Final = 4 * 1024 * 1024  # per connection: a burst of responses, not 10 datagrams
_RESCAN_AFTER: Final = 1.0  # seconds between looks for workers when none answered

OnResponse = Callable[[bytes, Address], None]
OnSend = Callable[[bytes, Address, Address], None]
OnConnection = Callable[[str, Address, bytes], bool]
Answered = Callable[[bool], None]


def process_tag(role: str, slot: int) -> str:
    """The tag naming one process in branches and hand-off socket names (``w007``)."""
    if role not in (WORKER, LEADER) or not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"bad process tag: {role!r} {slot}")
    return f"{role}{slot:03x}"


def branch_with_tag(branch: str, tag: str) -> str:
    """``branch`` (cookie + unique token) with ``tag`` and a dot after the cookie."""
    return f"{MAGIC_COOKIE}{tag}.{branch[len(MAGIC_COOKIE) :]}"


def branch_tag(branch: str | None) -> str | None:
    """The process tag in one of our branches; None for a branch someone else made."""
    if branch is None or len(branch) <= 12 or branch[11] != ".":
        return None
    if not branch.startswith(MAGIC_COOKIE):
        return None
    tag = branch[7:11]
    if tag[0] not in (WORKER, LEADER) or not _HEX.issuperset(tag[1:]):
        return None
    return tag


_BRANCH: Final = b"branch=" + MAGIC_COOKIE.encode()


def datagram_tag(data: bytes) -> str | None:
    """The process tag of the first branch in a datagram, without parsing it.

    A response to one of our requests carries exactly one Via, ours: the UAS copies
    it (RFC 3261 §8.2.6.2) and every proxy on the way back removes its own (§16.7).
    So the first branch is ours, and a worker can hand the datagram on unparsed.
    """
    start = data.find(_BRANCH)
    if start < 0:
        return None
    start += len(_BRANCH)
    if data[start + _TAG_LEN : start + _TAG_LEN + 1] != b".":
        return None
    try:
        tag = data[start : start + _TAG_LEN].decode("ascii")
    except UnicodeDecodeError:
        return None
    if tag[0] not in (WORKER, LEADER) or not _HEX.issuperset(tag[1:]):
        return None
    return tag


def socket_name(deployment: str, tag: str) -> bytes:
    """The abstract Unix socket name of one process of one deployment."""
    return f"\0msilo/{deployment}/{tag}".encode()


def _format_addr(addr: Address) -> bytes:
    return f"{addr[0]} {int(addr[1])}".encode()


@dataclass(slots=True)
class HandoffStats:
    """Counters the server reports."""

    forwarded: int = 0  # responses sent on to their owner
    received: int = 0  # responses received from another worker
    relayed: int = 0  # requests the leader sent through a worker
    sent_for_leader: int = 0  # requests this worker sent for the leader
    undeliverable: int = 0  # frames whose receiver is gone or full
    refused: int = 0  # frames from another user or malformed
    asked: int = 0  # requests we asked the other workers to write on their connection
    handed_off: int = 0  # ... that one of them wrote
    not_held: int = 0  # ... that every worker asked answered it holds no such connection
    ask_timeouts: int = 0  # ... that not every worker answered in time, none with "written"
    late_answers: int = 0  # answers that came after the ask was settled
    sent_for_others: int = 0  # requests this worker wrote on its connection for another
    not_here: int = 0  # asks this worker answered N: it holds no such connection

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Handoff:
    """One process's hand-off sockets (see the module docstring).

    ``on_response(data, peer)`` gets every response forwarded to us; ``on_send(data,
    dest, local)`` every request the leader wants sent (workers only);
    ``on_connection(transport, peer, data)`` writes a request another process asked us
    to write on the connection ``peer`` opened to us, and says whether it did (workers).
    """

    def __init__(
        self,
        deployment: str,
        tag: str,
        *,
        on_response: OnResponse,
        on_send: OnSend | None = None,
        on_connection: OnConnection | None = None,
    ) -> None:
        self.deployment = deployment
        self.tag = tag
        self.stats = HandoffStats()
        self._on_response = on_response
        self._on_send = on_send
        self._on_connection = on_connection
        self._listener: socket.socket | None = None
        self._sender: socket.socket | None = None
        # fd -> (connection from a peer, accepted on the sender socket)
        self._accepted: dict[int, tuple[socket.socket, bool]] = {}
        self._peers: dict[bytes, socket.socket] = {}  # name -> our connection to it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._uid = os.getuid()
        self._workers: list[bytes] = []
        self._next_worker = itertools.count()
        self._scanned_at = float("-inf")
        self._asks: dict[int, _Ask] = {}  # id -> an ask waiting for its answers
        self._next_ask = itertools.count(1)

    @property
    def name(self) -> bytes:
        """The name of the socket responses are handed to us on."""
        return socket_name(self.deployment, self.tag)

    @property
    def sender_name(self) -> bytes:
        """The name of the socket others ask us to send on (a worker's)."""
        return socket_name(self.deployment, SENDER + self.tag[1:])

    def open(self) -> None:
        """Bind the listening socket(s) and start accepting (in the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._listener = self._listen(self.name, sending=False)
        if self._on_send is not None or self._on_connection is not None:
            try:
                self._sender = self._listen(self.sender_name, sending=True)
            except OSError:
                self.close()
                raise

    def _listen(self, name: bytes, *, sending: bool) -> socket.socket:
        assert self._loop is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            sock.bind(name)
            sock.listen(_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._loop.add_reader(sock.fileno(), self._accept, sock, sending)
        return sock

    def stop_sending(self) -> None:
        """Send for nobody any more (we stopped listening): close the sender socket.

        The connections accepted on it are closed too, so their peers look for another
        worker (frames still queued on them are lost; the sender's Timer E resends).
        """
        sock, self._sender = self._sender, None
        self._close(sock)
        for fd, (conn, sending) in list(self._accepted.items()):
            if sending:
                del self._accepted[fd]
                self._close(conn)

    def close(self) -> None:
        """Close every socket (the names are free at once)."""
        self.stop_sending()
        sock, self._listener = self._listener, None
        self._close(sock)
        for conn, _sending in list(self._accepted.values()):
            self._close(conn)
        self._accepted.clear()
        for conn in self._peers.values():
            self._close(conn)
        self._peers.clear()
        # Closing down: the transactions waiting on these go with the transaction layer.
        for ask in self._asks.values():
            ask.timer.cancel()
        self._asks.clear()

    def _close(self, sock: socket.socket | None) -> None:
        if sock is None or sock.fileno() < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def reply(self, data: bytes, addr: Address, via: object) -> None:
        """Never answers: only responses come through the hand-off (a Source's channel)."""
        log.debug("event=handoff_reply_dropped peer=%s:%s", addr[0], addr[1])

    # -- sending ----------------------------------------------------------------------

    def forward(self, tag: str, data: bytes, peer: Address) -> bool:
        """Hand a response we do not own to the process ``tag``; False if it is gone."""
        if self._frame(socket_name(self.deployment, tag), b"R" + _format_addr(peer), data):
            self.stats.forwarded += 1
            return True
        return False

    def relay(self, data: bytes, dest: Address, local: Address) -> bool:
        """Ask a worker to send ``data`` to ``dest`` from its listener ``local`` (the leader).

        Workers are taken in turn; one that is gone makes us look again.  False when no
        worker is reachable (the caller then sends from its own client socket).
        """
        header = b"S" + _format_addr(dest) + b" " + _format_addr(local)
        for _ in range(2):  # the cached list, then a fresh look
            for _ in range(len(self._workers)):
                name = self._workers[next(self._next_worker) % len(self._workers)]
                if self._frame(name, header, data):
                    self.stats.relayed += 1
                    return True
                self._workers.remove(name)
            if not self._rescan():
                break
        return False

    def ask(self, transport: str, peer: Address, data: bytes, answered: Answered) -> bool:
        """Ask the other workers to write ``data`` on the ``transport`` connection that
        ``peer`` opened to one of them (see the module docstring).

        ``answered(True)`` when one wrote it; ``answered(False)`` when every worker asked
        said it holds no such connection, or not all answered within
        :data:`ASK_TIMEOUT`.  Returns False, and never calls ``answered``, when nobody
        could be asked (no other worker, the frame too long, too many asks waiting).
        """
        if self._listener is None or len(self._asks) >= _MAX_ASKS or transport not in _STREAMS:
            return False
        ident = next(self._next_ask)
        header = b"C%s %s %d" % (transport.encode(), _format_addr(peer), ident)
        if len(header) + 1 + len(data) > MAX_FRAME:
            return False
        if time.monotonic() - self._scanned_at >= _RESCAN_AFTER:
            # A worker that started since the last look may hold the connection.
            self._rescan()
        # A worker whose queue is full stays listed (it is alive); one that is gone fails
        # its connect at once until the next look.
        asked = sum(self._frame(name, header, data) for name in self._workers)
        if not asked:
            return False
        assert self._loop is not None
        timer = self._loop.call_later(ASK_TIMEOUT, self._ask_timed_out, ident)
        self._asks[ident] = _Ask(answered, asked, timer)
        self.stats.asked += 1
        return True

    def _answered(self, ident: int, held: bool) -> None:
        ask = self._asks.get(ident)
        if ask is None:  # timed out already, or written by another (cannot happen twice)
            self.stats.late_answers += 1
            return
        if not held:
            ask.waiting -= 1
            if ask.waiting > 0:
                return
            self.stats.not_held += 1
        else:
            self.stats.handed_off += 1
        del self._asks[ident]
        ask.timer.cancel()
        _settle(ask, held)

    def _ask_timed_out(self, ident: int) -> None:
        ask = self._asks.pop(ident, None)
        if ask is not None:
            self.stats.ask_timeouts += 1
            _settle(ask, False)

    def _frame(self, name: bytes, header: bytes, data: bytes) -> bool:
        if self._listener is None:  # closed
            return False
        frame = b"".join((header, b"\n", data))
        for _ in range(2):  # a connection the peer closed (it restarted) is made again once
            conn = self._peers.get(name)
            try:
                if conn is None:
                    conn = self._connect(name)
                conn.send(frame, socket.MSG_NOSIGNAL)
                return True
            except BlockingIOError as exc:
                # Its queue is full: drop this one (Timer E resends the request).
                return self._undeliverable(name, exc)
            except OSError as exc:
                self._peers.pop(name, None)
                self._close(conn)
                if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
                    return self._undeliverable(name, exc)  # nobody has that name
        return self._undeliverable(name, None)

    def _connect(self, name: bytes) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.setblocking(False)
            with contextlib.suppress(OSError):  # room for a burst of responses
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
            # A Unix connect completes at once or fails (EAGAIN: its backlog is full).
            conn.connect(name)
            # The name may be anybody's: requests (message text) go to our own user only.
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            if _CREDS.unpack(creds)[1] != self._uid:
                self.stats.refused += 1
                raise ConnectionRefusedError(f"{name[1:]!r} is another user's")
        except OSError:
            conn.close()
            raise
        self._peers[name] = conn
        assert self._loop is not None
        # Asks are answered on the connection; any connection's end says its peer is gone.
        self._loop.add_reader(conn.fileno(), self._answers, conn, name)
        return conn

    def _undeliverable(self, name: bytes, exc: BaseException | None) -> bool:
        self.stats.undeliverable += 1
        log.debug("event=handoff_failed to=%r error=%r", name[1:], exc)
        return False

    def _answer(self, conn: socket.socket, frame: bytes) -> None:
        try:
            conn.send(frame, socket.MSG_NOSIGNAL)
        except OSError as exc:  # full or gone: the asker's timeout answers for us
            self.stats.undeliverable += 1
            log.debug("event=handoff_answer_lost error=%r", exc)

    def _rescan(self) -> bool:
        now = time.monotonic()
        if now - self._scanned_at < _RESCAN_AFTER:
            return False
        self._scanned_at = now
        # Never ourselves (a draining worker relays because its own listener is closed).
        own = self.sender_name
        self._workers = [name for name in live_workers(self.deployment) if name != own]
        return bool(self._workers)

    # -- receiving --------------------------------------------------------------------

    def _accept(self, listener: socket.socket, sending: bool) -> None:
        assert self._loop is not None
        for _ in range(_BATCH):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # pragma: no cover - e.g. out of file descriptors
                log.warning("event=handoff_accept_failed error=%r", exc)
                return
            # Abstract names have no permissions: the peer must be our own user.
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            if _CREDS.unpack(creds)[1] != self._uid:
                self.stats.refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            self._accepted[conn.fileno()] = (conn, sending)
            self._loop.add_reader(conn.fileno(), self._readable, conn, sending)

    def _readable(self, conn: socket.socket, sending: bool) -> None:
        for _ in range(_BATCH):
            try:
                # One byte more than a frame may hold: a longer one was cut, refuse it.
                frame = conn.recv(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frame = b""
            if not frame:  # the peer went away
                self._accepted.pop(conn.fileno(), None)
                self._close(conn)
                return
            if len(frame) > MAX_FRAME:
                self.stats.refused += 1
                continue
            self._handle(frame, sending, conn)

    def _answers(self, conn: socket.socket, name: bytes) -> None:
        """Frames on a connection we made: answers to our asks, or its end."""
        for _ in range(_BATCH):
            try:
                frame = conn.recv(_ID_DIGITS + 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frame = b""
            if not frame:  # the peer closed it (stopped, or stopped sending for others)
                if self._peers.get(name) is conn:
                    del self._peers[name]
                self._close(conn)
                return
            kind, digits = frame[:1], frame[1:]
            if kind in (b"A", b"N") and 0 < len(digits) <= _ID_DIGITS and digits.isdigit():
                self._answered(int(digits), kind == b"A")
            else:
                self.stats.refused += 1

    def _handle(self, frame: bytes, sending: bool, conn: socket.socket) -> None:
        head, sep, data = frame.partition(b"\n")
        parts = head[1:].split(b" ")
        if not sep or not data:
            self.stats.refused += 1
            return
        try:
            frame_kind = head[:1]
            if (
                frame_kind == b"R"
                and not sending
                and len(parts) == 2
                and data.startswith(b"SIP/2.0 ")
            ):
                peer = (parts[0].decode(), int(parts[1]))
                self.stats.received += 1
                self._on_response(data, peer)
                return
            if frame_kind == b"S" and sending and len(parts) == 4 and self._on_send is not None:
                dest = (parts[0].decode(), int(parts[1]))
                local = (parts[2].decode(), int(parts[3]))
                self._on_send(data, dest, local)
                self.stats.sent_for_leader += 1
                return
            if (
                frame_kind == b"C"
                and sending
                and len(parts) == 4
                and self._on_connection is not None
                and 0 < len(parts[3]) <= _ID_DIGITS
                and parts[3].isdigit()
                and not data.startswith(b"SIP/")
            ):
                transport = parts[0].decode("ascii")
                peer = (parts[1].decode("ascii"), int(parts[2]))
                if transport not in _STREAMS:
                    raise ValueError(transport)
                held = self._on_connection(transport, peer, data)
                if held:
                    self.stats.sent_for_others += 1
                else:
                    self.stats.not_here += 1
                self._answer(conn, (b"A" if held else b"N") + parts[3])
                return
        except (ValueError, UnicodeDecodeError):
            pass
        except OSError as exc:  # our listener is closing: the leader's Timer E resends
            log.debug("event=send_for_leader_failed error=%r", exc)
            return
        self.stats.refused += 1


@dataclass(slots=True)
class _Ask:
    """A request other workers were asked to write on their connection."""

    answered: Answered
    waiting: int  # workers asked that have not answered
    timer: asyncio.TimerHandle


def _settle(ask: _Ask, held: bool) -> None:
    try:
        ask.answered(held)
    except Exception:  # a bug in the callback: never out of the socket's reader
        log.exception("event=handoff_answer_failed")


def live_workers(deployment: str, path: str = "/proc/net/unix") -> list[bytes]:
    """The sender sockets of the workers of ``deployment`` that listen now (Linux)."""
    prefix = "@" + socket_name(deployment, SENDER)[1:].decode()
    found: list[bytes] = []
    try:
        with open(path, encoding="ascii", errors="replace") as table:
            for line in table:
                name = line.rstrip("\n").rpartition(" ")[2]
                if name.startswith(prefix) and len(name) == len(prefix) + _TAG_LEN - 1:
                    found.append(b"\0" + name[1:].encode())
    except OSError as exc:  # pragma: no cover - not Linux
        log.warning("event=handoff_scan_failed error=%r", exc)
    return sorted(set(found))


__all__ = [
    "ASK_TIMEOUT",
    "MAX_FRAME",
    "Handoff",
    "HandoffStats",
    "branch_tag",
    "branch_with_tag",
    "datagram_tag",
    "live_workers",
    "process_tag",
    "socket_name",
]
