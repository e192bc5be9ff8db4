"""Non-INVITE server transactions: retransmissions absorbed, responses replayed, Timer J."""

from __future__ import annotations

import asyncio

import pytest

from msilo.errors import ParseError, TooManyHops
from msilo.sip.message import SipRequest, SipResponse
from msilo.sip.parser import parse_message_py
from msilo.transaction import ServerTransaction, State, server_key

from .fakes import PEER, FakeNetwork, Holding, RecordingHandler, duplicating, make_request


def _response(data: bytes) -> SipResponse:
    message = parse_message_py(data)
    assert isinstance(message, SipResponse)
    return message


def test_retransmission_is_answered_with_the_same_response_and_no_new_work() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(202, "Accepted")
    layer = net.make_layer(handler)
    request = make_request()
    net.deliver(request)
    net.deliver(request)
    net.deliver(request)
    assert len(handler.calls) == 1
    assert len(net.replies) == 3
    assert net.replies[0].data == net.replies[1].data == net.replies[2].data
    assert _response(net.replies[0].data).status == 202
    assert layer.stats.responses_replayed == 2
    assert layer.stats.requests == 1


def test_retransmission_while_processing_is_absorbed_silently() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)  # answers later
    layer = net.make_layer(handler)
    request = make_request()
    net.deliver(request)
    net.deliver(request)
    assert len(handler.calls) == 1 and net.replies == []
    assert layer.stats.retransmissions_absorbed == 1
    txn = handler.calls[0][1]
    assert txn.respond(202, "Accepted")
    net.deliver(request)
    assert [_response(r.data).status for r in net.replies] == [202, 202]


def test_retransmission_after_a_provisional_replays_the_provisional() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)
    net.make_layer(handler)
    request = make_request()
    net.deliver(request)
    handler.calls[0][1].respond(100, "Trying")
    assert handler.calls[0][1].state is State.PROCEEDING
    net.deliver(request)
    assert [_response(r.data).status for r in net.replies] == [100, 100]
    assert net.replies[0].data == net.replies[1].data


def test_duplicated_datagrams_reach_the_handler_once() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    net.make_layer(handler)
    net.route_packet = duplicating("in")
    net.deliver(make_request())
    assert len(handler.calls) == 1
    assert len(net.replies) == 2


def test_reordered_requests_each_get_their_own_transaction() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    net.make_layer(handler)
    hold = Holding(net)
    net.route_packet = hold
    first = make_request(branch="z9hG4bK-1", cseq=1)
    second = make_request(branch="z9hG4bK-2", cseq=2)
    net.deliver(first)
    net.deliver(second)
    net.deliver(first)  # a retransmission of the first, overtaken by the second
    hold.release([1, 0, 2])
    assert [r.cseq.number for r, _ in handler.calls if r.cseq] == [2, 1]
    assert len(net.replies) == 3


def test_timer_j_keeps_the_transaction_64_t1_over_udp_then_removes_it() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    layer = net.make_layer(handler)
    request = make_request()
    net.deliver(request)
    net.clock.advance(31.9)
    net.deliver(request)
    assert len(handler.calls) == 1 and layer.server_count == 1
    net.clock.advance(0.1)
    assert layer.server_count == 0
    assert handler.calls[0][1].final  # the layer, not the object, waited out Timer J
    net.deliver(request)  # past Timer J: a new request as far as we can tell
    assert len(handler.calls) == 2


def test_timer_j_is_zero_over_tcp() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    layer = net.make_layer(handler)
    net.deliver(make_request(via_transport="TCP"), transport="TCP")
    assert layer.server_count == 0 and layer.pending == 0
    assert len(net.replies) == 1


def test_same_branch_with_another_method_is_another_transaction() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    net.make_layer(handler)
    net.deliver(make_request("MESSAGE", branch="z9hG4bK-x"))
    net.deliver(make_request("CANCEL", branch="z9hG4bK-x", body=b""))
    assert [r.method for r, _ in handler.calls] == ["MESSAGE", "CANCEL"]


def test_rfc2543_requests_match_on_the_fallback_key() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    layer = net.make_layer(handler)
    old = make_request(branch="old-style-1")  # no magic cookie
    net.deliver(old)
    net.deliver(old)
    assert len(handler.calls) == 1 and layer.stats.responses_replayed == 1
    net.deliver(make_request(branch="old-style-1", cseq=2))  # new CSeq: new request
    assert len(handler.calls) == 2
    key = server_key(handler.calls[0][0])
    assert isinstance(key, tuple) and key[0] == "2543"


def test_rfc3261_key_is_branch_sent_by_and_method() -> None:
    def key(data: bytes) -> object:
        request = parse_message_py(data)
        assert isinstance(request, SipRequest)
        return server_key(request)

    base = key(make_request(branch="z9hG4bK-k"))
    assert base == key(make_request(branch="z9hG4bK-k", call_id="other", cseq=9))
    assert base != key(make_request(branch="z9hG4bK-k2"))
    assert base != key(make_request("OPTIONS", branch="z9hG4bK-k"))
    moved = make_request(branch="z9hG4bK-k").replace(b"192.0.2.10:5070", b"192.0.2.11:5070")
    assert base != key(moved)
    ported = make_request(branch="z9hG4bK-k").replace(b"192.0.2.10:5070", b"192.0.2.10:5071")
    assert base != key(ported)


def test_unmatched_ack_is_dropped_without_calling_the_handler() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    layer = net.make_layer(handler)
    net.deliver(make_request("ACK", body=b""))
    assert handler.calls == [] and net.replies == []
    assert layer.stats.acks_dropped == 1


def test_ack_for_an_answered_invite_is_absorbed() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(405, "Method Not Allowed")
    net.make_layer(handler)
    net.deliver(make_request("INVITE", branch="z9hG4bK-inv", body=b""))
    net.deliver(make_request("ACK", branch="z9hG4bK-inv", body=b""))
    assert len(handler.calls) == 1


def test_response_carries_received_and_rport_of_the_source() -> None:
    net = FakeNetwork()
    net.make_layer(RecordingHandler())
    net.deliver(make_request(), addr=("203.0.113.9", 61000))
    response = _response(net.replies[0].data)
    assert response.via is not None
    assert response.via.received == "203.0.113.9" and response.via.rport == 61000
    assert net.replies[0].addr == ("203.0.113.9", 61000)
    # The reply handle sees the request's Via (with its bare rport) to route by.
    assert net.replies[0].via is not None and "rport" in net.replies[0].via.params


def test_responses_of_one_transaction_share_a_to_tag() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)
    net.make_layer(handler)
    net.deliver(make_request())
    txn = handler.calls[0][1]
    txn.respond(180, "Ringing")
    txn.respond(200, "OK")
    tags = [_response(r.data).to.tag for r in net.replies]  # type: ignore[union-attr]
    assert tags[0] is not None and tags[0] == tags[1]


def test_second_final_response_is_refused() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)
    net.make_layer(handler)
    net.deliver(make_request())
    txn = handler.calls[0][1]
    assert txn.respond(202, "Accepted") is True
    assert txn.respond(500, "Server Internal Error") is False
    assert len(net.replies) == 1


def test_handler_sip_error_becomes_its_response() -> None:
    net = FakeNetwork()

    def handler(request: SipRequest, txn: ServerTransaction) -> None:
        raise TooManyHops("max-forwards reached 0")

    net.make_layer(handler)
    net.deliver(make_request())
    assert _response(net.replies[0].data).status == 483


def test_handler_bug_becomes_500_and_is_counted() -> None:
    net = FakeNetwork()

    def handler(request: SipRequest, txn: ServerTransaction) -> None:
        raise RuntimeError("bug")

    layer = net.make_layer(handler)
    net.deliver(make_request())
    assert _response(net.replies[0].data).status == 500
    assert layer.stats.handler_errors == 1


async def test_async_handler_runs_once_and_retransmissions_wait_for_it() -> None:
    net = FakeNetwork()
    release = asyncio.Event()
    calls: list[SipRequest] = []

    async def handler(request: SipRequest, txn: ServerTransaction) -> None:
        calls.append(request)
        await release.wait()
        txn.respond(202, "Accepted")

    layer = net.make_layer(handler)
    request = make_request()
    net.deliver(request)
    await asyncio.sleep(0)
    net.deliver(request)
    assert len(calls) == 1 and net.replies == [] and layer.pending == 1
    release.set()
    assert await layer.drain(1.0)
    net.deliver(request)
    assert [_response(r.data).status for r in net.replies] == [202, 202]
    assert layer.pending == 0


async def test_async_handler_exception_is_answered() -> None:
    net = FakeNetwork()

    async def handler(request: SipRequest, txn: ServerTransaction) -> None:
        await asyncio.sleep(0)
        raise TooManyHops()

    layer = net.make_layer(handler)
    net.deliver(make_request())
    await layer.drain(1.0)
    assert _response(net.replies[0].data).status == 483


def test_too_many_pending_requests_get_503_with_retry_after() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)
    layer = net.make_layer(handler, max_pending=2)
    for i in range(3):
        net.deliver(make_request(branch=f"z9hG4bK-{i}", cseq=i + 1))
    assert len(handler.calls) == 2
    busy = _response(net.replies[0].data)
    assert busy.status == 503 and busy.get_header("retry-after") == "5"
    assert layer.stats.rejected_busy == 1


def test_unanswered_transaction_is_abandoned_eventually() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)
    layer = net.make_layer(handler)
    net.deliver(make_request())
    net.clock.advance(64.0)
    assert layer.server_count == 0 and layer.pending == 0
    assert layer.stats.abandoned == 1
    assert handler.calls[0][1].respond(202, "Accepted") is False


def test_answered_transactions_leave_no_abandon_deadline_and_go_at_timer_j() -> None:
    # At thousands of requests a second every byte a completed transaction keeps for
    # Timer J counts (the soak's worker memory): an answered request must not also
    # carry its abandon deadline (2·Timer F) around.
    net = FakeNetwork()
    handler = RecordingHandler(202, "Accepted")
    layer = net.make_layer(handler)
    for n in range(50):
        net.deliver(make_request(branch=f"z9hG4bK-many-{n}"))
    assert len(layer._abandon) == 0 and layer.server_count == 50
    net.clock.advance(31.0)
    assert layer.server_count == 50  # Timer J (32 s over UDP) has not fired
    net.clock.advance(1.5)
    assert layer.server_count == 0 and layer.stats.abandoned == 0


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d.replace(b"Call-ID: txn-1@example.com\r\n", b""), "no Call-ID"),
        (lambda d: d.replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 OPTIONS"), "CSeq method mismatch"),
    ],
)
def test_request_missing_essentials_is_a_parse_error(mutate: object, why: str) -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    net.make_layer(handler)
    with pytest.raises(ParseError):
        net.deliver(mutate(make_request()))  # type: ignore[operator]
    assert handler.calls == []


def test_a_completed_udp_transaction_keeps_only_what_the_replay_needs() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    net.make_layer(handler)
    net.deliver(make_request(), addr=("203.0.113.9", 61000))
    [(_, txn)] = handler.calls
    # The parsed request is let go (Timer J would otherwise keep it 32 s: GC pauses).
    assert txn.request is None and txn.method == "MESSAGE" and txn.call_id == "txn-1@example.com"
    net.deliver(make_request(), addr=("203.0.113.9", 61000))
    assert [r.data for r in net.replies] == [net.replies[0].data] * 2
    assert net.replies[1].addr == ("203.0.113.9", 61000)  # rport: back to the source port
    assert len(handler.calls) == 1


def test_a_replay_without_rport_goes_to_the_via_port() -> None:
    net = FakeNetwork()
    handler = RecordingHandler()
    net.make_layer(handler)
    request = make_request(rport=False)
    net.deliver(request, addr=("203.0.113.9", 61000))
    net.deliver(request, addr=("203.0.113.9", 61000))
    # RFC 3261 §18.2.2: no rport -> the source IP and the sent-by port of the Via.
    assert net.replies[1].addr == ("203.0.113.9", PEER[1])
    assert net.replies[1].data == net.replies[0].data


def test_a_refused_new_request_gets_a_stateless_503_and_leaves_nothing_behind() -> None:
    net = FakeNetwork()
    handler = RecordingHandler(status=None)  # the admitted request answers later
    layer = net.make_layer(handler)
    overloaded = [False]
    layer.shed = lambda request: overloaded[0]
    admitted, refused = make_request(), make_request(branch="z9hG4bK-c2", call_id="other@x")
    net.deliver(admitted)
    overloaded[0] = True
    net.deliver(refused)
    net.deliver(admitted)  # a retransmission of the admitted one: absorbed, never refused
    assert len(handler.calls) == 1
    [reply] = net.replies
    response = _response(reply.data)
    assert (response.status, response.get_header("retry-after")) == (503, "5")
    assert response.call_id == "other@x" and response.to is not None and response.to.tag
    assert response.via is not None and response.via.received == PEER[0]  # §18.2.1
    assert layer.stats.stateless_responses == 1 and layer.stats.requests == 1
    net.deliver(refused)  # its retransmission is judged again: no transaction was kept
    assert layer.stats.stateless_responses == 2
    overloaded[0] = False
    net.deliver(refused)
    assert len(handler.calls) == 2  # admitted now
