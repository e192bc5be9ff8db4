"""Spreading one peer's UDP datagrams over the workers that share a port.

With plain ``SO_REUSEPORT`` the kernel picks the receiving socket by a hash of the
peer's address, so every datagram from one peer lands on the same worker.  In
production most traffic comes from one peer (the proxy in front of us), so one
worker would do all the work while the others idle.

A classic BPF program attached to the port's reuseport group
(``SO_ATTACH_REUSEPORT_CBPF``) picks the socket from the datagram's *content*
instead: a hash of its first 256 bytes (the request line and the top Via with
its branch) and its last 32 bytes, modulo the number of workers.  A UDP
retransmission is byte-for-byte the original request, so it reaches the worker
that holds the transaction; distinct requests from one proxy are spread.  When
the group has fewer sockets than the index (a worker is restarting) the kernel
falls back to its own hash, and the silo's dedupe key keeps a request that was
re-handled elsewhere from being stored twice.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
from typing import Final

log = logging.getLogger("msilo.transport")

# <linux/filter.h>, <asm-generic/socket.h>
SO_ATTACH_REUSEPORT_CBPF: Final = 51
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _ABS, _IND, _MEM, _LEN = 0x00, 0x20, 0x40, 0x60, 0x80
_ADD, _SUB, _MUL, _RSH, _MOD, _XOR = 0x00, 0x10, 0x20, 0x70, 0x90, 0xA0
_K, _X = 0x00, 0x08
_JA, _JGE = 0x00, 0x30
_TAX = 0x00
_RET_A = 0x10

HEAD_BYTES: Final = 256  # request line + top Via (branch) in practice
TAIL_BYTES: Final = 32
_GOLDEN: Final = 0x9E3779B1  # odd multiplier (Fibonacci hashing) to mix the words

_HASH, _BASE = 0, 1  # scratch memory slots

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def _mix_word_at(offset: int, *, indirect: bool) -> list[Insn]:
    """hash = (hash + word) * GOLDEN, the word read at ``offset`` (from X when indirect)."""
    load = (
        [(_LDX | _W | _MEM, 0, 0, _BASE), (_LD | _W | _IND, 0, 0, offset)]
        if indirect
        else [(_LD | _W | _ABS, 0, 0, offset)]
    )
    return [
        *load,
        (_LDX | _W | _MEM, 0, 0, _HASH),
        (_ALU | _ADD | _X, 0, 0, 0),
        (_ALU | _MUL | _K, 0, 0, _GOLDEN),
        (_ST, 0, 0, _HASH),
    ]


def program(groups: int) -> list[Insn]:
    """The classic BPF program: returns a socket index in ``[0, groups)``."""
    if groups < 1:
        raise ValueError("groups must be >= 1")
    body: list[Insn] = []
    for offset in range(0, HEAD_BYTES, 4):
        body += _mix_word_at(offset, indirect=False)
    body += [
        (_LD | _W | _LEN, 0, 0, 0),
        (_ALU | _SUB | _K, 0, 0, TAIL_BYTES),
        (_ST, 0, 0, _BASE),
    ]
    for offset in range(0, TAIL_BYTES, 4):
        body += _mix_word_at(offset, indirect=True)
    head: list[Insn] = [
        (_LD | _W | _LEN, 0, 0, 0),
        (_ST, 0, 0, _HASH),  # the hash starts as the length
        # Long enough: jt skips the `ja` into the body.  Short datagrams (keep-alive
        # CRLFs, stray bytes) take the `ja` over it and are spread by length only (any
        # worker answers a ping; loading past the end would abort the program).  The
        # body is longer than a conditional jump reaches (255), hence the `ja`.
        (_JMP | _JGE | _K, 1, 0, HEAD_BYTES),
        (_JMP | _JA, 0, 0, len(body)),
    ]
    tail: list[Insn] = [
        (_LD | _W | _MEM, 0, 0, _HASH),
        (_MISC | _TAX, 0, 0, 0),
        (_ALU | _RSH | _K, 0, 0, 16),
        (_ALU | _XOR | _X, 0, 0, 0),  # fold the well-mixed high bits into the low ones
        (_ALU | _MOD | _K, 0, 0, groups),
        (_RET | _RET_A, 0, 0, 0),
    ]
    return head + body + tail


def attach(sock: socket.socket, insns: list[Insn]) -> None:
    """Attach a classic BPF program choosing the socket of ``sock``'s reuseport group."""
    raw = b"".join(struct.pack("HBBI", *insn) for insn in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("@HP", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def always(index: int) -> list[Insn]:
    """A program sending every datagram to the socket at ``index`` (tests steer with it)."""
    return [(_RET, 0, 0, index)]


def spread_by_content(sock: socket.socket, groups: int) -> bool:
    """Attach the spreading program to ``sock``'s reuseport group; False if unsupported.

    Call it on every worker's socket (the group keeps the last program attached; all
    workers attach the same one).  One worker needs nothing: returns False at once.
    """
    if groups <= 1:
        return False
    try:
        attach(sock, program(groups))
    except OSError as exc:
        log.warning(
            "event=spread_unavailable reason=%r detail=%s "
            "(datagrams from one peer will all reach one worker)",
            exc.strerror,
            "SO_ATTACH_REUSEPORT_CBPF refused",
        )
        return False
    return True
