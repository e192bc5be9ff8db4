"""Non-INVITE server transactions (RFC 3261 §17.2.2) and their matching key (§17.2.3).

A server transaction remembers the last response it sent.  A retransmitted
request is answered with that response and causes no new work; one that
arrives before any response exists is absorbed.  After the final response the
transaction lingers for Timer J (64·T1 over UDP, zero over reliable
transports) to keep absorbing retransmissions, then goes away.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

from msilo.sip.build import MAGIC_COOKIE, HeaderLine, annotate_via, build_response, new_tag
from msilo.sip.message import SipRequest

if TYPE_CHECKING:
    from msilo.transaction.layer import TransactionLayer
    from msilo.transport.base import Source

log = logging.getLogger("msilo.txn")


class State(enum.Enum):
    """RFC 3261 §17.1.2.2 / §17.2.2 transaction states (non-INVITE)."""

    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    TERMINATED = "terminated"


def server_key(request: SipRequest) -> Hashable:
    """The key that matches a request to its server transaction (RFC 3261 §17.2.3).

    With an RFC 3261 branch (magic cookie): branch, sent-by and method, where ACK
    maps to INVITE.  Otherwise the RFC 2543 fallback: Request-URI, To tag, From
    tag, Call-ID, CSeq and the whole top Via.
    """
    via = request.via
    method = request.method
    if method == "ACK":
        method = "INVITE"
    assert via is not None  # the layer rejects requests without Via first
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        # One string, not a tuple of four objects: a completed UDP transaction keeps its
        # key for Timer J (32 s), tens of thousands of them at a time.  A space occurs in
        # none of the parts (tokens and a host), so distinct parts give distinct keys.
        return f"{branch} {via.host} {via.port} {method}"
    to_tag = request.to.tag if request.to is not None and request.method != "ACK" else None
    from_tag = request.from_.tag if request.from_ is not None else None
    cseq = request.cseq
    return (
        "2543",
        request.uri,
        to_tag,
        from_tag,
        request.call_id,
        cseq.number if cseq is not None else None,
        method,
        via.raw,
    )


# (final response, Via asked for rport, Via sent-by port): a completed UDP transaction.
Replay = tuple[bytes, bool, int]


def replay_address(addr: tuple[Any, ...], rport: bool, via_port: int) -> tuple[str, int]:
    """Where a replayed response goes: RFC 3261 §18.2.2 with RFC 3581 §4 -- the source
    address, with the source port only when the Via asked for ``rport``."""
    if rport or via_port == addr[1]:
        return (str(addr[0]), int(addr[1]))
    return (str(addr[0]), via_port)


class ServerTransaction:
    """One received request and the responses we give it.

    The request handler answers through :meth:`respond`; the layer feeds
    retransmissions to :meth:`absorb`.
    """

    __slots__ = (
        "_annotated",
        "_layer",
        "_rport",
        "_to_tag",
        "_top_via",
        "_via_port",
        "call_id",
        "key",
        "last_response",
        "method",
        "request",
        "source",
        "state",
        "status",
    )

    def __init__(
        self, layer: TransactionLayer, key: Hashable, request: SipRequest, source: Source
    ) -> None:
        self._layer = layer
        self.key = key
        # None once retired: see _retire().
        self.request: SipRequest | None = request
        self.method = request.method
        self.call_id = request.call_id
        self.source = source
        self.state = State.TRYING
        self.last_response: bytes | None = None
        self.status = 0  # status of the last response sent
        to = request.to
        self._to_tag: str | None = to.tag if to is not None else None
        self._top_via: str | None = None
        self._annotated = False
        self._rport = True
        self._via_port = 0

    @property
    def final(self) -> bool:
        """True once a final (≥ 200) response was sent (or the transaction is gone)."""
        return self.state in (State.COMPLETED, State.TERMINATED)

    @property
    def to_tag(self) -> str | None:
        """The To tag our responses carry (the request's own, or one made for it)."""
        if self._to_tag is None:
            self._to_tag = new_tag()
        return self._to_tag

    def respond(
        self,
        status: int,
        reason: str,
        *,
        headers: Iterable[HeaderLine] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> bool:
        """Build and send a response; False when a final response was already sent."""
        request = self.request
        if self.final or request is None:
            log.debug("event=late_response status=%d call_id=%s", status, self.call_id)
            return False
        if not self._annotated:
            # §18.2.1 / RFC 3581 §4, computed once for all responses of this transaction.
            self._annotated = True
            via = request.via
            if via is not None:
                self._top_via = annotate_via(via, self.source.ip, self.source.port)
        to_tag = self.to_tag if status > 100 else None
        data = build_response(
            request,
            status,
            reason,
            to_tag=to_tag,
            headers=headers,
            body=body,
            content_type=content_type,
            top_via=self._top_via,
        )
        return self.send_response(data, status)

    def send_response(self, data: bytes, status: int) -> bool:
        """Send a response serialized elsewhere; False when a final one was already sent."""
        request = self.request
        if self.final or request is None:
            return False
        self.last_response = data
        self.status = status
        try:
            self.source.reply(data, request.via)
        except OSError as exc:
            # §17.2.4: a transport error sending the response terminates the
            # transaction; the client will retransmit or time out.
            log.info(
                "event=response_send_failed status=%d peer=%r error=%r", status, self.source, exc
            )
        if status >= 200:
            self.state = State.COMPLETED
            if not self.source.reliable:
                self._retire()
            self._layer._server_completed(self)
        else:
            self.state = State.PROCEEDING
        return True

    def drop(self) -> None:
        """End the transaction without any answer (a source we refuse to talk to).

        Nothing is kept: a retransmission starts a new transaction and is judged again.
        """
        if self.final:
            return
        self.state = State.TERMINATED
        self.request = None
        self._layer._server_dropped(self)

    def absorb(self, source: Source) -> None:
        """Handle a retransmission of our request: replay the last response, if any.

        (Once a UDP transaction is complete the layer replays from ``replay_state``.)"""
        layer = self._layer
        if self.last_response is None or self.request is None:
            layer.stats.retransmissions_absorbed += 1
            return
        layer.stats.responses_replayed += 1
        try:
            source.reply(self.last_response, self.request.via)
        except OSError as exc:
            log.info("event=replay_failed peer=%r error=%r", source, exc)

    def replay_state(self) -> Replay:
        """What answering a retransmission needs once complete: see :func:`replay_address`."""
        assert self.last_response is not None
        return (self.last_response, self._rport, self._via_port)

    def _retire(self) -> None:
        """Keep only what replaying the final response needs through Timer J.

        Over UDP a completed transaction lives 64·T1 (32 s); at a few thousand
        requests a second, holding every parsed request that long made each
        full garbage collection walk ~50,000 requests (~80 ms: the p99 of the
        store path).  The replay needs the key, the response bytes and where
        RFC 3261 §18.2.2 / RFC 3581 §4 send it: the source address, with the
        source port only when the Via asked for ``rport``.
        """
        request = self.request
        if request is None:
            return
        via = request.via
        self._rport = via is None or "rport" in via.params
        self._via_port = (via.port or 5060) if via is not None else 0
        self.request = None
        # Only for building responses, and no response follows a final one.
        self._top_via = None
        self._to_tag = None

    def __repr__(self) -> str:
        return f"ServerTransaction({self.method} call_id={self.call_id} state={self.state.value})"
