"""The push provider interface: one wake-up push (RFC 8599) for one device, and its outcome.

A provider turns a :class:`PushRequest` into one HTTP request to its push service and says
what came of it as a :class:`PushResult`.  It never raises for an HTTP or network problem:
the caller (the server, which owns storage and statistics) decides what an outcome means —
``DEAD_TOKEN`` removes the device's push parameters, ``RETRY`` is retried with back-off by
:func:`send_with_retries`, ``FAILED`` is counted and dropped.  Nothing about a push can fail
a store or a delivery.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from msilo.log import redact_text
from msilo.lograte import LogRate

if TYPE_CHECKING:
    from msilo.config import PushConfig

log = logging.getLogger("msilo.push")
# A push service outage fails every push: a few lines a second say so, with suppressed=N.
_failures = LogRate(log, burst=10, interval=1.0)


@dataclass(frozen=True, slots=True)
class PushTarget:
    """One device's push parameters (RFC 8599 §4.1: ``pn-provider``, ``pn-prid``,
    ``pn-param`` of its REGISTER Contact) and whose device it is."""

    username: str
    domain: str
    device: str  # msilo's device key (+sip.instance, else the Contact URI)
    provider: str  # pn-provider: the name of a configured [push.NAME] table
    prid: str  # pn-prid: the device token / registration token / subscription
    param: str | None  # pn-param: APNs "<team>.<topic>", FCM project id; may be absent

    @property
    def aor(self) -> str:
        """``user@domain``."""
        return f"{self.username}@{self.domain}"


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One wake-up push: ``count`` messages wait for the target's device."""

    target: PushTarget
    count: int
    from_uri: str  # the sender of the latest message
    call_id: str  # the latest message's Call-ID
    body: str | None = None  # the latest message's text, only with push.include_body


class PushOutcome(enum.Enum):
    """What came of a push."""

    SENT = "sent"  # the push service accepted it
    DEAD_TOKEN = "dead_token"  # the service says the device token is gone: forget it
    RETRY = "retry"  # 429, 5xx, a timeout or a connection error: worth another try
    FAILED = "failed"  # refused for another reason (bad configuration, bad request)


@dataclass(frozen=True, slots=True)
class PushResult:
    """The outcome of one attempt (or of the last of several)."""

    outcome: PushOutcome
    status: int | None = None  # the HTTP status, None when no response came
    detail: str = ""  # the service's reason (e.g. "Unregistered"), never a token or key
    retry_after: float | None = None  # seconds the service asked us to wait (Retry-After)


class PushProvider(abc.ABC):
    """A push service client: one pooled HTTP client, reused for every push."""

    name: str

    @abc.abstractmethod
    async def send(self, request: PushRequest) -> PushResult:
        """Send one push; return its outcome.  Never raises for HTTP or network errors."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connections."""


async def send_with_retries(
    provider: PushProvider,
    request: PushRequest,
    *,
    max_attempts: int,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
) -> PushResult:
    """Send ``request``, retrying a ``RETRY`` outcome up to ``max_attempts`` attempts in all
    with exponential back-off (``base_delay``, doubled each time, at most ``max_delay``; a
    Retry-After from the service replaces it, capped at ``max_delay``).  ``SENT``,
    ``DEAD_TOKEN`` and ``FAILED`` end at once.  Logs one ``event=push_failed`` line when
    the push did not go out.  Never raises (but for cancellation)."""
    attempts = max(1, max_attempts)
    result = PushResult(PushOutcome.FAILED, detail="not sent")
    for attempt in range(1, attempts + 1):
        try:
            result = await provider.send(request)
        except Exception as exc:  # a provider bug must not fail a store (issue 16)
            result = PushResult(PushOutcome.FAILED, detail=f"{type(exc).__name__}: {exc}")
        if result.outcome is not PushOutcome.RETRY or attempt == attempts:
            break
        delay = min(max_delay, base_delay * 2 ** (attempt - 1))
        if result.retry_after is not None:
            delay = min(max_delay, max(0.0, result.retry_after))
        log.debug(
            "event=push_retry provider=%s aor=%s status=%s attempt=%d delay=%.3f",
            provider.name,
            request.target.aor,
            result.status,
            attempt,
            delay,
        )
        await asyncio.sleep(delay)
    if result.outcome is not PushOutcome.SENT:
        log_failure(provider.name, request, result, attempt)
    return result


# APNs and FCM refuse payloads over 4 KB: a push wakes the app, which then fetches the
# message itself, so a preview of the text is plenty.
PREVIEW_BYTES = 1024


def preview(body: str, limit: int = PREVIEW_BYTES) -> str:
    """``body`` cut to at most ``limit`` UTF-8 bytes (at a character boundary, with "…")."""
    raw = body.encode()
    if len(raw) <= limit:
        return body
    return raw[: limit - 3].decode(errors="ignore") + "…"


def log_failure(provider: str, request: PushRequest, result: PushResult, attempts: int) -> None:
    """The one ``event=push_failed`` line (the device token is never in it): a warning, but
    a dead token is routine (an app was removed) and logged at info; at most 10 a second."""
    detail = redact_text(result.detail, (request.target.prid,))
    level = logging.INFO if result.outcome is PushOutcome.DEAD_TOKEN else logging.WARNING
    _failures.log(
        level,
        "push_failed",
        "provider=%s aor=%s device=%s outcome=%s status=%s attempts=%d detail=%s",
        provider,
        request.target.aor,
        _quote(request.target.device),
        result.outcome.value,
        result.status if result.status is not None else "-",
        attempts,
        _quote(detail),
    )


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_providers(config: PushConfig) -> dict[str, PushProvider]:
    """One provider per configured ``[push.NAME]`` table, keyed by its ``pn-provider`` name.
    The caller closes them (``aclose``) at shutdown."""
    providers: dict[str, PushProvider] = {}
    if config.fcm is not None:
        from msilo.push.fcm import FcmProvider

        providers["fcm"] = FcmProvider(config.fcm)
    if config.apns is not None:
        from msilo.push.apns import ApnsProvider

        providers["apns"] = ApnsProvider(config.apns)
    if config.webhook is not None:
        from msilo.push.webhook import WebhookProvider

        providers["webhook"] = WebhookProvider(config.webhook)
    return providers
