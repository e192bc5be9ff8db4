"""What every provider shares: one pooled HTTP client, and how HTTP failures map to outcomes.

Two clients behind one small interface (:class:`PushClient`, answers as :class:`Reply`):
aiohttp for HTTP/1.1 services (the webhook, FCM -- both take HTTP/1.1) and httpx with h2
for APNs, which speaks HTTP/2 only.  The split is about cost: measured per request on this
2-core VM against a local server (50 in flight), httpx took 2.1 ms of CPU and aiohttp 0.1 ms
(its parser is C); at 1,000 pushes a second that is two cores against a tenth of one, in
the same process that answers the 202s.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from msilo.push.base import PushOutcome, PushResult

# A push either goes out in a few seconds or is retried: never hold a worker's task longer.
DEFAULT_TIMEOUT = 5.0


# Requests in flight per provider.  More wait here, in an O(1) semaphore queue: httpcore's
# pool scans every queued request on each state change, so a backlog inside it costs O(n^2)
# (measured: 1,000 pushes/s to a webhook collapsed to 145/s with timeouts; bench/bench_push.py).
MAX_IN_FLIGHT = 100


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, whichever client got it."""

    status_code: int
    headers: Mapping[str, str]  # lower-case names
    content: bytes
    http_version: str  # "HTTP/1.1" or "HTTP/2"

    @property
    def text(self) -> str:
        """The body as text (undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.content)


class PushClient:
    """One pooled client for one provider: HTTP/2 (httpx + h2) or HTTP/1.1 (aiohttp), the
    system's CA store unless ``ca_file`` names another (tests' self-signed CA), no proxy
    from the environment, no redirects, and at most :data:`MAX_IN_FLIGHT` requests at once."""

    def __init__(self, *, timeout: float, ca_file: str = "", http2: bool = True) -> None:
        self._context = ssl.create_default_context(cafile=ca_file or None)
        self._timeout = timeout
        self.http2 = http2
        self._httpx: httpx.AsyncClient | None = None
        if http2:
            self._httpx = httpx.AsyncClient(
                http2=True,
                verify=self._context,
                timeout=httpx.Timeout(timeout),
                limits=httpx.Limits(
                    max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT
                ),
                follow_redirects=False,
                trust_env=False,  # a push must not wander off through an HTTP(S)_PROXY variable
            )
        self._aiohttp: aiohttp.ClientSession | None = None  # made in the loop, on first use
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    def _session(self) -> aiohttp.ClientSession:
        if self._aiohttp is None:
            self._aiohttp = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, ssl=self._context),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                trust_env=False,
            )
        return self._aiohttp

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request (waiting for a free slot first); raises one of
        :data:`REQUEST_ERRORS` when no answer came."""
        async with self._slots:
            if self._httpx is not None:
                r = await self._httpx.request(
                    method, url, content=content, data=data, headers=headers
                )
                return Reply(r.status_code, dict(r.headers), r.content, r.http_version)
            async with self._session().request(
                method, url, data=content if content is not None else data,
                headers=headers, allow_redirects=False,
            ) as answer:  # fmt: skip
                body = await answer.read()
                v = answer.version
                version = f"HTTP/{v.major}.{v.minor}" if v is not None else "HTTP/1.1"
                names = {k.lower(): v for k, v in answer.headers.items()}
                return Reply(answer.status, names, body, version)

    async def post(
        self,
        url: str,
        *,
        content: bytes | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """A POST (see :meth:`request`)."""
        return await self.request("POST", url, content=content, data=data, headers=headers)

    async def aclose(self) -> None:
        """Close every connection."""
        if self._httpx is not None:
            await self._httpx.aclose()
        if self._aiohttp is not None:
            await self._aiohttp.close()


def make_client(*, timeout: float, ca_file: str = "", http2: bool = True) -> PushClient:
    """The client a provider sends with (see :class:`PushClient`)."""
    return PushClient(timeout=timeout, ca_file=ca_file, http2=http2)


def retry_after(response: Reply) -> float | None:
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


def transient(response: Reply, detail: str) -> PushResult | None:
    """RETRY for 429 and 5xx (the service is busy or down), else None."""
    if response.status_code == 429 or response.status_code >= 500:
        return PushResult(
            PushOutcome.RETRY, response.status_code, detail, retry_after=retry_after(response)
        )
    return None


def network_failure(exc: Exception) -> PushResult:
    """The outcome of an exception raised while talking to the service: timeouts and
    connection problems are worth a retry, anything else (a bad URL) is not."""
    if isinstance(exc, httpx.UnsupportedProtocol | aiohttp.InvalidURL):
        return PushResult(PushOutcome.FAILED, detail=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
        return PushResult(PushOutcome.RETRY, detail=f"timeout ({type(exc).__name__})")
    # Before ValueError: aiohttp's certificate error is one too (via ssl.CertificateError).
    if isinstance(exc, httpx.TransportError | aiohttp.ClientError | ssl.SSLError | OSError):
        return PushResult(PushOutcome.RETRY, detail=f"{type(exc).__name__}: {exc}")
    return PushResult(PushOutcome.FAILED, detail=f"{type(exc).__name__}: {exc}")


# What send() catches around a request: either client's own errors, an invalid URL built
# from a template (ValueError in aiohttp's URL and header checks), TLS and socket errors the
# clients did not wrap, and aiohttp's timeout (asyncio's).
REQUEST_ERRORS = (
    httpx.HTTPError,
    httpx.InvalidURL,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ValueError,
    ssl.SSLError,
    OSError,
)


def short(text: str, limit: int = 200) -> str:
    """A response body cut to one short log value."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
