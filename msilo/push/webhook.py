"""The generic provider: one HTTP request per push to a URL of the operator's, built from
templates (``[push.webhook]``), for a push gateway, a chat bridge or an SMS fallback."""

from __future__ import annotations

from msilo.config import WebhookConfig
from msilo.push.base import PushOutcome, PushProvider, PushRequest, PushResult
from msilo.push.http import (
    REQUEST_ERRORS,
    make_client,
    network_failure,
    short,
    transient,
)
from msilo.push.template import check_template, render_header, render_json, render_url


def template_values(request: PushRequest) -> dict[str, str]:
    """The value of every placeholder for ``request`` (unescaped)."""
    target = request.target
    return {
        "user": target.username,
        "domain": target.domain,
        "aor": target.aor,
        "device": target.device,
        "provider": target.provider,
        "prid": target.prid,
        "param": target.param or "",
        "count": str(request.count),
        "from": request.from_uri,
        "call_id": request.call_id,
        "body": request.body or "",
    }


class WebhookProvider(PushProvider):
    """POSTs (or GETs, PUTs...) the filled-in templates; 2xx is sent, 404/410 means the
    device is gone, 429/5xx and timeouts are retried, any other answer is a failure."""

    def __init__(self, config: WebhookConfig, name: str = "webhook") -> None:
        self.name = name
        self.config = config
        self._url = check_template(config.url)
        self._body = check_template(config.body)
        self._headers = [(k, check_template(v)) for k, v in config.headers]
        self._json = config.header("Content-Type") is None
        # A webhook is often a small HTTP/1.1 service: HTTP/2 only when it offers it (ALPN).
        self._client = make_client(timeout=config.timeout, ca_file=config.ca_file, http2=False)

    async def send(self, request: PushRequest) -> PushResult:
        """Send the webhook request for ``request``."""
        values = template_values(request)
        headers = {k: render_header(v, values) for k, v in self._headers}
        content: bytes | None = None
        if self.config.method != "GET":
            content = render_json(self._body, values).encode(errors="replace")
            if self._json:
                headers["Content-Type"] = "application/json"
        try:
            response = await self._client.request(
                self.config.method, render_url(self._url, values), content=content, headers=headers
            )
        except REQUEST_ERRORS as exc:
            return network_failure(exc)
        status = response.status_code
        if 200 <= status < 300:
            return PushResult(PushOutcome.SENT, status)
        detail = short(response.text)
        if status in (404, 410):  # the gateway no longer knows this device
            return PushResult(PushOutcome.DEAD_TOKEN, status, detail)
        return transient(response, detail) or PushResult(PushOutcome.FAILED, status, detail)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()
