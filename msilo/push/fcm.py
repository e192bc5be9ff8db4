"""Firebase Cloud Messaging, HTTP v1 API (``[push.fcm]``).

Authentication is OAuth 2 with a service account: a JWT signed RS256 with the account's key
(RFC 7523 §2.1, the JWT bearer grant) is exchanged at the token endpoint for an access token,
which is reused until shortly before it expires.  The push is a data message with Android
high priority, so that the app wakes up and registers (RFC 8599 §4.1.3)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import jwt

from msilo.config import FcmConfig
from msilo.push.base import PushOutcome, PushProvider, PushRequest, PushResult, preview
from msilo.push.http import (
    REQUEST_ERRORS,
    Reply,
    make_client,
    network_failure,
    short,
    transient,
)
from msilo.push.keys import ServiceAccount, load_service_account

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # Google refuses an assertion valid for more than one hour
REFRESH_MARGIN = 300  # get a new access token this many seconds before the old one expires


class _TokenError(Exception):
    """The token endpoint did not give an access token; carries the push's outcome."""

    def __init__(self, result: PushResult) -> None:
        super().__init__(result.detail)
        self.result = result


def fcm_error(response: Reply) -> tuple[str, str, str]:
    """(status, errorCode, message) of an FCM v1 error answer (google.rpc.Status with an
    FcmError detail); empty strings for what is not there."""
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return "", "", short(response.text)
    if not isinstance(error, dict):
        return "", "", short(response.text)
    code = ""
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            code = str(detail["errorCode"])
    return str(error.get("status") or ""), code, str(error.get("message") or "")


class FcmProvider(PushProvider):
    """Sends one FCM data message per push."""

    def __init__(
        self,
        config: FcmConfig,
        *,
        name: str = "fcm",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.account: ServiceAccount = load_service_account(config.service_account)
        self.project_id = config.project_id or self.account.project_id
        self.token_endpoint = config.token_endpoint or self.account.token_uri
        self.url = f"{config.endpoint}/v1/projects/{self.project_id}/messages:send"
        # HTTP/1.1: FCM takes it, and it costs a twentieth of httpx's HTTP/2 (push/http.py).
        self._client = make_client(timeout=config.timeout, ca_file=config.ca_file, http2=False)
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()  # one token exchange at a time, shared by every push

    # ---- OAuth 2 -------------------------------------------------------------------------

    def _assertion(self) -> str:
        now = int(self.clock())
        claims = {
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.token_endpoint,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        return jwt.encode(claims, self.account.private_key, algorithm="RS256", headers=headers)

    async def _access_token(self, stale: str | None = None) -> str:
        """A valid access token: the cached one unless it is ``stale`` (refused with 401)
        or about to expire; concurrent pushes wait for one exchange."""
        async with self._lock:
            fresh = self.clock() < self._expires
            if self._token is not None and self._token != stale and fresh:
                return self._token
            self._token = None
            form = {"grant_type": GRANT_TYPE, "assertion": self._assertion()}
            try:
                response = await self._client.post(self.token_endpoint, data=form)
            except REQUEST_ERRORS as exc:
                failure = network_failure(exc)
                raise _TokenError(
                    PushResult(failure.outcome, detail=f"token endpoint: {failure.detail}")
                ) from None
            if response.status_code != 200:
                detail = f"token endpoint: {short(response.text)}"
                raise _TokenError(
                    transient(response, detail)
                    or PushResult(PushOutcome.FAILED, response.status_code, detail)
                )
            try:
                answer = response.json()
                token = str(answer["access_token"])
                lifetime = float(answer.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise _TokenError(
                    PushResult(PushOutcome.FAILED, 200, "token endpoint: no access_token")
                ) from None
            self._token = token
            self._expires = self.clock() + max(0.0, lifetime - REFRESH_MARGIN)
            return token

    # ---- the push ------------------------------------------------------------------------

    def message(self, request: PushRequest) -> dict[str, Any]:
        """The FCM v1 message for ``request`` (data values must all be strings)."""
        target = request.target
        data = {
            "user": target.username,
            "domain": target.domain,
            "aor": target.aor,
            "device": target.device,
            "count": str(request.count),
            "from": request.from_uri,
            "call_id": request.call_id,
        }
        if request.body is not None:
            data["body"] = preview(request.body)
        return {"message": {"token": target.prid, "data": data, "android": {"priority": "high"}}}

    async def send(self, request: PushRequest) -> PushResult:
        """Send one FCM message; a 401 gets a fresh access token and one more try."""
        content = json.dumps(self.message(request), ensure_ascii=False).encode(errors="replace")
        stale: str | None = None
        for _ in range(2):
            try:
                token = await self._access_token(stale)
            except _TokenError as exc:
                return exc.result
            try:
                response = await self._client.post(
                    self.url,
                    content=content,
                    headers={
                        "authorization": f"Bearer {token}",
                        "content-type": "application/json",
                    },
                )
            except REQUEST_ERRORS as exc:
                return network_failure(exc)
            if response.status_code != 401:
                break
            stale = token  # revoked or expired early: exchange again, once
        return self._outcome(response)

    @staticmethod
    def _outcome(response: Reply) -> PushResult:
        status = response.status_code
        if status == 200:
            try:
                name = str(response.json().get("name", ""))
            except (ValueError, AttributeError):
                name = ""
            return PushResult(PushOutcome.SENT, status, name)
        google_status, code, message = fcm_error(response)
        detail = " ".join(p for p in (google_status, code, message) if p)
        # The token is gone: the app was uninstalled or the token rotated (FCM v1 error
        # codes: UNREGISTERED, with HTTP 404 NOT_FOUND).
        if status == 404 or google_status == "NOT_FOUND" or code == "UNREGISTERED":
            return PushResult(PushOutcome.DEAD_TOKEN, status, detail)
        # A malformed token is as dead; other INVALID_ARGUMENTs are our bug, not the device's.
        invalid = "INVALID_ARGUMENT" in (google_status, code)
        if status == 400 and invalid and "token" in message.lower():
            return PushResult(PushOutcome.DEAD_TOKEN, status, detail)
        # Anything else (403 SENDER_ID_MISMATCH or PERMISSION_DENIED, 400 on our payload) is
        # a configuration problem: failing it keeps every token, where calling it dead would
        # wipe them all.
        return transient(response, detail) or PushResult(PushOutcome.FAILED, status, detail)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()
