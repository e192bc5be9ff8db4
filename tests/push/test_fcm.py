"""The FCM provider against the fake FCM: the OAuth 2 exchange (RS256 assertion checked with
the test key), access-token caching, the v1 message shape, and every answer's outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest

from msilo.push.base import PushOutcome, build_providers, send_with_retries
from msilo.push.fcm import FcmProvider
from tests.push.fakes import Answer, Clock, FakeFcm, fcm_error, rsa_key
from tests.push.helpers import FCM_TOKEN, push_config, request

Make = Callable[..., FcmProvider]


@pytest.fixture
async def make(fake_fcm: FakeFcm, key_dir: Path, push_clock: Clock) -> AsyncIterator[Make]:
    made: list[FcmProvider] = []

    def build(**extra: Any) -> FcmProvider:
        config = push_config(fcm=fake_fcm.settings(key_dir) | extra).fcm
        assert config is not None
        provider = FcmProvider(config, clock=push_clock)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.aclose()


async def test_a_push_is_a_high_priority_data_message_over_https(
    fake_fcm: FakeFcm, make: Make
) -> None:
    provider = make()
    result = await provider.send(request("fcm", FCM_TOKEN, param="msilo-test", count=2))
    assert result.outcome is PushOutcome.SENT and result.status == 200
    assert result.detail.startswith("projects/msilo-test/messages/")
    [push] = fake_fcm.requests
    # HTTP/1.1 (FCM takes it; msilo/push/http.py says why), over TLS to the fake's cert.
    assert push.http_version == "1.1"
    assert push.path == "/v1/projects/msilo-test/messages:send"
    assert push.json() == {
        "message": {
            "token": FCM_TOKEN,
            "data": {
                "user": "bob",
                "domain": "example.com",
                "aor": "bob@example.com",
                "device": "<urn:uuid:00000000-0000-0000-0000-000000000001>",
                "count": "2",
                "from": "sip:alice@example.com",
                "call_id": "call-1@example.com",
            },
            "android": {"priority": "high"},
        }
    }


async def test_the_oauth_assertion_is_an_rs256_jwt_for_the_messaging_scope(
    fake_fcm: FakeFcm, make: Make, push_clock: Clock
) -> None:
    await make().send(request("fcm", FCM_TOKEN))
    [exchange] = fake_fcm.token_requests
    form = parse_qs(exchange.body.decode())
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    claims = jwt.decode(
        form["assertion"][0],
        fake_fcm.key.public_key(),
        algorithms=["RS256"],
        audience=fake_fcm.token_endpoint,
    )
    assert claims["iss"] == fake_fcm.client_email
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert 0 < claims["exp"] - claims["iat"] <= 3600
    assert jwt.get_unverified_header(form["assertion"][0])["kid"]  # the key's private_key_id
    assert fake_fcm.requests[0].headers["authorization"].startswith("Bearer ya29.fake-")


async def test_one_access_token_serves_many_pushes_until_it_nears_expiry(
    fake_fcm: FakeFcm, make: Make, push_clock: Clock
) -> None:
    provider = make()
    results = await asyncio.gather(*(provider.send(request("fcm", f"t{i}")) for i in range(5)))
    for i in range(3):
        results.append(await provider.send(request("fcm", f"s{i}")))
    assert {r.outcome for r in results} == {PushOutcome.SENT}
    assert len(fake_fcm.requests) == 8
    assert len(fake_fcm.token_requests) == 1  # concurrent pushes waited for one exchange
    push_clock.advance(3599 - 300)  # the token's last five minutes: exchange again first
    assert (await provider.send(request("fcm", "late"))).outcome is PushOutcome.SENT
    assert len(fake_fcm.token_requests) == 2


async def test_a_401_gets_a_new_access_token_and_one_more_try(
    fake_fcm: FakeFcm, make: Make
) -> None:
    provider = make()
    await provider.send(request("fcm", "t"))
    fake_fcm.revoke_access_tokens()
    result = await provider.send(request("fcm", "t"))
    assert result.outcome is PushOutcome.SENT
    assert [r.status for r in fake_fcm.requests] == [200, 401, 200]
    assert len(fake_fcm.token_requests) == 2
    fake_fcm.fail_next = [401, 401]
    result = await provider.send(request("fcm", "t"))
    assert (result.outcome, result.status) == (PushOutcome.FAILED, 401)  # only once more
    assert len(fake_fcm.token_requests) == 3


async def test_an_unregistered_token_is_dead(fake_fcm: FakeFcm, make: Make) -> None:
    fake_fcm.dead_tokens.add("gone")
    result = await send_with_retries(make(), request("fcm", "gone"), max_attempts=3)
    assert (result.outcome, result.status) == (PushOutcome.DEAD_TOKEN, 404)
    assert "UNREGISTERED" in result.detail
    assert len(fake_fcm.requests) == 1


async def test_an_invalid_token_is_dead_but_another_invalid_argument_fails(
    fake_fcm: FakeFcm, make: Make
) -> None:
    fake_fcm.invalid_tokens.add("garbage")
    provider = make()
    result = await provider.send(request("fcm", "garbage"))
    assert (result.outcome, result.status) == (PushOutcome.DEAD_TOKEN, 400)
    fake_fcm.fail_next = [
        fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value'"),
        fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
        Answer.json(404, {}),  # a bare 404 (no FCM error body) also means the token is gone
    ]
    first = await provider.send(request("fcm", "t"))
    second = await provider.send(request("fcm", "t"))
    third = await provider.send(request("fcm", "t"))
    assert (first.outcome, first.status) == (PushOutcome.FAILED, 400)
    assert (second.outcome, second.status) == (PushOutcome.FAILED, 403)
    assert "SENDER_ID_MISMATCH" in second.detail
    assert third.outcome is PushOutcome.DEAD_TOKEN


async def test_429_backs_off_as_asked_then_sends(fake_fcm: FakeFcm, make: Make) -> None:
    fake_fcm.fail_next = [
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", "QUOTA_EXCEEDED"),
        503,
    ]
    fake_fcm.fail_next[0].headers.append(("retry-after", "0"))
    result = await send_with_retries(make(), request("fcm", "t"), max_attempts=3, base_delay=0.01)
    assert result.outcome is PushOutcome.SENT
    assert [r.status for r in fake_fcm.requests] == [429, 503, 200]


async def test_5xx_on_every_attempt_gives_retry(fake_fcm: FakeFcm, make: Make) -> None:
    fake_fcm.fail_next = [503, 500, 503]
    result = await send_with_retries(make(), request("fcm", "t"), max_attempts=3, base_delay=0.01)
    assert (result.outcome, result.status) == (PushOutcome.RETRY, 503)
    assert len(fake_fcm.requests) == 3


async def test_a_slow_fcm_times_out(fake_fcm: FakeFcm, make: Make) -> None:
    provider = make(timeout=0.2)
    await provider.send(request("fcm", "t"))  # the token exchange, while it is fast
    fake_fcm.delay = 2.0
    result = await provider.send(request("fcm", "t"))
    assert result.outcome is PushOutcome.RETRY and "timeout" in result.detail


async def test_token_endpoint_failures(fake_fcm: FakeFcm, key_dir: Path, push_clock: Clock) -> None:
    # a key the fake does not know: Google answers invalid_grant, which no retry fixes
    wrong = fake_fcm.write_service_account(key_dir / "wrong.json", rsa_key())
    config = push_config(fcm=fake_fcm.settings(key_dir) | {"service_account": str(wrong)}).fcm
    assert config is not None
    provider = FcmProvider(config, clock=push_clock)
    try:
        result = await send_with_retries(provider, request("fcm", "t"), max_attempts=3)
        assert (result.outcome, result.status) == (PushOutcome.FAILED, 400)
        assert "token endpoint" in result.detail and "invalid_grant" in result.detail
        assert len(fake_fcm.token_requests) == 1 and fake_fcm.requests == []
        fake_fcm.token_fail_next = [503]
        result = await provider.send(request("fcm", "t"))
        assert (result.outcome, result.status) == (PushOutcome.RETRY, 503)
    finally:
        await provider.aclose()


async def test_the_body_is_sent_only_when_given(fake_fcm: FakeFcm, make: Make) -> None:
    await make().send(request("fcm", "t", body='Hi "Bob"'))
    assert fake_fcm.requests[0].json()["message"]["data"]["body"] == 'Hi "Bob"'


async def test_build_providers_makes_one_per_table(fake_fcm: FakeFcm, key_dir: Path) -> None:
    config = push_config(fcm=fake_fcm.settings(key_dir), webhook={"url": "http://127.0.0.1:9/x"})
    providers = build_providers(config)
    try:
        assert sorted(providers) == ["fcm", "webhook"]
        assert [p.name for p in providers.values()] == list(providers)
        result = await providers["fcm"].send(request("fcm", "t"))
        assert result.outcome is PushOutcome.SENT
    finally:
        for provider in providers.values():
            await provider.aclose()
    assert build_providers(push_config()) == {}
