"""The transaction layer: what the transport calls with every received message.

It parses, matches requests to server transactions and responses to client
transactions (one dict lookup each), and hands new requests to the injected
request handler.  It knows nothing of routing or storage: the handler answers
through :meth:`ServerTransaction.respond`, and requests go out through the
injected send function.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from msilo.errors import ParseError, SipError, TransportError
from msilo.sip.build import (
    HeaderLine,
    OutgoingRequest,
    annotate_via,
    build_request,
    build_response,
    new_branch,
    new_tag,
)
from msilo.sip.message import SipRequest, SipResponse
from msilo.transaction.client import ClientTransaction
from msilo.transaction.clock import Clock, DeadlineQueue, ExpiringKeys, TimerValues
from msilo.transaction.server import (
    Replay,
    ServerTransaction,
    State,
    replay_address,
    server_key,
)
from msilo.transport.base import (
    RELIABLE,
    Address,
    SendFunction,
    Source,
    Target,
    select_transport,
)
from msilo.transport.handoff import branch_tag, branch_with_tag, datagram_tag

log = logging.getLogger("msilo.txn")

RequestHandler = Callable[[SipRequest, ServerTransaction], Awaitable[None] | None]
Parser = Callable[[bytes], SipRequest | SipResponse]
SentBy = Callable[[str, str], tuple[str, int]]  # (transport, destination host) -> Via sent-by
# (owner tag, datagram, peer) -> True when the owner took it (msilo.transport.handoff)
Forward = Callable[[str, bytes, Address], bool]


@dataclass(slots=True)
class TransactionStats:
    """Counters the server sums into its statistics."""

    requests: int = 0  # new server transactions
    retransmissions_absorbed: int = 0  # request retransmissions with nothing to replay yet
    responses_replayed: int = 0  # request retransmissions answered from the cache
    acks_dropped: int = 0
    rejected_busy: int = 0  # 503 because too many requests were in progress
    stateless_responses: int = 0  # answered without a transaction (overload refusals)
    handler_errors: int = 0
    abandoned: int = 0  # server transactions the handler never answered
    dropped: int = 0  # server transactions ended on purpose without an answer
    client_started: int = 0
    requests_retransmitted: int = 0  # Timer E firings
    responses_absorbed: int = 0  # response retransmissions during Timer K
    stray_responses: int = 0  # responses matching no client transaction
    responses_forwarded: int = 0  # responses handed to the process that sent the request
    client_timeouts: int = 0
    transport_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TransactionLayer:
    """Server and client non-INVITE transactions for one process.

    ``handler(request, txn)`` is called once per new request (sync, or async:
    then one task per new transaction, never per retransmission).  A
    :class:`SipError` it raises is answered with its status; any other
    exception with 500.  ``send(data, target, on_error)`` sends a request; it
    may raise (OSError, TransportError) or report a later failure to
    ``on_error``.  ``sent_by(transport, host)`` gives the host/port for our Via.

    ``tag`` names this process in the branch of every request it sends; a
    response matching none of our transactions whose branch names another
    process goes to ``forward`` (the processes share one UDP port, so a response
    may reach any of them).
    """

    def __init__(
        self,
        handler: RequestHandler,
        send: SendFunction,
        *,
        clock: Clock | None = None,
        timers: TimerValues | None = None,
        sent_by: SentBy | None = None,
        parse: Parser | None = None,
        max_pending: int = 10_000,
        abandon_after: float | None = None,
        tag: str | None = None,
        forward: Forward | None = None,
    ) -> None:
        if parse is None:
            from msilo.sip.parser import parse_message

            parse = parse_message
        self.clock: Clock = clock if clock is not None else asyncio.get_running_loop()
        self.timers = timers or TimerValues()
        self.send = send
        self.stats = TransactionStats()
        self._handler = handler
        self._handler_is_async = inspect.iscoroutinefunction(handler)
        self._parse: Parser = parse
        self._sent_by = sent_by
        self.tag = tag
        self._forward = forward
        self._max_pending = max_pending
        self._pending = 0  # server transactions without a final response
        # Overload control before any transaction or task is made for a new request:
        # True = refuse it (answered statelessly, see respond_stateless).
        self.shed: Callable[[SipRequest], bool] | None = None
        # A completed UDP transaction waits out Timer J as a plain (response, rport,
        # via port) tuple: of strings and ints, so the garbage collector stops tracking
        # it (tens of thousands at a time; full collections walked every one of them).
        self._server: dict[Hashable, ServerTransaction | Replay] = {}
        self._client: dict[tuple[str, str], ClientTransaction] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        t = self.timers
        self._timer_j = DeadlineQueue(self.clock, t.timer_j, self._expire_server)
        self._timer_k = DeadlineQueue(self.clock, t.t4, self._expire_client)
        self._timer_f = DeadlineQueue(self.clock, t.timer_f, self._timeout_client)
        # A handler that never answers would pin its transaction forever; the
        # client gave up at Timer F (64·T1), so twice that is safely too late.
        self._abandon = ExpiringKeys(
            self.clock, abandon_after or 2 * t.timer_f, self._abandon_server
        )

    # -- sizes, for tests and statistics --------------------------------------

    @property
    def server_count(self) -> int:
        """Server transactions in the table."""
        return len(self._server)

    @property
    def client_count(self) -> int:
        """Client transactions in the table."""
        return len(self._client)

    @property
    def pending(self) -> int:
        """Server transactions still waiting for a final response."""
        return self._pending

    # -- inbound ----------------------------------------------------------------

    def receive(self, data: bytes, source: Source, *, handed: bool = False) -> None:
        """Transport callback: parse ``data`` and dispatch it.

        A response whose branch names another process is handed to it unparsed;
        ``handed``: the datagram came through the hand-off and is never handed on
        again (no response can travel in a loop).  Raises :class:`ParseError` for
        bytes that are not a usable SIP message; the transport answers those (400)
        or drops them.
        """
        if self._forward is not None and not handed and data.startswith(b"SIP/2.0 "):
            owner = datagram_tag(data)
            if owner is not None and owner != self.tag:
                # Another process's request: never one of ours, whether or not it still runs.
                if self._forward(owner, data, source.addr):
                    self.stats.responses_forwarded += 1
                else:
                    self.stats.stray_responses += 1
                return
        message = self._parse(data)
        if message.is_request:
            self.receive_request(message, source)  # type: ignore[arg-type]
        else:
            self.receive_response(message, b"" if handed else data, source)  # type: ignore[arg-type]

    def receive_request(self, request: SipRequest, source: Source) -> None:
        """Match a parsed request to its server transaction, or start a new one."""
        if (
            request.via is None
            or request.cseq is None
            or request.call_id is None
            or request.from_ is None
            or request.to is None
        ):
            # RFC 3261 §8.1.1: these are mandatory in every request.
            raise ParseError("missing Via, From, To, Call-ID or CSeq")
        if request.cseq.method != request.method:
            raise ParseError("CSeq method does not match the request method")
        key = server_key(request)
        entry = self._server.get(key)
        if entry is not None:
            if isinstance(entry, tuple):
                self._replay(entry, source)
            else:
                entry.absorb(source)
            return
        if request.method == "ACK":
            # An ACK is never answered (§17.1.1.3); one that matches no INVITE
            # transaction of ours has nothing to do here.
            self.stats.acks_dropped += 1
            return
        if self.shed is not None and self.shed(request):
            # Past capacity: a stateless 503 (RFC 3261 §8.2.6, RFC 6357 §3.2) keeps nothing
            # -- no transaction, no Timer J replay -- so refusing stays cheap; a
            # retransmission is judged again.  Retransmissions of admitted requests matched
            # their transaction above and are never refused.
            self.respond_stateless(request, source, 503, "Service Unavailable", ("Retry-After: 5",))
            return
        txn = ServerTransaction(self, key, request, source)
        self._server[key] = txn
        self.stats.requests += 1
        self._pending += 1
        # The timers hold keys, never the transaction: a completed transaction is freed as
        # soon as Timer J removes it from the table, and the abandon deadline of one that
        # was answered is forgotten at once (not carried for 2·Timer F).
        self._abandon.add(key)
        if self._pending > self._max_pending:
            self.stats.rejected_busy += 1
            txn.respond(503, "Service Unavailable", headers=("Retry-After: 5",))
            return
        self._run_handler(request, txn)

    def respond_stateless(
        self,
        request: SipRequest,
        source: Source,
        status: int,
        reason: str,
        headers: Iterable[HeaderLine] = (),
    ) -> None:
        """Answer ``request`` without a transaction (RFC 3261 §8.2.6: Via annotated as
        §18.2.1 says, a To tag made up); nothing is kept for its retransmissions."""
        via = request.via
        top = annotate_via(via, source.ip, source.port) if via is not None else None
        to = request.to
        tag = to.tag if to is not None and to.tag else new_tag()
        data = build_response(request, status, reason, to_tag=tag, headers=headers, top_via=top)
        try:
            source.reply(data, via)
        except OSError as exc:
            log.info("event=response_send_failed status=%d peer=%r error=%r", status, source, exc)
        self.stats.stateless_responses += 1

    def receive_response(
        self, response: SipResponse, data: bytes = b"", source: Source | None = None
    ) -> None:
        """Match a parsed response to its client transaction (RFC 3261 §17.1.3).

        One we do not hold goes to the process its branch names, when that is
        another process and ``data`` (the datagram as received) is given.
        """
        via = response.via
        cseq = response.cseq
        if via is None or via.branch is None or cseq is None:
            self.stats.stray_responses += 1
            return
        txn = self._client.get((via.branch, cseq.method))
        if txn is None:
            owner = branch_tag(via.branch) if self._forward is not None else None
            if (
                owner is not None
                and owner != self.tag
                and data
                and source is not None
                and self._forward is not None
                and self._forward(owner, data, source.addr)
            ):
                self.stats.responses_forwarded += 1
                return
            self.stats.stray_responses += 1
            return
        txn._on_response(response)

    def _run_handler(self, request: SipRequest, txn: ServerTransaction) -> None:
        try:
            result = self._handler(request, txn)
        except Exception as exc:
            self._handler_failed(txn, exc)
            return
        if self._handler_is_async or inspect.isawaitable(result):
            task = asyncio.ensure_future(result)  # type: ignore[arg-type]
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._handler_done(t, txn))

    def _handler_done(self, task: asyncio.Future[None], txn: ServerTransaction) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            if not txn.final:
                txn.respond(503, "Service Unavailable")
            return
        exc = task.exception()
        if exc is not None:
            self._handler_failed(txn, exc)

    def _handler_failed(self, txn: ServerTransaction, exc: BaseException) -> None:
        if isinstance(exc, SipError):
            if not txn.final:
                txn.respond(exc.status, exc.reason)
            return
        self.stats.handler_errors += 1
        log.error(
            "event=handler_failed method=%s call_id=%s",
            txn.method,
            txn.call_id,
            exc_info=exc,
        )
        if not txn.final:
            txn.respond(500, "Server Internal Error")

    def _server_completed(self, txn: ServerTransaction) -> None:
        self._pending -= 1
        self._abandon.discard(txn.key)
        # §17.2.2: Timer J is 64·T1 for unreliable transports, zero for reliable ones.
        if txn.source.reliable:
            self._remove_server(txn)
        else:
            # Until Timer J fires the key names this replay: nothing else removes one, so
            # no later transaction can have taken the key meanwhile.
            if self._server.get(txn.key) is txn and txn.last_response is not None:
                self._server[txn.key] = txn.replay_state()
            self._timer_j.push(txn.key)

    def _server_dropped(self, txn: ServerTransaction) -> None:
        self._pending -= 1
        self.stats.dropped += 1
        self._abandon.discard(txn.key)
        if self._server.get(txn.key) is txn:
            del self._server[txn.key]

    def _replay(self, entry: Replay, source: Source) -> None:
        """A retransmission of a completed request: send the final response again."""
        self.stats.responses_replayed += 1
        data, rport, via_port = entry
        try:
            source.channel.reply(data, replay_address(source.addr, rport, via_port), None)
        except OSError as exc:
            log.info("event=replay_failed peer=%r error=%r", source, exc)

    def _expire_server(self, key: Hashable) -> None:
        entry = self._server.get(key)
        if isinstance(entry, tuple):
            del self._server[key]
        elif entry is not None and entry.state is State.COMPLETED:
            self._remove_server(entry)

    def _remove_server(self, txn: ServerTransaction) -> None:
        txn.state = State.TERMINATED
        if self._server.get(txn.key) is txn:
            del self._server[txn.key]

    def _abandon_server(self, key: Hashable) -> None:
        txn = self._server.get(key)
        if txn is None or isinstance(txn, tuple) or txn.final:
            return
        self.stats.abandoned += 1
        self._pending -= 1
        log.warning(
            "event=transaction_abandoned method=%s call_id=%s",
            txn.method,
            txn.call_id,
        )
        self._remove_server(txn)

    # -- outbound ---------------------------------------------------------------

    def start_client(self, request: OutgoingRequest, target: Target) -> ClientTransaction:
        """Send a built request in a new client transaction (RFC 3261 §17.1.2).

        A send that fails at once completes the transaction with 503 before
        this returns; check :attr:`ClientTransaction.done` or add a callback.
        """
        txn = ClientTransaction(self, request, target)
        self.stats.client_started += 1
        self._client[txn.key] = txn
        self._timer_f.push(txn)
        try:
            self.send(request.data, target, txn._transport_error)
        except (OSError, TransportError) as exc:
            txn._transport_error(exc)
            return txn
        if txn.state is State.TRYING and request.transport not in RELIABLE:
            txn._start_timer_e()
        return txn

    def request(
        self,
        method: str,
        uri: str,
        target: Target,
        *,
        from_: str,
        to: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[HeaderLine] = (),
        route: str | Iterable[str] = (),
        date: bool | float | datetime = False,
        **build: Any,
    ) -> ClientTransaction:
        """Build a request with our Via and send it in a new client transaction.

        The transport follows :func:`select_transport` (a UDP request over 1300
        bytes goes over TCP unless the target pinned UDP); our Via names the
        transport really used and ``sent_by`` of it.
        """
        transport = target.transport
        headers = tuple(headers)
        routes = (route,) if isinstance(route, str) else tuple(route)
        if self.tag is not None and "branch" not in build:
            build["branch"] = branch_with_tag(new_branch(), self.tag)
        outgoing = self._build(
            method,
            uri,
            target.host,
            transport,
            from_=from_,
            to=to,
            body=body,
            content_type=content_type,
            headers=headers,
            route=routes,
            date=date,
            **build,
        )
        chosen = select_transport(target, len(outgoing.data))
        if chosen != transport:
            target = target._replace(transport=chosen)
            build.pop("branch", None)
            outgoing = self._build(
                method,
                uri,
                target.host,
                chosen,
                from_=from_,
                to=to,
                body=body,
                content_type=content_type,
                headers=headers,
                route=routes,
                date=date,
                # The same request over another transport: same identity (a caller's
                # own call_id / from_tag / cseq are in ``build`` and win).
                **{
                    "branch": outgoing.branch,
                    "call_id": outgoing.call_id,
                    "from_tag": outgoing.from_tag,
                    **build,
                },
            )
        return self.start_client(outgoing, target)

    def _build(
        self, method: str, uri: str, host: str, transport: str, **kwargs: Any
    ) -> OutgoingRequest:
        if self._sent_by is None:
            raise TransportError("no local address to put in Via (sent_by not configured)")
        return build_request(
            method, uri, sent_by=self._sent_by(transport, host), transport=transport, **kwargs
        )

    def _client_completed(self, txn: ClientTransaction) -> None:
        # §17.1.2.2: Timer K is T4 for unreliable transports, zero for reliable ones.
        if txn.request.transport in RELIABLE:
            self._remove_client(txn)
        else:
            self._timer_k.push(txn)

    def _client_terminated(self, txn: ClientTransaction) -> None:
        self._remove_client(txn)

    def _expire_client(self, txn: ClientTransaction) -> None:
        txn.state = State.TERMINATED
        self._remove_client(txn)

    def _timeout_client(self, txn: ClientTransaction) -> None:
        txn._timeout()

    def _remove_client(self, txn: ClientTransaction) -> None:
        if self._client.get(txn.key) is txn:
            del self._client[txn.key]

    # -- shutdown ---------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for running handlers; True if none is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return not self._tasks

    def close(self) -> None:
        """Drop every transaction and timer (the process is going away)."""
        for queue in (self._timer_j, self._timer_k, self._timer_f, self._abandon):
            queue.close()
        for txn in list(self._client.values()):
            txn._cancel_timer_e()
        self._server.clear()
        self._client.clear()
