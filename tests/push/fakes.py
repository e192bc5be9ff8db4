"""Local stand-ins for FCM, APNs and a webhook receiver, for the push tests and for the
server's end-to-end tests.

Each fake is a real HTTP server (tests/push/httpserver.py: h2 and h11) on 127.0.0.1 and a
free port, HTTP/2 over TLS with a self-signed CA made here (APNs speaks nothing else). It
checks what the real service checks: the JWT's signature with the test key (RS256 for FCM's
OAuth assertion, ES256 for the APNs provider token), its claims, the required headers, the
JSON shape. It answers as the real one does, including the dead-token and 429 answers, and
records every request it got.

    async with FakeFcm.running(tls) as fcm:       # or the fixtures in tests/push/conftest.py
        settings = fcm.settings(tmp_path)         # the [push.fcm] table pointing at it
        ...
        assert len(fcm.accepted) == 1

Switches: ``dead_tokens`` (a set of tokens the service says are gone), ``fail_next`` (a list
of statuses to answer first, e.g. ``[429, 503]``), ``retry_after``, ``delay`` (seconds before
answering, for timeouts).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, unquote

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.push.httpserver import HttpServer, Request, Response

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


class Clock:
    """Wall-clock seconds that a test can move forward, shared by a provider and its fake
    (a token older than an hour is then tested without waiting an hour)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        self.offset += seconds


# ---- TLS and keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it signed, for 127.0.0.1 and localhost."""

    ca_file: str
    cert_file: str
    key_file: str


def make_tls(directory: Path) -> TlsFiles:
    """Write a fresh CA and a server certificate for 127.0.0.1/localhost into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "msilo test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key")
    )
    Path(files.ca_file).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(files.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(files.key_file).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def rsa_key() -> rsa.RSAPrivateKey:
    """A fresh RSA key, the kind a Google service account has."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key, the kind an APNs .p8 holds."""
    return ec.generate_private_key(ec.SECP256R1())


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def write_service_account(
    path: Path,
    key: rsa.RSAPrivateKey,
    *,
    token_uri: str,
    client_email: str = "msilo-push@msilo-test.iam.gserviceaccount.com",
    project_id: str = "msilo-test",
) -> Path:
    """Write a service-account JSON key of the shape Google's console downloads."""
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": project_id,
                "private_key_id": secrets.token_hex(20),
                "private_key": _pkcs8(key),
                "client_email": client_email,
                "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri,
            }
        )
    )
    return path


def write_p8(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """Write an APNs token-signing key as Apple's ``AuthKey_<KEYID>.p8`` (PEM PKCS #8)."""
    path.write_text(_pkcs8(key))
    return path


# ---- the servers ------------------------------------------------------------------------


@dataclass
class Recorded:
    """One request a fake received."""

    method: str
    path: str  # percent-decoded (the ASGI path)
    query: str
    http_version: str
    headers: dict[str, str]
    body: bytes
    raw_path: str = ""  # as sent
    status: int = 0  # what the fake answered

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


@dataclass
class Answer:
    """What a fake answers."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Self:
        """A JSON answer."""
        return cls(
            status,
            json.dumps(data).encode(),
            [("content-type", "application/json")] + (headers or []),
        )


class FakeServer:
    """A fake service: records each request and answers it in ``handle``; ``running`` serves it
    on 127.0.0.1 (tests/push/httpserver.py)."""

    name: ClassVar[str] = "fake"

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.endpoint = ""  # base URL once running
        self.requests: list[Recorded] = []
        # statuses (or whole answers) to give before the real answer, first one first
        self.fail_next: list[int | Answer] = []
        self.retry_after: str | None = None  # Retry-After sent with a 429/503
        self.delay = 0.0  # seconds before answering
        self.received = asyncio.Event()  # set on every request (tests wait on it)
        self.tls: TlsFiles | None = None

    def _ca(self) -> dict[str, Any]:
        return {"ca_file": self.tls.ca_file} if self.tls is not None else {}

    @property
    def accepted(self) -> list[Recorded]:
        """The requests answered 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        """Wait until ``count`` requests arrived (at most ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.received.clear()
                await self.received.wait()
        return self.requests

    async def handle(self, request: Recorded) -> Answer:  # pragma: no cover - overridden
        """The answer to ``request``."""
        raise NotImplementedError

    def failure(self, status: int | Answer) -> Answer:
        """The answer for a status queued in ``fail_next``."""
        if isinstance(status, Answer):
            return status
        headers = [("retry-after", self.retry_after)] if self.retry_after is not None else []
        return Answer(status, b"", headers)

    async def serve(self, raw: Request) -> Response:
        """Record ``raw`` and answer it (the HttpServer handler)."""
        path, _, query = raw.target.partition("?")
        request = Recorded(
            method=raw.method,
            path=unquote(path),
            query=query,
            http_version=raw.http_version,
            headers={k.lower(): v for k, v in raw.headers},
            body=raw.body,
            raw_path=path,
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = await self.route(request)
        request.status = answer.status
        self.received.set()
        return Response(answer.status, answer.headers, answer.body)

    async def route(self, request: Recorded) -> Answer:
        """The answer to ``request``, recorded in ``requests``."""
        self.requests.append(request)
        if self.fail_next:
            return self.failure(self.fail_next.pop(0))
        return await self.handle(request)

    @classmethod
    @asynccontextmanager
    async def running(cls, tls: TlsFiles | None, **kwargs: Any) -> AsyncIterator[Self]:
        """Start a fake on 127.0.0.1:<free port> (HTTPS with HTTP/2 by ALPN with ``tls``,
        else plain HTTP/1.1) and stop it on exit."""
        fake = cls(**kwargs)
        server = HttpServer(
            fake.serve,
            cert_file=tls.cert_file if tls else "",
            key_file=tls.key_file if tls else "",
        )
        await server.start()
        fake.endpoint = server.endpoint
        fake.tls = tls
        try:
            yield fake
        finally:
            await server.stop()


def fcm_error(
    status: int, google_status: str, message: str, error_code: str | None = None
) -> Answer:
    # FCM v1 error shape: google.rpc.Status with an FcmError detail.
    error: dict[str, Any] = {"code": status, "message": message, "status": google_status}
    if error_code is not None:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": error_code,
            }
        ]
    return Answer.json(status, {"error": error})


class FakeFcm(FakeServer):
    """Google's OAuth 2 token endpoint (``POST /token``) and FCM HTTP v1
    (``POST /v1/projects/{project}/messages:send``).

    ``requests`` holds the messages:send requests, ``token_requests`` the token exchanges.
    ``dead_tokens`` get 404 UNREGISTERED, ``invalid_tokens`` 400 INVALID_ARGUMENT.
    """

    name = "fcm"
    TOKEN_LIFETIME = 3599

    def __init__(self, clock: Clock | None = None, project_id: str = "msilo-test") -> None:
        super().__init__(clock)
        self.project_id = project_id
        self.key = rsa_key()
        self.client_email = "msilo-push@msilo-test.iam.gserviceaccount.com"
        self.token_requests: list[Recorded] = []
        self.access_tokens: dict[str, float] = {}  # token -> expiry (clock seconds)
        self.dead_tokens: set[str] = set()
        self.invalid_tokens: set[str] = set()
        self.token_fail_next: list[int | Answer] = []  # statuses the token endpoint answers first

    @property
    def token_endpoint(self) -> str:
        """The token URL (the service account's ``token_uri``)."""
        return f"{self.endpoint}/token"

    def write_service_account(self, path: Path, key: rsa.RSAPrivateKey | None = None) -> Path:
        """Write a service-account key for this fake (signed with ``key``: default the one
        the fake trusts)."""
        return write_service_account(
            path,
            key or self.key,
            token_uri=self.token_endpoint,
            client_email=self.client_email,
            project_id=self.project_id,
        )

    def settings(self, directory: Path, **extra: Any) -> dict[str, Any]:
        """A ``[push.fcm]`` table that points at this fake (and trusts its CA)."""
        account = self.write_service_account(directory / "fcm-service-account.json")
        table = {"service_account": str(account), "endpoint": self.endpoint}
        return table | self._ca() | extra

    def revoke_access_tokens(self) -> None:
        """Make every access token issued so far invalid (the next push gets 401)."""
        self.access_tokens.clear()

    async def route(self, request: Recorded) -> Answer:
        """Token exchanges go to ``token_requests``, the rest to messages:send."""
        if request.path != "/token":
            return await super().route(request)
        self.token_requests.append(request)
        if self.token_fail_next:
            return self.failure(self.token_fail_next.pop(0))
        return self._exchange(request)

    def _exchange(self, request: Recorded) -> Answer:
        # RFC 7523 §2.1: grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer + assertion.
        def refuse(description: str) -> Answer:
            return Answer.json(400, {"error": "invalid_grant", "error_description": description})

        if request.method != "POST":
            return Answer(405)
        if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return Answer.json(400, {"error": "invalid_request"})
        form = parse_qs(request.body.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return Answer.json(400, {"error": "unsupported_grant_type"})
        assertion = (form.get("assertion") or [""])[0]
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.key.public_key(),
                algorithms=["RS256"],
                audience=self.token_endpoint,
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iss", "aud", "iat", "exp", "scope"],
                },
            )
        except jwt.PyJWTError as exc:
            return refuse(f"Invalid JWT Signature. ({type(exc).__name__})")
        now = self.clock()
        if header.get("alg") != "RS256":
            return refuse("Invalid JWT algorithm")
        if claims["iss"] != self.client_email:
            return refuse("Invalid JWT: iss")
        if FCM_SCOPE not in str(claims["scope"]).split():
            return refuse("Invalid JWT: scope")
        if claims["exp"] - claims["iat"] > 3600:
            return refuse("Invalid JWT: expiration must be at most one hour after iat")
        if claims["exp"] < now or claims["iat"] > now + 60:
            return refuse(
                "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
            )
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.access_tokens[token] = now + self.TOKEN_LIFETIME
        return Answer.json(
            200, {"access_token": token, "expires_in": self.TOKEN_LIFETIME, "token_type": "Bearer"}
        )

    async def handle(self, request: Recorded) -> Answer:
        """messages:send as FCM HTTP v1 answers it."""
        expected = f"/v1/projects/{self.project_id}/messages:send"
        if request.path != expected:
            return fcm_error(404, "NOT_FOUND", "Requested entity was not found.")
        if request.method != "POST":
            return fcm_error(405, "METHOD_NOT_ALLOWED", "Method not allowed.")
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ")
        expiry = self.access_tokens.get(token)
        if not auth.startswith("Bearer ") or expiry is None or expiry < self.clock():
            return fcm_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token",
            )
        try:
            message = request.json()["message"]
            device = message["token"]
            data = message.get("data", {})
            assert isinstance(device, str) and device
            assert isinstance(data, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            return fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        bad = [k for k, v in data.items() if not isinstance(v, str)]
        if bad:
            return fcm_error(
                400,
                "INVALID_ARGUMENT",
                f"Invalid value at 'message.data[0].value' (TYPE_STRING), {bad[0]!r}",
            )
        android = message.get("android", {})
        if android.get("priority", "normal").lower() not in ("normal", "high"):
            return fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.android.priority'")
        if device in self.dead_tokens:
            return fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
        if device in self.invalid_tokens:
            return fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
            )
        name = f"projects/{self.project_id}/messages/0:{uuid.uuid4().hex}"
        return Answer.json(200, {"name": name})


class FakeApns(FakeServer):
    """APNs (``POST /3/device/{token}``, HTTP/2 only, token authentication).

    ``topics`` are the bundle ids the key's team may push to; ``dead_tokens`` get 410
    Unregistered; a token that is not 64 hex digits gets 400 BadDeviceToken.
    """

    name = "apns"

    def __init__(
        self,
        clock: Clock | None = None,
        team_id: str = "TEAM123456",
        key_id: str = "KEY1234567",
        topics: tuple[str, ...] = ("com.example.msilo", "com.example.msilo.voip"),
    ) -> None:
        super().__init__(clock)
        self.team_id = team_id
        self.key_id = key_id
        self.topics = set(topics)
        self.key = ec_key()
        self.dead_tokens: set[str] = set()
        self.expired_before = 0.0  # provider tokens issued before this are "expired"
        self.provider_tokens: list[str] = []  # distinct JWTs seen, in order

    def write_p8(self, path: Path, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
        """Write the .p8 key this fake trusts (or ``key``)."""
        return write_p8(path, key or self.key)

    def settings(self, directory: Path, **extra: Any) -> dict[str, Any]:
        """A ``[push.apns]`` table that points at this fake (and trusts its CA)."""
        p8 = self.write_p8(directory / f"AuthKey_{self.key_id}.p8")
        table = {
            "key_file": str(p8),
            "key_id": self.key_id,
            "team_id": self.team_id,
            "topic": "com.example.msilo",
            "endpoint": self.endpoint,
        }
        return table | self._ca() | extra

    def expire_provider_tokens(self) -> None:
        """Answer 403 ExpiredProviderToken to every JWT issued until now."""
        self.expired_before = self.clock() + 1

    @staticmethod
    def _reason(status: int, reason: str, **extra: Any) -> Answer:
        return Answer.json(status, {"reason": reason} | extra, [("apns-id", str(uuid.uuid4()))])

    def failure(self, status: int | Answer) -> Answer:
        """A queued failure, with the reason APNs gives for it."""
        if isinstance(status, Answer):
            return status
        reason = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}
        answer = self._reason(status, reason.get(status, "BadRequest"))
        if self.retry_after is not None:
            answer.headers.append(("retry-after", self.retry_after))
        return answer

    async def handle(self, request: Recorded) -> Answer:
        """A push as APNs answers it (checks in the order Apple documents its reasons)."""
        h = request.headers
        if request.http_version != "2":
            return self._reason(400, "BadHttpVersion")  # APNs speaks HTTP/2 only
        if request.method != "POST":
            return self._reason(405, "MethodNotAllowed")
        if not request.path.startswith("/3/device/"):
            return self._reason(404, "BadPath")
        device = request.path.removeprefix("/3/device/")
        auth = h.get("authorization", "")
        if not auth.startswith("bearer "):
            return self._reason(403, "MissingProviderToken")
        token = auth.removeprefix("bearer ")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["ES256"],
                options={"verify_iat": False, "require": ["iss", "iat"]},
            )
        except jwt.PyJWTError:
            return self._reason(403, "InvalidProviderToken")
        if header.get("kid") != self.key_id or claims["iss"] != self.team_id:
            return self._reason(403, "InvalidProviderToken")
        if token not in self.provider_tokens:
            self.provider_tokens.append(token)
        now = self.clock()
        iat = float(claims["iat"])
        if iat < now - 3600 or iat < self.expired_before:
            return self._reason(403, "ExpiredProviderToken")
        if iat > now + 60:
            return self._reason(403, "InvalidProviderToken")
        topic = h.get("apns-topic")
        if not topic:
            return self._reason(400, "MissingTopic")
        if topic not in self.topics:
            return self._reason(400, "TopicDisallowed")
        push_type = h.get("apns-push-type")
        if push_type not in ("alert", "background", "voip"):
            return self._reason(400, "InvalidPushType")
        if push_type == "voip" and not topic.endswith(".voip"):
            return self._reason(400, "DeviceTokenNotForTopic")
        priority = h.get("apns-priority", "10")
        if priority not in ("5", "10") or (push_type == "background" and priority != "5"):
            return self._reason(400, "BadPriority")
        if not h.get("apns-expiration", "0").isdigit():
            return self._reason(400, "BadExpirationDate")
        if len(h.get("apns-collapse-id", "")) > 64:
            return self._reason(400, "BadCollapseId")
        if len(request.body) > 4096:
            return self._reason(413, "PayloadTooLarge")
        try:
            payload = request.json()
            assert isinstance(payload, dict) and isinstance(payload.get("aps"), dict)
        except (ValueError, AssertionError):
            return self._reason(400, "PayloadEmpty" if not request.body else "BadPayload")
        if len(device) != 64 or any(c not in "0123456789abcdef" for c in device):
            return self._reason(400, "BadDeviceToken")
        if device in self.dead_tokens:
            return self._reason(410, "Unregistered", timestamp=int(now * 1000))
        return Answer(200, b"", [("apns-id", h.get("apns-id") or str(uuid.uuid4()))])


class FakeWebhook(FakeServer):
    """Any URL, any method: answers ``status`` (200) unless the device is in
    ``dead_tokens`` (looked for in the path and the body: answers 410)."""

    name = "webhook"

    def __init__(self, clock: Clock | None = None, status: int = 200) -> None:
        super().__init__(clock)
        self.status = status
        self.dead_tokens: set[str] = set()

    def settings(self, directory: Path, **extra: Any) -> dict[str, Any]:
        """A ``[push.webhook]`` table that points at this fake."""
        return {"url": f"{self.endpoint}/push/$prid"} | self._ca() | extra

    async def handle(self, request: Recorded) -> Answer:
        """``status``, or 410 for a dead token."""
        text = request.path + request.body.decode(errors="replace")
        if any(token in text for token in self.dead_tokens):
            return Answer.json(410, {"error": "unknown device"})
        return Answer.json(self.status, {"ok": self.status < 300})
