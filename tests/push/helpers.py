"""Small builders shared by the push tests."""

from __future__ import annotations

from typing import Any

from msilo.config import Config, PushConfig
from msilo.push.base import PushRequest, PushTarget

APNS_TOKEN = "a1" * 32  # 64 hex digits, the shape of an APNs device token
FCM_TOKEN = "fcm-registration-token:APA91bH_example"


def push_config(**tables: Any) -> PushConfig:
    """A validated ``[push]`` built from tables such as ``fcm={...}``."""
    return Config.from_mapping({"push": tables}).push


def request(
    provider: str,
    prid: str,
    *,
    param: str | None = None,
    count: int = 1,
    from_uri: str = "sip:alice@example.com",
    body: str | None = None,
    device: str = "<urn:uuid:00000000-0000-0000-0000-000000000001>",
) -> PushRequest:
    """A push for bob@example.com's device."""
    target = PushTarget("bob", "example.com", device, provider, prid, param)
    return PushRequest(target, count, from_uri, "call-1@example.com", body)
