"""What every provider shares: one pooled httpx client, and how HTTP failures map to outcomes."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from typing import Any

import httpx

from msilo.push.base import PushOutcome, PushResult

# A push either goes out in a few seconds or is retried: never hold a worker's task longer.
DEFAULT_TIMEOUT = 5.0


# Requests in flight per provider.  More wait here, in an O(1) semaphore queue: httpcore's
# pool scans every queued request on each state change, so a backlog inside it costs O(n^2)
# (measured: 1,000 pushes/s to a webhook collapsed to 145/s with timeouts; bench/bench_push.py).
MAX_IN_FLIGHT = 100


class PushClient:
    """One pooled httpx client for one provider: HTTP/2 when the server offers it (ALPN),
    the system's CA store unless ``ca_file`` names another (tests' self-signed CA), and at
    most :data:`MAX_IN_FLIGHT` requests at once."""

    def __init__(self, *, timeout: float, ca_file: str = "", http2: bool = True) -> None:
        context = ssl.create_default_context(cafile=ca_file or None)
        self._client = httpx.AsyncClient(
            http2=http2,
            verify=context,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT
            ),
            follow_redirects=False,
            trust_env=False,  # a push must not wander off through an HTTP(S)_PROXY variable
        )
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def request(self, method: str, url: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        """``httpx.AsyncClient.request``, waiting for a free slot first."""
        async with self._slots:
            return await self._client.request(method, url, **kwargs)

    async def post(self, url: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        """A POST (see :meth:`request`)."""
        return await self.request("POST", url, **kwargs)

    async def aclose(self) -> None:
        """Close every connection."""
        await self._client.aclose()


def make_client(*, timeout: float, ca_file: str = "", http2: bool = True) -> PushClient:
    """The client a provider sends with (see :class:`PushClient`)."""
    return PushClient(timeout=timeout, ca_file=ca_file, http2=http2)


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (RFC 9110 §10.2.3: delay-seconds or an HTTP-date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def transient(response: httpx.Response, detail: str) -> PushResult | None:
    """RETRY for 429 and 5xx (the service is busy or down), else None."""
    if response.status_code == 429 or response.status_code >= 500:
        return PushResult(
            PushOutcome.RETRY, response.status_code, detail, retry_after=retry_after(response)
        )
    return None


def network_failure(exc: Exception) -> PushResult:
    """The outcome of an exception raised while talking to the service: timeouts and
    connection problems are worth a retry, anything else (a bad URL) is not."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return PushResult(PushOutcome.FAILED, detail=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return PushResult(PushOutcome.RETRY, detail=f"timeout ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError | ssl.SSLError | OSError):
        return PushResult(PushOutcome.RETRY, detail=f"{type(exc).__name__}: {exc}")
    return PushResult(PushOutcome.FAILED, detail=f"{type(exc).__name__}: {exc}")


# What send() catches around a request: httpx's own errors, an invalid URL built from a
# template, TLS and socket errors httpx did not wrap.
REQUEST_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, OSError)


def short(text: str, limit: int = 200) -> str:
    """A response body cut to one short log value."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
