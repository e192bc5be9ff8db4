"""Locating next hops by name (RFC 3263 §4.2, RFC 2782) against a real DNS server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from msilo.config import load_config
from msilo.errors import ConfigError, TransportError
from msilo.sip.parser import parse_uri
from msilo.transport import Target
from msilo.transport import dns as dns_module
from msilo.transport.dns import Resolver, parse_nameserver, srv_order
from msilo.transport.manager import Transports
from msilo.transport.tls import client_context
from tests.dnsserver import dns_server, needs_dnsmasq
from tests.service.sipua import free_port

from .conftest import MiniServer


async def _options(server: MiniServer, uri: str) -> int:
    txn = server.layer.request(
        "OPTIONS",
        uri,
        Target.from_uri(parse_uri(uri)),
        from_="sip:msilo@127.0.0.1",
        to=uri,
    )
    result = await asyncio.wait_for(txn.wait(), 10)
    return result.status


def test_a_uri_names_srv_lookup_only_for_a_host_name_without_port() -> None:
    assert Target.from_uri(parse_uri("sip:proxy.example.com")).srv
    assert Target.from_uri(parse_uri("sips:proxy.example.com;transport=tcp")).srv
    assert not Target.from_uri(parse_uri("sip:proxy.example.com:5070")).srv
    assert not Target.from_uri(parse_uri("sip:192.0.2.1")).srv
    assert not Target.from_uri(parse_uri("sip:[2001:db8::1]")).srv


@needs_dnsmasq
async def test_srv_records_lead_to_the_server(server: MiniServer) -> None:
    srv = [("_sip._udp.svc.test", "host.svc.test", server.port, 10, 0)]
    with dns_server(srv=srv, hosts=[("host.svc.test", "127.0.0.1")]) as dns:
        server.transports.resolver = Resolver([dns])
        assert await _options(server, "sip:svc.test") == 200
    [(request, transport, _)] = server.seen
    assert transport == "UDP" and request.uri == "sip:svc.test"


@needs_dnsmasq
async def test_over_tcp_a_refused_srv_target_moves_on_to_the_next(server: MiniServer) -> None:
    dead = free_port()  # nothing listens there: the connection is refused
    srv = [
        ("_sip._tcp.svc.test", "gone.example", dead, 5, 0),  # its lookup fails: skipped
        ("_sip._tcp.svc.test", "first.svc.test", dead, 10, 0),
        ("_sip._tcp.svc.test", "second.svc.test", server.port, 20, 0),
        ("_sip._udp.svc.test", "first.svc.test", dead, 10, 0),  # not this transport's
    ]
    hosts = [("first.svc.test", "127.0.0.1"), ("second.svc.test", "127.0.0.1")]
    with dns_server(srv=srv, hosts=hosts) as dns:
        server.transports.resolver = Resolver([dns])
        assert await _options(server, "sip:svc.test;transport=tcp") == 200
    [(_, transport, _)] = server.seen
    assert transport == "TCP"


@needs_dnsmasq
async def test_without_srv_records_the_name_is_used_on_the_uri_port(server: MiniServer) -> None:
    # SRV records exist but a port in the URI means "this host, this port" (RFC 3263 §4.2).
    srv = [("_sip._udp.host.svc.test", "host.svc.test", free_port(), 10, 0)]
    with dns_server(srv=srv, hosts=[("host.svc.test", "127.0.0.1")]) as dns:
        server.transports.resolver = Resolver([dns])
        assert await _options(server, f"sip:host.svc.test:{server.port}") == 200
        # No SRV records at all: the A record on the port.
        assert await _options(server, f"sip:host.svc.test:{server.port};transport=tcp") == 200
    assert [t for _, t, _ in server.seen] == ["UDP", "TCP"]


@needs_dnsmasq
async def test_an_unknown_name_completes_the_request_with_a_local_503(
    server: MiniServer,
) -> None:
    with dns_server() as dns:
        server.transports.resolver = Resolver([dns])
        txn = server.layer.request(
            "MESSAGE", "sip:bob@nowhere.test", Target.from_uri(parse_uri("sip:bob@nowhere.test")),
            from_="sip:msilo@127.0.0.1", to="sip:bob@nowhere.test",
        )  # fmt: skip
        result = await asyncio.wait_for(txn.wait(), 10)
    assert result.status == 503 and result.local
    assert server.seen == []


def test_srv_order_is_by_priority_then_weighted_at_random() -> None:
    records = [(20, 0, 5060, "backup"), (10, 90, 5060, "big"), (10, 10, 5060, "small")]
    rng = random.Random(7)
    firsts = Counter(srv_order(records, rng)[0][0] for _ in range(2000))
    assert set(firsts) == {"big", "small"}  # priority 20 is never first
    assert 0.85 < firsts["big"] / 2000 < 0.95  # weights 90:10
    assert all(srv_order(records, rng)[-1] == ("backup", 5060) for _ in range(50))


def test_nameserver_addresses() -> None:
    assert parse_nameserver("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5300") == ("::1", 5300)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    for bad in ("dns.example.com", "10.0.0.2:x", "10.0.0.2:70000", "[::1]5300"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_bad_dns_settings_are_one_config_line() -> None:
    with pytest.raises(ConfigError, match=r"server.dns: 'dns.example.com' is not a DNS server"):
        load_config(overrides=['server.dns=["dns.example.com"]'])
    with pytest.raises(ConfigError, match="same port"):
        load_config(overrides=['server.dns=["10.0.0.2", "10.0.0.3:5353"]'])
    assert load_config(overrides=['server.dns=["10.0.0.2"]']).server.dns == ("10.0.0.2",)


def _certificate(where: Path, name: str) -> tuple[str, str]:
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@needs_dnsmasq
@pytest.mark.parametrize(("certified", "delivered"), [("tls.test", True), ("other.test", False)])
async def test_tls_found_by_srv_checks_the_certificate_against_the_uri_domain(
    tmp_path: Path, certified: str, delivered: bool
) -> None:
    # RFC 5922 §4: the certificate must name the domain of the URI (tls.test), not the SRV
    # target (edge.tls.test) or the address the connection goes to.
    cert, key = _certificate(tmp_path, certified)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            arrived.put_nowait(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    tls_server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=server_context)
    port = tls_server.sockets[0].getsockname()[1]
    transports = Transports()
    transports.configure_tls(None, client_context(cert))
    errors: list[BaseException] = []
    try:
        srv = [("_sips._tcp.tls.test", "edge.tls.test", port, 10, 0)]
        with dns_server(srv=srv, hosts=[("edge.tls.test", "127.0.0.1")]) as dns:
            transports.resolver = Resolver([dns])
            target = Target.from_uri(parse_uri("sips:bob@tls.test"))
            transports.send(b"OPTIONS sips:bob@tls.test SIP/2.0\r\n\r\n", target, errors.append)
            if delivered:
                assert (await asyncio.wait_for(arrived.get(), 5)).startswith(b"OPTIONS")
                assert errors == []
            else:
                async with asyncio.timeout(5):
                    while not errors:
                        await asyncio.sleep(0.02)
                assert "certificate" in str(errors[0]).lower()
                assert arrived.empty()
    finally:
        await transports.close()
        tls_server.close()
        await tls_server.wait_closed()


@needs_dnsmasq
async def test_a_failing_srv_lookup_falls_back_to_the_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # dnsmasq refuses SRV queries outside .test (no upstream), but knows this host's address.
    with dns_server(hosts=[("sip.example", "127.0.0.1")]) as dns:
        resolver = Resolver([dns])
        with caplog.at_level(logging.WARNING, logger="msilo.transport"):
            found = await resolver.locate(Target.from_uri(parse_uri("sip:bob@sip.example")))
    assert found == [("127.0.0.1", 5060)]
    assert "event=srv_lookup_failed name=_sip._udp.sip.example" in caplog.text


async def test_a_dns_server_that_never_answers_fails_the_lookup_in_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dns_module, "LOOKUP_TIMEOUT", 0.3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never replies
        silent.bind(("127.0.0.1", 0))
        resolver = Resolver([f"127.0.0.1:{silent.getsockname()[1]}"])
        target = Target.from_uri(parse_uri("sip:bob@proxy.example"))
        started = asyncio.get_running_loop().time()
        with (
            caplog.at_level(logging.WARNING, logger="msilo.transport"),
            pytest.raises(TransportError, match=r"cannot resolve proxy\.example"),
        ):
            await resolver.locate(target)
        elapsed = asyncio.get_running_loop().time() - started
    # The SRV lookup times out and falls back to A/AAAA, which time out too: no hang.
    assert "event=srv_lookup_failed" in caplog.text
    assert elapsed < 3
