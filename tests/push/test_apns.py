"""The APNs provider against the fake APNs: HTTP/2, the ES256 provider token and its reuse,
headers and payload, topics from pn-param, and every answer's outcome."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from msilo.push.apns import ApnsProvider, topic_and_type
from msilo.push.base import PushOutcome, send_with_retries
from tests.push.fakes import Clock, FakeApns, FakeWebhook, ec_key
from tests.push.helpers import APNS_TOKEN, push_config, request

Make = Callable[..., ApnsProvider]


@pytest.fixture
async def make(fake_apns: FakeApns, key_dir: Path, push_clock: Clock) -> AsyncIterator[Make]:
    made: list[ApnsProvider] = []

    def build(**extra: Any) -> ApnsProvider:
        config = push_config(apns=fake_apns.settings(key_dir) | extra).apns
        assert config is not None
        provider = ApnsProvider(config, clock=push_clock)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.aclose()


async def test_an_alert_push_over_http2_with_a_valid_provider_token(
    fake_apns: FakeApns, make: Make
) -> None:
    result = await make().send(request("apns", APNS_TOKEN, count=3))
    assert (result.outcome, result.status) == (PushOutcome.SENT, 200)
    assert result.detail  # the apns-id
    [push] = fake_apns.requests
    assert push.http_version == "2"
    assert push.path == f"/3/device/{APNS_TOKEN}"
    h = push.headers
    assert (h["apns-topic"], h["apns-push-type"], h["apns-priority"]) == (
        "com.example.msilo",
        "alert",
        "10",
    )
    assert abs(int(h["apns-expiration"]) - (time.time() + 86400)) < 60
    assert h["apns-collapse-id"] == "msilo-messages"
    token = h["authorization"].removeprefix("bearer ")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, fake_apns.key.public_key(), algorithms=["ES256"])
    assert (header["alg"], header["kid"]) == ("ES256", fake_apns.key_id)
    assert claims["iss"] == fake_apns.team_id and set(claims) == {"iss", "iat"}
    assert push.json() == {
        "aps": {
            "alert": {"title": "sip:alice@example.com", "body": "3 new messages"},
            "badge": 3,
            "sound": "default",
        },
        "msilo": {
            "user": "bob",
            "domain": "example.com",
            "aor": "bob@example.com",
            "device": "<urn:uuid:00000000-0000-0000-0000-000000000001>",
            "count": 3,
            "from": "sip:alice@example.com",
            "call_id": "call-1@example.com",
        },
    }


def test_the_topic_and_push_type_come_from_pn_param() -> None:
    from msilo.config import ApnsConfig

    config = ApnsConfig(topic="com.example.fallback")
    assert topic_and_type(None, config) == ("com.example.fallback", "alert")
    assert topic_and_type("TEAM.com.example.app", config) == ("com.example.app", "alert")
    assert topic_and_type("TEAM.com.example.app.voip", config) == (
        "com.example.app.voip",
        "voip",
    )
    assert topic_and_type("TEAM.com.example.app.remote", config) == ("com.example.app", "alert")
    assert topic_and_type("TEAM.com.example.app.voip&remote", config) == (
        "com.example.app",
        "alert",
    )
    assert topic_and_type("nodot", config) == ("com.example.fallback", "alert")


async def test_a_voip_pn_param_sends_a_voip_push(fake_apns: FakeApns, make: Make) -> None:
    param = f"{fake_apns.team_id}.com.example.msilo.voip"
    result = await make().send(request("apns", APNS_TOKEN, param=param))
    assert result.outcome is PushOutcome.SENT
    h = fake_apns.requests[0].headers
    assert (h["apns-topic"], h["apns-push-type"]) == ("com.example.msilo.voip", "voip")


async def test_background_pushes_are_silent_with_priority_5(
    fake_apns: FakeApns, make: Make
) -> None:
    result = await make(push_type="background", ttl=0).send(request("apns", APNS_TOKEN))
    assert result.outcome is PushOutcome.SENT
    [push] = fake_apns.requests
    assert push.headers["apns-priority"] == "5" and push.headers["apns-expiration"] == "0"
    assert push.json()["aps"] == {"content-available": 1}


async def test_the_body_goes_in_the_alert_only_when_given(fake_apns: FakeApns, make: Make) -> None:
    await make().send(request("apns", APNS_TOKEN, body="lunch?"))
    payload = fake_apns.requests[0].json()
    assert payload["aps"]["alert"]["body"] == "lunch?" and payload["msilo"]["body"] == "lunch?"


async def test_a_long_body_is_cut_to_fit_the_4k_payload(fake_apns: FakeApns, make: Make) -> None:
    text = "é" * 3000  # 6000 bytes
    result = await make().send(request("apns", APNS_TOKEN, body=text))
    assert result.outcome is PushOutcome.SENT  # the fake answers 413 past 4096 bytes
    body = fake_apns.requests[0].json()["aps"]["alert"]["body"]
    assert body.endswith("…") and text.startswith(body[:-1]) and len(body.encode()) <= 1024


async def test_one_provider_token_is_reused_for_50_minutes(
    fake_apns: FakeApns, make: Make, push_clock: Clock
) -> None:
    provider = make()
    for _ in range(5):
        assert (await provider.send(request("apns", APNS_TOKEN))).outcome is PushOutcome.SENT
    push_clock.advance(49 * 60)
    assert (await provider.send(request("apns", APNS_TOKEN))).outcome is PushOutcome.SENT
    assert len(fake_apns.provider_tokens) == 1
    push_clock.advance(2 * 60)
    assert (await provider.send(request("apns", APNS_TOKEN))).outcome is PushOutcome.SENT
    assert len(fake_apns.provider_tokens) == 2


async def test_an_expired_provider_token_is_replaced_and_the_push_tried_once_more(
    fake_apns: FakeApns, make: Make, push_clock: Clock
) -> None:
    provider = make()
    await provider.send(request("apns", APNS_TOKEN))
    fake_apns.expire_provider_tokens()
    push_clock.advance(2)
    result = await provider.send(request("apns", APNS_TOKEN))
    assert result.outcome is PushOutcome.SENT
    assert [r.status for r in fake_apns.requests] == [200, 403, 200]
    assert len(fake_apns.provider_tokens) == 2
    fake_apns.expire_provider_tokens()  # refused again, and again: stop after one retry
    result = await provider.send(request("apns", APNS_TOKEN))
    assert (result.outcome, result.status, result.detail) == (
        PushOutcome.FAILED,
        403,
        "ExpiredProviderToken",
    )
    assert len(fake_apns.requests) == 5


async def test_a_key_apple_does_not_know_fails(
    fake_apns: FakeApns, key_dir: Path, push_clock: Clock
) -> None:
    other = fake_apns.write_p8(key_dir / "other.p8", ec_key())
    config = push_config(apns=fake_apns.settings(key_dir) | {"key_file": str(other)}).apns
    assert config is not None
    provider = ApnsProvider(config, clock=push_clock)
    try:
        result = await send_with_retries(provider, request("apns", APNS_TOKEN), max_attempts=3)
    finally:
        await provider.aclose()
    assert (result.outcome, result.status, result.detail) == (
        PushOutcome.FAILED,
        403,
        "InvalidProviderToken",
    )
    assert len(fake_apns.requests) == 1


async def test_unregistered_and_bad_device_tokens_are_dead(fake_apns: FakeApns, make: Make) -> None:
    fake_apns.dead_tokens.add(APNS_TOKEN)
    provider = make()
    gone = await send_with_retries(provider, request("apns", APNS_TOKEN), max_attempts=3)
    bad = await send_with_retries(provider, request("apns", "abc"), max_attempts=3)
    sneaky = await provider.send(request("apns", "../../../v1/x?y"))
    assert (gone.outcome, gone.status, gone.detail) == (
        PushOutcome.DEAD_TOKEN,
        410,
        "Unregistered",
    )
    assert (bad.outcome, bad.status, bad.detail) == (PushOutcome.DEAD_TOKEN, 400, "BadDeviceToken")
    assert sneaky.outcome is PushOutcome.DEAD_TOKEN
    assert fake_apns.requests[2].raw_path == "/3/device/..%2F..%2F..%2Fv1%2Fx%3Fy"
    assert len(fake_apns.requests) == 3


async def test_a_topic_the_key_may_not_use_fails_and_keeps_the_token(
    fake_apns: FakeApns, make: Make
) -> None:
    result = await make(topic="com.other.app").send(request("apns", APNS_TOKEN))
    assert (result.outcome, result.status, result.detail) == (
        PushOutcome.FAILED,
        400,
        "TopicDisallowed",
    )


async def test_no_topic_anywhere_fails_without_a_request(fake_apns: FakeApns, make: Make) -> None:
    result = await make(topic="").send(request("apns", APNS_TOKEN))
    assert result.outcome is PushOutcome.FAILED and "apns-topic" in result.detail
    assert fake_apns.requests == []


async def test_429_is_retried_then_sent(fake_apns: FakeApns, make: Make) -> None:
    fake_apns.fail_next = [429]
    fake_apns.retry_after = "0"
    result = await send_with_retries(make(), request("apns", APNS_TOKEN), max_attempts=3)
    assert result.outcome is PushOutcome.SENT
    assert [r.status for r in fake_apns.requests] == [429, 200]
    assert fake_apns.requests[0].status == 429


async def test_503_on_every_attempt_gives_retry(fake_apns: FakeApns, make: Make) -> None:
    fake_apns.fail_next = [503, 503]
    result = await send_with_retries(
        make(), request("apns", APNS_TOKEN), max_attempts=2, base_delay=0.01
    )
    assert (result.outcome, result.status, result.detail) == (
        PushOutcome.RETRY,
        503,
        "ServiceUnavailable",
    )


async def test_a_slow_apns_times_out(fake_apns: FakeApns, make: Make) -> None:
    fake_apns.delay = 2.0
    result = await make(timeout=0.2).send(request("apns", APNS_TOKEN))
    assert result.outcome is PushOutcome.RETRY and "timeout" in result.detail


async def test_a_server_without_http2_is_refused(
    fake_webhook: FakeWebhook, key_dir: Path, fake_apns: FakeApns
) -> None:
    config = push_config(
        apns=fake_apns.settings(key_dir) | {"endpoint": fake_webhook.endpoint}
    ).apns
    assert config is not None
    provider = ApnsProvider(config)
    try:
        result = await provider.send(request("apns", APNS_TOKEN))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and "HTTP/2" in result.detail
