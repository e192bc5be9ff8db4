"""Apple Push Notification service over HTTP/2 with token authentication (``[push.apns]``).

The provider token is an ES256 JWT (header ``kid`` = the key's id, claims ``iss`` = the team,
``iat``) signed with the ``.p8`` key.  Apple refuses a token older than one hour and answers
TooManyProviderTokenUpdates to a provider that makes new ones more often than every 20
minutes, so one token serves every push for 50 minutes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import jwt

from msilo.config import ApnsConfig
from msilo.push.base import PushOutcome, PushProvider, PushRequest, PushResult, preview
from msilo.push.http import (
    REQUEST_ERRORS,
    Reply,
    make_client,
    network_failure,
    short,
    transient,
)
from msilo.push.keys import load_p8

TOKEN_REUSE = 50 * 60  # seconds one provider token is used (Apple: between 20 and 60 min)
COLLAPSE_ID = "msilo-messages"  # a newer push replaces an older one still shown


def topic_and_type(param: str | None, config: ApnsConfig) -> tuple[str, str]:
    """``(apns-topic, apns-push-type)`` for a device.

    RFC 8599 (the APNs pn-param): ``<Team ID>.<Bundle ID>``, the topic with a ``.voip``
    suffix for VoIP pushes.  Linphone-style apps write the services they accept as the
    last label, ``voip``, ``remote`` or ``voip&remote``: a ``remote`` service (a normal
    push) is preferred for messages, since iOS wants every VoIP push reported as a call."""
    if not param or "." not in param:
        return config.topic, config.push_type
    bundle = param.split(".", 1)[1]
    head, _, last = bundle.rpartition(".")
    services = set(last.split("&"))
    if head and services <= {"voip", "remote"}:
        if "remote" in services:
            return head, config.push_type
        return f"{head}.voip", "voip"
    return bundle, config.push_type


class ApnsProvider(PushProvider):
    """Sends one APNs notification per push over a pooled HTTP/2 connection."""

    def __init__(
        self,
        config: ApnsConfig,
        *,
        name: str = "apns",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self._key = load_p8(config.key_file)
        self._client = make_client(timeout=config.timeout, ca_file=config.ca_file)
        self._token: str | None = None
        self._issued = 0.0

    def _provider_token(self, stale: str | None = None) -> str:
        """The current JWT, or a new one when it is ``stale`` (refused) or 50 min old."""
        now = self.clock()
        if self._token is None or self._token == stale or now - self._issued >= TOKEN_REUSE:
            self._token = jwt.encode(
                {"iss": self.config.team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self.config.key_id},
            )
            self._issued = now
        return self._token

    def payload(self, request: PushRequest, push_type: str) -> dict[str, Any]:
        """The notification's JSON: an alert with the badge count, or a silent
        content-available push; msilo's own fields under ``msilo``."""
        target = request.target
        ours: dict[str, Any] = {
            "user": target.username,
            "domain": target.domain,
            "aor": target.aor,
            "device": target.device,
            "count": request.count,
            "from": request.from_uri,
            "call_id": request.call_id,
        }
        body = preview(request.body) if request.body is not None else None
        if body is not None:
            ours["body"] = body
        if push_type == "background":
            aps: dict[str, Any] = {"content-available": 1}
        else:
            text = body if body is not None else _waiting(request.count)
            aps = {
                "alert": {"title": request.from_uri, "body": text},
                "badge": request.count,
                "sound": "default",
            }
        return {"aps": aps, "msilo": ours}

    async def send(self, request: PushRequest) -> PushResult:
        """Send one notification; an ExpiredProviderToken gets a new JWT and one more try."""
        topic, push_type = topic_and_type(request.target.param, self.config)
        if not topic:
            return PushResult(
                PushOutcome.FAILED, detail="no apns-topic: set push.apns.topic or send pn-param"
            )
        content = json.dumps(self.payload(request, push_type), ensure_ascii=False).encode(
            errors="replace"
        )
        expiration = int(self.clock()) + self.config.ttl if self.config.ttl else 0
        headers = {
            "apns-topic": topic,
            "apns-push-type": push_type,
            # Apple: background pushes must have priority 5; 10 delivers at once.
            "apns-priority": "5" if push_type == "background" else "10",
            "apns-expiration": str(expiration),
            "apns-collapse-id": COLLAPSE_ID,
            "content-type": "application/json",
        }
        # The token comes from a REGISTER: it must stay one path segment whatever it holds.
        url = f"{self.config.endpoint}/3/device/{quote(request.target.prid, safe='')}"
        stale: str | None = None
        for _ in range(2):
            token = self._provider_token(stale)
            try:
                response = await self._client.post(
                    url, content=content, headers=headers | {"authorization": f"bearer {token}"}
                )
            except REQUEST_ERRORS as exc:
                return network_failure(exc)
            if response.http_version != "HTTP/2":
                return PushResult(
                    PushOutcome.FAILED,
                    response.status_code,
                    f"{self.config.endpoint} did not speak HTTP/2 (APNs requires it)",
                )
            if not (response.status_code == 403 and _reason(response) == "ExpiredProviderToken"):
                break
            stale = token
        return self._outcome(response)

    @staticmethod
    def _outcome(response: Reply) -> PushResult:
        status = response.status_code
        if status == 200:
            return PushResult(PushOutcome.SENT, status, response.headers.get("apns-id", ""))
        reason = _reason(response)
        # 410: the token is no longer active for the topic (the app was removed);
        # BadDeviceToken: not a token of this environment and topic.
        if status == 410 or reason in ("Unregistered", "BadDeviceToken"):
            return PushResult(PushOutcome.DEAD_TOKEN, status, reason)
        return transient(response, reason) or PushResult(PushOutcome.FAILED, status, reason)

    async def aclose(self) -> None:
        """Close the HTTP/2 connection."""
        await self._client.aclose()


def _reason(response: Reply) -> str:
    try:
        return str(response.json().get("reason", ""))
    except (ValueError, AttributeError):
        return short(response.text)


def _waiting(count: int) -> str:
    return "1 new message" if count == 1 else f"{count} new messages"
