"""Non-INVITE client transactions (RFC 3261 §17.1.2) and their outcome.

A client transaction sends one request and completes **exactly once**, with
the first final response, or with a locally generated 408 when Timer F fires,
or 503 when the request cannot be sent (§17.1.4).  Provisional responses never
complete it; responses after completion are absorbed during Timer K.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from msilo.errors import TransportError
from msilo.sip.message import SipResponse
from msilo.transaction.server import State

if TYPE_CHECKING:
    from msilo.sip.build import OutgoingRequest
    from msilo.transaction.clock import TimerHandle
    from msilo.transaction.layer import TransactionLayer
    from msilo.transport.base import Target

log = logging.getLogger("msilo.txn")


@dataclass(frozen=True, slots=True)
class ClientResult:
    """How a client transaction ended."""

    status: int
    reason: str
    response: SipResponse | None  # None when generated locally (timeout, transport error)

    @property
    def local(self) -> bool:
        """True for a locally generated outcome (408 on Timer F, 503 on transport error)."""
        return self.response is None

    @property
    def success(self) -> bool:
        """True for a 2xx final response."""
        return 200 <= self.status < 300


DoneCallback = Callable[[ClientResult], object]


class ClientTransaction:
    """One request we sent, waiting for its final response."""

    __slots__ = (
        "_callbacks",
        "_interval",
        "_layer",
        "_timer_e",
        "key",
        "provisional",
        "request",
        "result",
        "retransmissions",
        "state",
        "target",
    )

    def __init__(self, layer: TransactionLayer, request: OutgoingRequest, target: Target) -> None:
        self._layer = layer
        self.key = (request.branch, request.method)  # §17.1.3: branch + CSeq method
        self.request = request
        self.target = target
        self.state = State.TRYING
        self.result: ClientResult | None = None
        self.provisional: SipResponse | None = None
        self.retransmissions = 0
        self._callbacks: list[DoneCallback] = []
        self._timer_e: TimerHandle | None = None
        self._interval = layer.timers.t1

    @property
    def done(self) -> bool:
        """True once the outcome is known."""
        return self.result is not None

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call ``callback(result)`` once, on completion (at once if already complete)."""
        if self.result is not None:
            self._run_callback(callback, self.result)
        else:
            self._callbacks.append(callback)

    async def wait(self) -> ClientResult:
        """Wait for the outcome."""
        if self.result is not None:
            return self.result
        future: asyncio.Future[ClientResult] = asyncio.get_running_loop().create_future()

        def resolve(result: ClientResult) -> None:
            if not future.done():
                future.set_result(result)

        self._callbacks.append(resolve)
        return await future

    # -- driven by the layer -------------------------------------------------

    def _start_timer_e(self) -> None:
        # §17.1.2.2: Timer E only for unreliable transports, first at T1.
        self._timer_e = self._layer.clock.call_later(self._interval, self._fire_timer_e)

    def _fire_timer_e(self) -> None:
        self._timer_e = None
        if self.state not in (State.TRYING, State.PROCEEDING):
            return
        layer = self._layer
        # §17.1.2.2: doubling up to T2 while Trying; T2 once Proceeding.
        if self.state is State.TRYING:
            self._interval = min(self._interval * 2, layer.timers.t2)
        else:
            self._interval = layer.timers.t2
        self.retransmissions += 1
        layer.stats.requests_retransmitted += 1
        try:
            layer.send(self.request.data, self.target, self._transport_error)
        except (OSError, TransportError) as exc:
            self._transport_error(exc)
            return
        if self.state in (State.TRYING, State.PROCEEDING):
            self._timer_e = layer.clock.call_later(self._interval, self._fire_timer_e)

    def _on_response(self, response: SipResponse) -> None:
        if self.state not in (State.TRYING, State.PROCEEDING):
            self._layer.stats.responses_absorbed += 1  # a retransmitted final (Timer K)
            return
        if response.status < 200:
            self.state = State.PROCEEDING
            self.provisional = response
            return
        self.state = State.COMPLETED
        self._cancel_timer_e()
        self._complete(ClientResult(response.status, response.reason, response))
        self._layer._client_completed(self)

    def _timeout(self) -> None:
        # Timer F (§17.1.2.2): the TU is told of a timeout, i.e. a 408.
        if self.state not in (State.TRYING, State.PROCEEDING):
            return
        self._layer.stats.client_timeouts += 1
        log.debug(
            "event=client_timeout method=%s call_id=%s target=%s:%s",
            self.request.method,
            self.request.call_id,
            self.target.host,
            self.target.port,
        )
        self._terminate(ClientResult(408, "Request Timeout", None))

    def _transport_error(self, exc: BaseException) -> None:
        # §17.1.4 / §8.1.3.1: a transport failure is reported as a 503.
        if self.state not in (State.TRYING, State.PROCEEDING):
            return
        self._layer.stats.transport_errors += 1
        log.info(
            "event=send_failed method=%s call_id=%s target=%s:%s/%s error=%r",
            self.request.method,
            self.request.call_id,
            self.target.host,
            self.target.port,
            self.target.transport,
            exc,
        )
        self._terminate(ClientResult(503, "Service Unavailable", None))

    def _terminate(self, result: ClientResult) -> None:
        self.state = State.TERMINATED
        self._cancel_timer_e()
        self._layer._client_terminated(self)
        self._complete(result)

    def _cancel_timer_e(self) -> None:
        if self._timer_e is not None:
            self._timer_e.cancel()
            self._timer_e = None

    def _complete(self, result: ClientResult) -> None:
        if self.result is not None:  # exactly once, whatever races
            return
        self.result = result
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._run_callback(callback, result)

    @staticmethod
    def _run_callback(callback: DoneCallback, result: ClientResult) -> None:
        try:
            callback(result)
        except Exception:  # a TU bug must not break the transaction machinery
            log.exception("event=client_callback_failed status=%d", result.status)

    def __repr__(self) -> str:
        return (
            f"ClientTransaction({self.request.method} branch={self.request.branch} "
            f"state={self.state.value})"
        )
