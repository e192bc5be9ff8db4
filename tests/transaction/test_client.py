"""Non-INVITE client transactions: Timers E/F/K, exactly-once completion, transport errors."""

from __future__ import annotations

import itertools

import pytest

from msilo.errors import TransportError
from msilo.sip.build import build_request
from msilo.sip.message import SipRequest
from msilo.sip.parser import parse_message_py
from msilo.transaction import ClientResult, ClientTransaction, State, TransactionLayer
from msilo.transport.base import Target

from .fakes import FakeNetwork, RecordingHandler, dropping

UDP_TARGET = Target("192.0.2.20", 5062, "UDP")
TCP_TARGET = Target("192.0.2.20", 5062, "TCP")


def _start(
    net: FakeNetwork, target: Target = UDP_TARGET, results: list[ClientResult] | None = None
) -> ClientTransaction:
    layer = net.layer or net.make_layer(RecordingHandler())
    out = build_request(
        "MESSAGE",
        "sip:bob@192.0.2.20:5062",
        from_="sip:msilo@example.com",
        to="sip:bob@example.com",
        sent_by=("198.51.100.1", 40000),
        transport=target.transport,
        body=b"stored message",
        content_type="text/plain",
    )
    txn = layer.start_client(out, target)
    if results is not None:
        txn.add_done_callback(results.append)
    return txn


def _layer(net: FakeNetwork) -> TransactionLayer:
    assert net.layer is not None
    return net.layer


def test_timer_e_retransmits_at_t1_doubling_to_t2() -> None:
    net = FakeNetwork()
    _start(net)
    for _ in range(3300):
        net.clock.advance(0.01)
    times = [round(s.time, 2) for s in net.sent]
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(s.data == net.sent[0].data for s in net.sent)  # same bytes, same branch


def test_timer_f_completes_with_a_local_408_exactly_once() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    txn = _start(net, results=results)
    net.clock.advance(31.99)
    assert results == [] and not txn.done
    net.clock.advance(0.01)
    assert len(results) == 1
    assert results[0].status == 408 and results[0].local and results[0].response is None
    sends = len(net.sent)
    net.clock.advance(100)
    assert len(results) == 1 and len(net.sent) == sends
    assert _layer(net).client_count == 0 and _layer(net).stats.client_timeouts == 1


def test_provisional_does_not_complete_and_switches_timer_e_to_t2() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    txn = _start(net, results=results)
    net.clock.advance(0.2)
    net.answer(net.sent[0], 100, "Trying")
    assert results == [] and txn.state is State.PROCEEDING
    assert txn.provisional is not None and txn.provisional.status == 100
    net.clock.advance(9.0)
    times = [round(s.time, 2) for s in net.sent]
    # §17.1.2.2: in Proceeding, Timer E fires every T2 after the pending T1 firing.
    assert times == [0.0, 0.5, 4.5, 8.5]
    net.answer(net.sent[0], 200, "OK")
    assert [r.status for r in results] == [200]


def test_final_response_completes_once_and_its_retransmissions_are_absorbed() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    txn = _start(net, results=results)
    net.answer(net.sent[0], 200, "OK")
    net.answer(net.sent[0], 200, "OK")
    net.answer(net.sent[0], 500, "Server Internal Error")
    assert len(results) == 1 and results[0].status == 200 and results[0].success
    assert results[0].response is not None and not results[0].local
    assert txn.state is State.COMPLETED
    assert _layer(net).stats.responses_absorbed == 2
    net.clock.advance(10)
    assert len(net.sent) == 1  # no retransmission after the final response


def test_late_2xx_after_timeout_is_ignored() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    _start(net, results=results)
    first = net.sent[0]
    net.clock.advance(32)
    net.answer(first, 200, "OK")
    assert [r.status for r in results] == [408]
    assert _layer(net).stats.stray_responses == 1


def test_timer_k_absorbs_for_t4_over_udp_then_removes() -> None:
    net = FakeNetwork()
    txn = _start(net)
    net.answer(net.sent[0], 202, "Accepted")
    layer = _layer(net)
    net.clock.advance(4.9)
    assert layer.client_count == 1
    net.clock.advance(0.1)
    assert layer.client_count == 0 and txn.state is State.TERMINATED


def test_tcp_has_no_timer_e_and_zero_timer_k() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    _start(net, TCP_TARGET, results)
    net.clock.advance(20)
    assert len(net.sent) == 1
    net.answer(net.sent[0], 200, "OK")
    assert _layer(net).client_count == 0 and [r.status for r in results] == [200]


def test_tcp_still_times_out_with_timer_f() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    _start(net, TCP_TARGET, results)
    net.clock.advance(32)
    assert [r.status for r in results] == [408]


@pytest.mark.parametrize(
    "error", [OSError("network unreachable"), TransportError("cannot resolve nowhere.invalid")]
)
def test_send_that_cannot_start_fails_at_once_with_503(error: Exception) -> None:
    net = FakeNetwork()
    net.make_layer(RecordingHandler())
    net.fail_send = error
    txn = _start(net)
    assert txn.done and txn.result is not None
    assert txn.result.status == 503 and txn.result.local
    late: list[ClientResult] = []
    txn.add_done_callback(late.append)  # registered after completion: called at once
    assert [r.status for r in late] == [503]
    net.clock.advance(60)
    assert len(late) == 1 and _layer(net).client_count == 0


def test_later_transport_error_completes_with_503_once() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    _start(net, TCP_TARGET, results)
    net.sent[0].on_error(TransportError("connection refused"))
    net.sent[0].on_error(TransportError("again"))
    net.answer(net.sent[0], 200, "OK")
    assert [r.status for r in results] == [503]


def test_lost_request_is_retransmitted_and_then_answered() -> None:
    net = FakeNetwork()
    net.make_layer(RecordingHandler())
    net.route_packet = dropping(1, "out")
    results: list[ClientResult] = []
    _start(net, results=results)
    assert net.sent == []
    net.clock.advance(0.5)
    assert len(net.sent) == 1
    net.answer(net.sent[0], 202, "Accepted")
    assert [r.status for r in results] == [202]


def test_lost_response_is_recovered_by_a_retransmission() -> None:
    net = FakeNetwork()
    net.make_layer(RecordingHandler())
    results: list[ClientResult] = []
    _start(net, results=results)
    net.route_packet = dropping(1, "in")
    net.answer(net.sent[0], 200, "OK")  # lost
    assert results == []
    net.clock.advance(0.5)
    net.answer(net.sent[-1], 200, "OK")
    assert [r.status for r in results] == [200]


def test_response_must_match_branch_and_cseq_method() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    _start(net, results=results)
    sent = net.sent[0]
    other_method = sent.data.replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 OPTIONS").replace(
        b"MESSAGE sip:", b"OPTIONS sip:", 1
    )
    net.answer(type(sent)(other_method, sent.target, sent.time, sent.on_error), 200, "OK")
    other_branch = sent.data.replace(b"branch=z9hG4bK", b"branch=z9hG4bKx", 1)
    net.answer(type(sent)(other_branch, sent.target, sent.time, sent.on_error), 200, "OK")
    assert results == [] and _layer(net).stats.stray_responses == 2


def test_callback_exception_does_not_break_completion() -> None:
    net = FakeNetwork()
    results: list[ClientResult] = []
    txn = _start(net)

    def broken(result: ClientResult) -> None:
        raise RuntimeError("tu bug")

    txn.add_done_callback(broken)
    txn.add_done_callback(results.append)
    net.answer(net.sent[0], 200, "OK")
    assert [r.status for r in results] == [200]


async def test_wait_returns_the_outcome() -> None:
    net = FakeNetwork()
    txn = _start(net)
    net.answer(net.sent[0], 486, "Busy Here")
    result = await txn.wait()
    assert result.status == 486 and not result.success


def test_request_builds_our_via_and_switches_big_udp_requests_to_tcp() -> None:
    net = FakeNetwork()
    layer = net.make_layer(RecordingHandler())
    small = layer.request(
        "MESSAGE",
        "sip:bob@192.0.2.20",
        UDP_TARGET,
        from_="sip:msilo@example.com",
        to="sip:bob@example.com",
        body=b"x" * 100,
        content_type="text/plain",
    )
    big = layer.request(
        "MESSAGE",
        "sip:bob@192.0.2.20",
        UDP_TARGET,
        from_="sip:msilo@example.com",
        to="sip:bob@example.com",
        body=b"x" * 1400,
        content_type="text/plain",
    )
    pinned = layer.request(
        "MESSAGE",
        "sip:bob@192.0.2.20;transport=udp",
        UDP_TARGET._replace(explicit=True),
        from_="sip:msilo@example.com",
        to="sip:bob@example.com",
        body=b"x" * 1400,
    )
    vias = []
    for sent in net.sent:
        request = parse_message_py(sent.data)
        assert isinstance(request, SipRequest) and request.via is not None
        vias.append(
            (sent.target.transport, request.via.transport, request.via.host, request.via.port)
        )
    assert vias == [
        ("UDP", "UDP", "198.51.100.1", 40000),
        ("TCP", "TCP", "198.51.100.1", 40000),
        ("UDP", "UDP", "198.51.100.1", 40000),
    ]
    assert big.request.transport == "TCP" and small.request.transport == "UDP"
    assert pinned.request.transport == "UDP"
    net.clock.advance(0.5)
    # Timer E (T1) only for the two UDP ones.
    assert [s.target.transport for s in net.sent[3:]] == ["UDP", "UDP"]
