"""Parser benchmarks: the C parser vs its pure-Python twin vs sippy, on typical requests.

Run: ``pytest bench/bench_parse.py --benchmark-only`` (add ``--benchmark-group-by=group``).
Each workload is data (below); every benchmarked function reads the same fields, and a
check before timing proves that the work really happened (the values are right).
Targets (DESIGN/brief): C parse + fields >= 30x sippy and >= 10x the twin on MESSAGE;
C parse + normalize_aor(To) <= ~3.5 us.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import pytest

from msilo.sip import parser as selector

# A typical 450-byte MESSAGE from a softphone (RFC 3428 §10 style).
MESSAGE = (
    b"MESSAGE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---a7f1c3d2e9b04f61;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:alice@example.com>;tag=9fxced76sl\r\n'
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: 3848276298220188511@192.0.2.10\r\n"
    b"CSeq: 20 MESSAGE\r\n"
    b"User-Agent: Linphone/5.2.5 (belle-sip/5.2.4)\r\n"
    b"Date: Tue, 14 May 2024 10:12:00 GMT\r\n"
    b"Content-Type: text/plain;charset=UTF-8\r\n"
    b"Content-Length: 34\r\n"
    b"\r\n"
    b"Hello Bob, are you there? Call me."
)

# A typical REGISTER with an RFC 5626 instance and an Allow list.
REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.10:52341;branch=z9hG4bK-524287-1---3b1f7c9e0d;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'Contact: <sip:bob@192.0.2.10:52341;transport=tcp;ob>;+sip.instance="<urn:uuid:'
    b'f81d4fae-7dec-11d0-a765-00a0c91e6bf6>";reg-id=1;expires=3600\r\n'
    b"To: <sip:bob@example.com>\r\n"
    b"From: <sip:bob@example.com>;tag=2a8b7e1f\r\n"
    b"Call-ID: 5f1c2b7e9d0a4c6b8e3f1a2d7c9b0e4f\r\n"
    b"CSeq: 7 REGISTER\r\n"
    b"Expires: 3600\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE\r\n"
    b"Supported: replaces, outbound, gruu\r\n"
    b"User-Agent: Zoiper rv2.10.20.4\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

WORKLOADS = {"MESSAGE": MESSAGE, "REGISTER": REGISTER}
EXPECTED = {
    "MESSAGE": (
        "sip:alice@example.com",
        "9fxced76sl",
        "sip:bob@example.com",
        "z9hG4bK-524287-1---a7f1c3d2e9b04f61",
        20,
        "3848276298220188511@192.0.2.10",
    ),
    "REGISTER": (
        "sip:bob@example.com",
        "2a8b7e1f",
        "sip:bob@example.com",
        "z9hG4bK-524287-1---3b1f7c9e0d",
        7,
        "5f1c2b7e9d0a4c6b8e3f1a2d7c9b0e4f",
    ),
}


def msilo_fields(parse: Callable[[bytes], Any]) -> Callable[[bytes], tuple[Any, ...]]:
    """Parse, then read From (URI, tag), To (URI), Via (branch, host), CSeq and Call-ID."""

    def run(data: bytes) -> tuple[Any, ...]:
        msg = parse(data)
        via = msg.via
        _ = via.host
        return (msg.from_.uri, msg.from_.tag, msg.to.uri, via.branch, msg.cseq.number, msg.call_id)

    return run


def sippy_fields(data: bytes) -> tuple[Any, ...]:
    """The same through sippy: SipRequest(buf=...) then the same header fields."""
    from sippy.SipRequest import SipRequest

    req = SipRequest(buf=data.decode("utf-8"))
    frm = req.getHFBody("from")
    via = req.getHFBody("via")
    _ = via.getTAddr()
    return (
        str(frm.getUrl()),
        frm.getTag(),
        str(req.getHFBody("to").getUrl()),
        via.getBranch(),
        req.getHFBody("cseq").getCSeqNum(),
        req.getHFBody("call-id").body,
    )


IMPLS: dict[str, Callable[[bytes], tuple[Any, ...]]] = {
    "py": msilo_fields(selector.parse_message_py),
    "sippy": sippy_fields,
}
if selector._fastparse is not None:
    IMPLS["c"] = msilo_fields(selector.parse_message_c)


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    machine_info["msilo_parser"] = selector.IMPLEMENTATION  # pragma: no cover


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_parse_and_read_fields(benchmark: Any, workload: str, impl: str) -> None:
    if impl == "sippy":
        pytest.importorskip("sippy")
    data = WORKLOADS[workload]
    func = IMPLS[impl]
    assert func(data) == EXPECTED[workload]  # the work really happens
    benchmark.group = f"parse {workload} ({len(data)} bytes) + read fields"
    benchmark.extra_info["python"] = platform.python_version()
    benchmark(func, data)


@pytest.mark.parametrize("impl", ["c", "py"])
def test_parse_and_normalize_aor(benchmark: Any, impl: str) -> None:
    if impl == "c" and selector._fastparse is None:
        pytest.skip("msilo._fastparse is not built")
    parse = getattr(selector, f"parse_message_{impl}")
    normalize = getattr(selector, f"normalize_aor_{impl}")

    def run(data: bytes) -> str:
        return normalize(parse(data).to.uri)  # type: ignore[no-any-return]

    assert run(MESSAGE) == "bob@example.com"
    benchmark.group = "parse MESSAGE + normalize_aor(To)"
    benchmark(run, MESSAGE)
