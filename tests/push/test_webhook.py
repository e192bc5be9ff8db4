"""The webhook provider against a real HTTP receiver: templates, quoting, and how each answer
becomes an outcome."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from msilo.push.base import PushOutcome, send_with_retries
from msilo.push.webhook import WebhookProvider
from tests.push.fakes import FakeWebhook, TlsFiles
from tests.push.helpers import push_config, request


@pytest.fixture
async def make_provider() -> AsyncIterator[Any]:
    made: list[WebhookProvider] = []

    def make(**table: Any) -> WebhookProvider:
        config = push_config(webhook=table).webhook
        assert config is not None
        provider = WebhookProvider(config)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def test_the_default_body_carries_every_field_as_json(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    provider = make_provider(**fake_webhook.settings(Path()))
    result = await provider.send(request("webhook", "tok/1 2", param="p", count=3))
    assert (result.outcome, result.status) == (PushOutcome.SENT, 200)
    [got] = fake_webhook.requests
    assert got.method == "POST"
    assert got.headers["content-type"] == "application/json"
    assert got.path == "/push/tok/1 2"
    assert got.raw_path == "/push/tok%2F1%202"  # $prid percent-encoded into the URL
    assert got.json() == {
        "user": "bob",
        "domain": "example.com",
        "aor": "bob@example.com",
        "device": "<urn:uuid:00000000-0000-0000-0000-000000000001>",
        "provider": "webhook",
        "prid": "tok/1 2",
        "param": "p",
        "count": 3,
        "from": "sip:alice@example.com",
        "call_id": "call-1@example.com",
    }


async def test_quotes_and_backslashes_in_values_cannot_break_the_json(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    provider = make_provider(
        url=f"{fake_webhook.endpoint}/notify?to=$aor&from=$from",
        body='{"text": "$from says: $body", "n": $count}',
    )
    sender = '"Mallory \\", "admin": true, "x": "\\\\" <sip:m@example.com>'
    text = 'line one\nline "two"\t\\end'
    result = await provider.send(request("webhook", "t", from_uri=sender, body=text, count=2))
    assert result.outcome is PushOutcome.SENT
    [got] = fake_webhook.requests
    assert got.json() == {"text": f"{sender} says: {text}", "n": 2}
    query = dict(part.split("=", 1) for part in got.query.split("&"))
    assert unquote(query["from"]) == sender and unquote(query["to"]) == "bob@example.com"


async def test_header_templates_are_filled_and_stay_on_one_line(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    provider = make_provider(
        url=f"{fake_webhook.endpoint}/p",
        headers={"Authorization": "Bearer s3cret", "X-From": "$from", "X-Count": "$count"},
    )
    result = await provider.send(request("webhook", "t", from_uri="sip:a@x\r\nX-Evil: 1"))
    assert result.outcome is PushOutcome.SENT
    result = await provider.send(request("webhook", "t", from_uri='"Zoë \udcff" <sip:z@x>'))
    assert result.outcome is PushOutcome.SENT
    got, other = fake_webhook.requests
    assert got.headers["authorization"] == "Bearer s3cret"
    assert got.headers["x-from"] == "sip:a@x  X-Evil: 1"
    assert "x-evil" not in got.headers
    assert got.headers["x-count"] == "1"
    assert other.headers["x-from"] == '"Zo%C3%AB %3F" <sip:z@x>'  # non-ASCII percent-encoded


async def test_get_sends_no_body_and_a_custom_content_type_is_kept(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    get = make_provider(url=f"{fake_webhook.endpoint}/wake/$user", method="GET")
    assert (await get.send(request("webhook", "t"))).outcome is PushOutcome.SENT
    form = make_provider(
        url=f"{fake_webhook.endpoint}/sms",
        body="to=$user&n=$count",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (await form.send(request("webhook", "t", count=4))).outcome is PushOutcome.SENT
    first, second = fake_webhook.requests
    assert (first.method, first.path, first.body) == ("GET", "/wake/bob", b"")
    assert second.body == b"to=bob&n=4"
    assert second.headers["content-type"] == "application/x-www-form-urlencoded"


@pytest.mark.parametrize("status", [404, 410])
async def test_a_gone_device_is_a_dead_token(
    fake_webhook: FakeWebhook, make_provider: Any, status: int
) -> None:
    fake_webhook.status = status
    provider = make_provider(**fake_webhook.settings(Path()))
    result = await send_with_retries(provider, request("webhook", "t"), max_attempts=3)
    assert (result.outcome, result.status) == (PushOutcome.DEAD_TOKEN, status)
    assert len(fake_webhook.requests) == 1  # never retried


async def test_another_4xx_fails_without_retry(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    fake_webhook.status = 400
    provider = make_provider(**fake_webhook.settings(Path()))
    result = await send_with_retries(provider, request("webhook", "t"), max_attempts=3)
    assert (result.outcome, result.status) == (PushOutcome.FAILED, 400)
    assert '"ok": false' in result.detail
    assert len(fake_webhook.requests) == 1


async def test_429_is_retried_after_the_delay_it_asks_for_then_sent(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    fake_webhook.fail_next = [429]
    fake_webhook.retry_after = "0"
    provider = make_provider(**fake_webhook.settings(Path()))
    result = await send_with_retries(
        provider, request("webhook", "t"), max_attempts=3, base_delay=5.0
    )  # Retry-After: 0 replaces the 5 s back-off, or the test would take 5 s
    assert result.outcome is PushOutcome.SENT
    assert [r.status for r in fake_webhook.requests] == [429, 200]


async def test_5xx_every_time_gives_retry_after_max_attempts(
    fake_webhook: FakeWebhook, make_provider: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake_webhook.fail_next = [503, 500, 502, 503]
    provider = make_provider(**fake_webhook.settings(Path()))
    with caplog.at_level(logging.DEBUG, logger="msilo.push"):
        result = await send_with_retries(
            provider, request("webhook", "secret-token"), max_attempts=3, base_delay=0.01
        )
    assert (result.outcome, result.status) == (PushOutcome.RETRY, 502)
    assert [r.status for r in fake_webhook.requests] == [503, 500, 502]
    retries = [r.getMessage() for r in caplog.records if "event=push_retry" in r.getMessage()]
    assert len(retries) == 2 and "delay=0.010" in retries[0] and "delay=0.020" in retries[1]
    [failed] = [r for r in caplog.records if "event=push_failed" in r.getMessage()]
    line = failed.getMessage()
    assert "provider=webhook aor=bob@example.com" in line
    assert "outcome=retry status=502 attempts=3" in line
    assert "secret-token" not in caplog.text  # a device token is never logged


async def test_failure_lines_are_rate_limited_and_dead_tokens_are_info(
    fake_webhook: FakeWebhook,
    make_provider: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msilo.lograte import LogRate
    from msilo.push import base

    now = [0.0]
    monkeypatch.setattr(base, "_failures", LogRate(base.log, burst=10, clock=lambda: now[0]))
    fake_webhook.status = 400
    provider = make_provider(**fake_webhook.settings(Path()))
    with caplog.at_level(logging.INFO, logger="msilo.push"):
        for _ in range(25):  # an outage: every push fails within the same second
            await send_with_retries(provider, request("webhook", "t"), max_attempts=1)
        now[0] = 1.5
        fake_webhook.status = 410
        await send_with_retries(provider, request("webhook", "t"), max_attempts=1)
    lines = [r for r in caplog.records if "event=push_failed" in r.getMessage()]
    assert len(lines) == 11 and len(fake_webhook.requests) == 26
    assert {r.levelno for r in lines[:10]} == {logging.WARNING}
    assert lines[10].levelno == logging.INFO
    assert "outcome=dead_token" in lines[10].getMessage()
    assert "suppressed=15" in lines[10].getMessage()


async def test_a_slow_receiver_times_out_and_is_retried(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    fake_webhook.delay = 2.0
    provider = make_provider(**fake_webhook.settings(Path()), timeout=0.2)
    result = await provider.send(request("webhook", "t"))
    assert result.outcome is PushOutcome.RETRY
    assert result.status is None and "timeout" in result.detail


async def test_a_refused_connection_is_retried() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = push_config(webhook={"url": f"http://127.0.0.1:{port}/p"}).webhook
    assert config is not None
    provider = WebhookProvider(config)
    try:
        result = await send_with_retries(
            provider, request("webhook", "t"), max_attempts=2, base_delay=0.01
        )
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.RETRY and "Connect" in result.detail


async def test_https_with_the_test_ca(push_tls: TlsFiles, make_provider: Any) -> None:
    async with FakeWebhook.running(push_tls) as fake:
        provider = make_provider(**fake.settings(Path()))
        assert (await provider.send(request("webhook", "t"))).outcome is PushOutcome.SENT
        untrusting = make_provider(url=f"{fake.endpoint}/p")  # the system CAs only
        result = await untrusting.send(request("webhook", "t"))
    assert fake.requests[0].http_version == "1.1"  # aiohttp (msilo/push/http.py says why)
    assert result.outcome is PushOutcome.RETRY and "CERTIFICATE_VERIFY_FAILED" in result.detail


async def test_a_provider_that_raises_is_a_failure_not_an_exception() -> None:
    class Broken(WebhookProvider):
        async def send(self, request: Any) -> Any:
            raise RuntimeError("bug")

    config = push_config(webhook={"url": "http://127.0.0.1:9/p"}).webhook
    assert config is not None
    provider = Broken(config)
    try:
        result = await send_with_retries(provider, request("webhook", "t"), max_attempts=3)
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and result.detail == "RuntimeError: bug"


def test_the_default_body_is_valid_json_for_any_values() -> None:
    from msilo.push.template import SAMPLE, check_template, render_json
    from msilo.push.webhook import template_values

    config = push_config(webhook={"url": "http://127.0.0.1/p"}).webhook
    assert config is not None
    values = template_values(request("webhook", 'a"b', from_uri='"\\', param=None))
    assert json.loads(render_json(check_template(config.body), values))["param"] == ""
    assert json.loads(render_json(check_template(config.body), SAMPLE))


async def test_undecodable_text_is_replaced_not_a_crash(
    fake_webhook: FakeWebhook, make_provider: Any
) -> None:
    provider = make_provider(url=f"{fake_webhook.endpoint}/p", body='{"text": "$body"}')
    # a body decoded with surrogateescape keeps its bad bytes as lone surrogates
    result = await provider.send(request("webhook", "t", body="ok \udcff"))
    assert result.outcome is PushOutcome.SENT
    assert fake_webhook.requests[0].json() == {"text": "ok ?"}
