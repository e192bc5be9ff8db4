"""The msilo service: request policy, the default routes, and the custom-route API.

``MsiloService.handle`` is the transaction layer's request handler.  The
default route is the admin guide's sample script: in ``registrar`` mode a
REGISTER saves the binding, is answered, then dumps the stored messages to the
contact just registered; a MESSAGE is relayed to the user's bindings and stored
(202) when the user is offline or every branch fails.  In ``silo`` mode every
MESSAGE is stored and a REGISTER (replicated by the front proxy) is answered
and triggers a dump.  A custom route (``server.route``) replaces the default
route and gets a :class:`RouteContext` with the script functions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from msilo.auth import Authenticator, require_registrar_owner, require_sender
from msilo.errors import (
    ConfigError,
    InvalidRecord,
    ParseError,
    QueueFull,
    SipError,
    StorageError,
)
from msilo.routing import mstore
from msilo.routing.dbhealth import DatabaseHealth
from msilo.routing.delivery import (
    Deliverer,
    DumpReport,
    Requester,
    binding_hop,
    direct_target,
    format_received,
    path_route,
    route_hop,
)
from msilo.routing.notify import NotifySettings, notification_for, send_notification
from msilo.routing.policy import ALLOW, check_request, check_source
from msilo.routing.pv import pv_values
from msilo.routing.ratelimit import RateLimiter
from msilo.routing.registrar import (
    IntervalTooBrief,
    RegistrarPolicy,
    RequestedBinding,
    contact_lines,
    dump_target,
    path_lines,
    plan_register,
    requested_bindings,
)
from msilo.routing.timefmt import parse_snd_time
from msilo.sip.message import SipRequest, SipURI
from msilo.sip.parser import normalize_aor, parse_uri
from msilo.storage.base import StoreOutcome, StoreResult
from msilo.storage.batch import BatchWriter
from msilo.storage.location import Binding
from msilo.transaction.client import ClientResult
from msilo.transaction.server import ServerTransaction
from msilo.transport.base import RELIABLE, Target

log = logging.getLogger("msilo.route")

RETRY_AFTER = ("Retry-After", "5")
Route = Callable[[SipRequest, "RouteContext"], Awaitable[None]]


@dataclass(frozen=True)
class ServiceSettings:
    """What the routes need from the configuration (built by the server layer)."""

    mode: str = "registrar"
    domains: frozenset[str] = frozenset()
    trusted: tuple[Any, ...] = ()
    expire_time: int = 259200
    snd_time_hdr: str | None = None
    snd_time_avp: str | None = None  # AVP name, e.g. "snd_time" for $avp(snd_time)
    transient_types: frozenset[str] = frozenset()  # relayed, never stored (lower-case)
    tz: dt.tzinfo = dt.UTC
    registrar: RegistrarPolicy = field(default_factory=RegistrarPolicy)
    notify: NotifySettings | None = None
    outbound_proxy: Target | None = None
    rate: float = 0.0  # requests per second per source; 0 = no limit
    burst: float = 0.0
    auth: AuthSettings | None = None  # digest authentication (D14); None = off


@dataclass(frozen=True)
class AuthSettings:
    """``[auth]`` as the routes use it."""

    realm: str
    secret: str
    nonce_expires: int = 300
    algorithms: tuple[str, ...] = ("SHA-256", "MD5")
    message: bool = False  # also challenge MESSAGE (407) and bind From to the identity


class RouteContext:
    """The script functions a route may call for one request."""

    def __init__(self, service: MsiloService, request: SipRequest, txn: ServerTransaction) -> None:
        self.service = service
        self.request = request
        self.txn = txn
        self.avp: dict[str, str] = {}  # $avp(name) values, e.g. avp["snd_time"] (D10)
        self.ruri: SipURI | None = None  # the Request-URI as the policy check parsed it
        # Set by m_store: the offline notification waits for the reply to this request, so
        # the sender learns "stored" (202) before it hears about the message stored.
        self.notify_pending = False

    @property
    def replied(self) -> bool:
        """True once a final response was sent."""
        return self.txn.final

    def reply(self, code: int, reason: str, headers: Collection[tuple[str, str]] = ()) -> None:
        """Answer the request (the first final answer wins; later ones are ignored)."""
        self.service.reply(self.txn, code, reason, headers)
        self.service.send_pending_notification(self)

    async def save(self) -> bool:
        """Registrar ``save()``: apply this REGISTER to the bindings and answer it
        (200 with every binding, or the error); True when answered 200."""
        return await self.service.save(self)

    async def m_store(
        self, owner: str | None = None, snd_time: int | str | None = None, notify: bool = True
    ) -> StoreResult:
        """Store the MESSAGE for ``owner`` (default: D3) and return the row's fate.

        Raises StorageError when the database fails (reply 503) and SipError for
        a request that cannot be stored (reply its status).
        """
        return await self.service.m_store(self, owner, snd_time, notify)

    async def m_dump(self, owner: str | None = None, max: int | None = None) -> DumpReport | None:
        """Deliver the owner's stored messages (default owner: the To URI) to the
        contact of this REGISTER; None when there is no contact that takes MESSAGE."""
        return await self.service.m_dump(self, owner, max)

    async def lookup(self, owner: str | None = None) -> list[Binding]:
        """The owner's current bindings that take MESSAGE (registrar mode)."""
        aor = self.service.owner(self.request, owner, self.ruri)
        return await self.service.lookup(aor)

    async def relay(self, owner: str | None = None) -> ClientResult | None:
        """Fork the MESSAGE to the owner's bindings; the first 2xx, else the best failure,
        else None when the owner has no binding.  Does not reply."""
        bindings = await self.lookup(owner)
        if not bindings:
            return None
        return await self.service.relay(self.request, bindings)


class MsiloService:
    """One worker's routing: policy, default or custom route, m_store, m_dump, relay."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        store: Any,
        writer: BatchWriter,
        requester: Requester,
        deliverer: Deliverer,
        count: Callable[[str], None],
        route: Route | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.requester = requester
        self.deliverer = deliverer
        self.count = count
        self.route = route
        self.limiter = RateLimiter(settings.rate, settings.burst) if settings.rate > 0 else None
        self.db = DatabaseHealth()
        auth = settings.auth
        self.auth = (
            Authenticator(
                store, auth.realm, auth.secret, nonce_expires=auth.nonce_expires,
                algorithms=auth.algorithms,
            )
            if auth is not None
            else None
        )  # fmt: skip

    # -- entry point --------------------------------------------------------------------

    async def handle(self, request: SipRequest, txn: ServerTransaction) -> None:
        """The transaction layer's handler: every new request comes through here."""
        self.count("requests")
        self.count(_METHOD_COUNTERS.get(request.method, "requests_other"))
        if self.limiter is not None and not self.limiter.allow(txn.source.ip):
            self.count("rate_limited")
            retry = ("Retry-After", str(self.limiter.retry_after()))
            self.reply(txn, 503, "Service Unavailable", [retry])
            return
        ctx: RouteContext | None = None
        try:
            if self.settings.mode == "silo":
                check_source(txn.source.ip, self.settings.trusted)
            ruri = check_request(request, self.settings.domains)
            if self.auth is not None and not await self._authenticated(request, txn):
                return
            ctx = RouteContext(self, request, txn)
            ctx.ruri = ruri
            if request.method == "OPTIONS":
                self.reply(txn, 200, "OK", [_allow()])
            elif self.route is not None:
                await self.route(request, ctx)
                if not txn.final:
                    log.warning(
                        "event=route_no_reply method=%s call_id=%s", request.method, request.call_id
                    )
                    self.reply(txn, 500, "Server Internal Error")
            elif request.method == "REGISTER":
                await self.default_register(ctx)
            else:
                await self.default_message(ctx)
        except IntervalTooBrief:
            self.reply(
                txn,
                423,
                "Interval Too Brief",
                [("Min-Expires", str(self.settings.registrar.min_expires))],
            )
        except SipError as exc:
            headers = [_allow()] if exc.status == 405 else []
            headers.extend(exc.headers)
            if exc.status >= 500 and exc.status != 513:
                headers.append(RETRY_AFTER)
            self.reply(txn, exc.status, exc.reason, headers)
        except StorageError as exc:
            self.count("store_failures")
            self.db.failed(exc, f"{request.method} call_id={request.call_id}")
            self.reply(txn, 503, "Service Unavailable", [RETRY_AFTER])
        if ctx is not None:
            # Stored but answered outside ctx.reply (a route error, the 500 of a silent
            # route): the request has its final answer now, so the sender may hear.
            self.send_pending_notification(ctx)

    async def _authenticated(self, request: SipRequest, txn: ServerTransaction) -> bool:
        """D14: REGISTER needs credentials of the AoR it registers; with ``auth.message`` a
        MESSAGE needs them too and its From must be the authenticated identity.  False when
        the request was answered (challenge or refusal)."""
        assert self.auth is not None and self.settings.auth is not None
        if request.method == "REGISTER":
            proxy = False
        elif request.method == "MESSAGE" and self.settings.auth.message:
            proxy = True
        else:
            return True
        outcome = await self.auth.check(request, proxy=proxy)
        identity = outcome.identity
        if identity is None:
            log.info("event=auth_%s method=%s status=%d detail=%r", outcome.verdict.name.lower(),
                     request.method, outcome.status, outcome.detail)  # fmt: skip
            self.reply(txn, outcome.status, outcome.reason, outcome.headers)
            return False
        if proxy:
            require_sender(request, identity)
        else:
            require_registrar_owner(request, identity)
        return True

    def reply(
        self,
        txn: ServerTransaction,
        code: int,
        reason: str,
        headers: Collection[tuple[str, str]] = (),
    ) -> None:
        """Answer ``txn`` and count the reply by class."""
        if txn.respond(code, reason, headers=tuple(headers)):
            self.count(f"replies_{min(code // 100, 6)}xx")

    # -- default routes -----------------------------------------------------------------

    async def default_register(self, ctx: RouteContext) -> None:
        """REGISTER: save the bindings (registrar mode), answer, then dump (D5)."""
        if await self.save(ctx):
            await ctx.m_dump()

    async def save(self, ctx: RouteContext) -> bool:
        """Save a REGISTER's bindings (registrar mode) and answer it; True on 200."""
        request, txn = ctx.request, ctx.txn
        if request.method != "REGISTER":
            raise SipError("save() needs a REGISTER", status=500, reason="Server Internal Error")
        if self.settings.mode == "registrar":
            wanted = requested_bindings(request, self.settings.registrar)
            bindings = await self.save_bindings(request, txn, wanted)
            if bindings is None:
                return False
            lines = contact_lines(bindings, int(time.time())) + path_lines(request)
            self.reply(txn, 200, "OK", lines)
        else:
            # Behind a proxy there is nothing to keep: the proxy is the registrar.
            self.reply(txn, 200, "OK", [("Contact", f"<{c.uri}>") for c in request.contacts])
        return True

    async def default_message(self, ctx: RouteContext) -> None:
        """MESSAGE: relay to an online user (registrar mode), else store and answer 202."""
        if self._transient(ctx.request):
            await self._relay_transient(ctx)
            return
        snd_time = None
        header = self.settings.snd_time_hdr
        if header is not None:
            snd_time = ctx.request.get_header(header)
        if self.settings.mode == "registrar":
            # Most MESSAGEs here are for offline users: the store asks the registrar in
            # its own round trip and stores at once; only an online owner is looked up
            # and relayed to (lookup and m_store in one database call, not two).
            outcome = await self.store_and_reply(ctx, snd_time=snd_time, unless_online=True)
            if outcome is not StoreOutcome.ONLINE:
                return
            result = await ctx.relay()
            if result is not None and result.success:
                self.count("relayed_messages")
                ctx.reply(result.status, result.reason)
                return
            if result is not None:
                log.info(
                    "event=relay_failed call_id=%s status=%d", ctx.request.call_id, result.status
                )
        await self.store_and_reply(ctx, snd_time=snd_time)

    def _transient(self, request: SipRequest) -> bool:
        if not self.settings.transient_types:
            return False
        ctype = request.content_type
        return ctype is not None and ctype.mime in self.settings.transient_types

    async def _relay_transient(self, ctx: RouteContext) -> None:
        """A typing indication or the like: to an online user now, or not at all.

        Delivered when the user comes back, hours later, it would only say something
        false ("alice is typing"), so it is never stored (field research #15).
        """
        result = await ctx.relay() if self.settings.mode == "registrar" else None
        if result is not None and result.success:
            self.count("relayed_messages")
            ctx.reply(result.status, result.reason)
            return
        self.count("transient_not_stored")
        if result is not None and not result.local:
            ctx.reply(result.status, result.reason)  # the device's own refusal
        else:
            ctx.reply(480, "Temporarily Unavailable")

    async def store_and_reply(
        self,
        ctx: RouteContext,
        owner: str | None = None,
        snd_time: int | str | None = None,
        *,
        unless_online: bool = False,
    ) -> StoreOutcome | None:
        """m_store, then 202 / 486 Mailbox Full / 503 as the outcome says (D9, D12);
        no answer when the owner is ONLINE (``unless_online``: the caller relays)."""
        try:
            result = await self.m_store(ctx, owner, snd_time, True, unless_online=unless_online)
        except QueueFull:
            self.count("store_failures")
            ctx.reply(503, "Service Unavailable", [RETRY_AFTER])
            return None
        if result.outcome is StoreOutcome.OVER_QUOTA:
            ctx.reply(486, "Mailbox Full")
        elif result.outcome is not StoreOutcome.ONLINE:
            ctx.reply(202, "Accepted")
        return result.outcome

    # -- script functions ---------------------------------------------------------------

    def owner(self, request: SipRequest, explicit: str | None, ruri: SipURI | None = None) -> str:
        """The normalised owner AoR of a request (D3)."""
        return mstore.owner_of(request, explicit, self.settings.domains, ruri)

    async def m_store(
        self,
        ctx: RouteContext,
        owner: str | None,
        snd_time: int | str | None,
        notify: bool,
        *,
        unless_online: bool = False,
    ) -> StoreResult:
        """Store the request; answer-worthy errors are raised, the row's fate returned
        (ONLINE, nothing stored, when ``unless_online`` and the owner is registered)."""
        request = ctx.request
        aor = self.owner(request, owner, ctx.ruri)
        now = int(time.time())
        when = self._snd_time(ctx, snd_time)
        try:
            message = mstore.new_message(
                request,
                aor,
                now=now,
                expire_time=self.settings.expire_time,
                snd_time=when,
                unless_online=unless_online,
            )
            result = await self.writer.submit(message)
        except InvalidRecord as exc:
            raise ParseError(f"cannot store: {exc}") from None
        self.db.ok()
        if result.outcome is StoreOutcome.STORED:
            self.count("stored_messages")
            log.info(
                "event=stored mid=%s aor=%s from=%s snd_time=%d",
                result.mid,
                aor,
                message.src_addr,
                when,
            )
            if notify:
                ctx.notify_pending = True  # sent after the reply (send_pending_notification)
        elif result.outcome is StoreOutcome.ONLINE:
            pass  # nothing stored: the caller relays
        elif result.outcome is StoreOutcome.DUPLICATE:
            self.count("duplicates")
            log.info("event=duplicate mid=%s aor=%s call_id=%s", result.mid, aor, request.call_id)
        else:
            self.count("quota_rejections")
            log.info("event=mailbox_full aor=%s from=%s", aor, message.src_addr)
        return result

    def _snd_time(self, ctx: RouteContext, value: int | str | None) -> int:
        if value is None and self.settings.snd_time_avp is not None:
            value = ctx.avp.get(self.settings.snd_time_avp)
        if value is None:
            return 0
        if isinstance(value, int):
            return max(value, 0)
        parsed = parse_snd_time(value, self.settings.tz)
        if parsed is None:
            # D10: a malformed send time stores an ordinary message, with a warning.
            log.warning("event=bad_snd_time value=%r call_id=%s", value, ctx.request.call_id)
            return 0
        return parsed

    def send_pending_notification(self, ctx: RouteContext) -> None:
        """The offline notification m_store asked for, once the request has its final reply."""
        if ctx.notify_pending and ctx.txn.final:
            ctx.notify_pending = False
            self._notify(ctx)

    def _notify(self, ctx: RouteContext) -> None:
        settings = self.settings.notify
        if settings is None:
            return
        source = ctx.txn.source
        values = pv_values(ctx.request, (source.ip, source.port), avp=ctx.avp)
        note = notification_for(ctx.request, values, settings)
        if note is None:
            return
        if send_notification(self.requester, note, self.settings.outbound_proxy):
            self.count("notifications_sent")
            log.debug("event=notified to=%s", note.uri)

    async def m_dump(
        self, ctx: RouteContext, owner: str | None, limit: int | None
    ) -> DumpReport | None:
        """Dump the owner's messages to the contact this REGISTER registers (D5)."""
        request, source = ctx.request, ctx.txn.source
        if request.method != "REGISTER":
            return None
        wanted = (
            requested_bindings(request, self.settings.registrar)
            if self.settings.mode == "registrar"
            else _silo_bindings(request, self.settings.registrar)
        )
        contact = dump_target(wanted, request.allow)
        if contact is None:
            return None
        if owner is not None:
            aor = normalize_aor(owner)
        elif request.to is not None:
            aor = normalize_aor(request.to.uri)
        else:
            return None
        user, host = mstore.split_owner(aor)
        registered_from = Target(source.ip, source.port, source.transport, True)
        if self.settings.mode != "registrar":
            # Behind a proxy the REGISTER came from the proxy, not from the device.
            direct = Target.from_uri(parse_uri(contact.uri))
        elif source.transport in RELIABLE:
            # Deliver over the connection the device registered on (NAT, RFC 5626).
            direct = registered_from
        else:
            direct = direct_target(parse_uri(contact.uri), registered_from)
        hop = route_hop(path_route(request.get_headers("path")), direct)
        report = await self.deliverer.dump(
            user, host, contact.uri, hop.target, limit=limit, route=hop.route
        )
        if report.delivered or report.failed:
            log.info(
                "event=dump_done aor=%s delivered=%d failed=%d released=%d",
                aor,
                report.delivered,
                report.failed,
                report.released,
            )
        return report

    async def save_bindings(
        self, request: SipRequest, txn: ServerTransaction, wanted: list[RequestedBinding]
    ) -> list[Binding] | None:
        """Apply a REGISTER to the location table; None when it was answered with an error."""
        if request.to is None:
            raise ParseError("missing To header")
        aor = normalize_aor(request.to.uri)
        user, host = mstore.split_owner(aor)
        now = int(time.time())
        source = txn.source
        plan = plan_register(
            request,
            wanted,
            username=user,
            domain=host,
            now=now,
            received=format_received(source.transport, source.ip, source.port),
            transport=source.transport.lower(),
        )
        outcome = await self.store.update_bindings(user, host, plan, now=now)
        self.db.ok()
        if outcome.error is not None:
            self.reply(txn, *outcome.error)
            return None
        log.info("event=registered aor=%s contacts=%d", aor, len(outcome.bindings))
        return list(outcome.bindings)

    async def lookup(self, aor: str) -> list[Binding]:
        """Current bindings of ``aor`` that take MESSAGE."""
        if self.settings.mode != "registrar":
            return []
        user, host = mstore.split_owner(aor)
        bindings = await self.store.lookup_bindings(user, host, now=int(time.time()))
        return [b for b in bindings if b.takes_message()]

    async def relay(self, request: SipRequest, bindings: list[Binding]) -> ClientResult:
        """Fork ``request`` to every binding statefully; first 2xx wins (D: relay)."""
        assert request.from_ is not None and request.to is not None and request.cseq is not None
        max_forwards = (request.max_forwards if request.max_forwards is not None else 70) - 1
        hops = [binding_hop(b) for b in bindings]
        branches = [
            asyncio.ensure_future(
                self.requester.send_message(
                    b.contact,
                    self.settings.outbound_proxy or hop.target,
                    route=hop.route,
                    from_=_name_addr(request.from_.display, request.from_.uri),
                    to=_name_addr(request.to.display, request.to.uri),
                    body=request.body,
                    content_type=request.content_type.raw if request.content_type else None,
                    call_id=request.call_id,
                    from_tag=request.from_.tag,
                    cseq=request.cseq.number,
                    max_forwards=max(max_forwards, 0),
                )
            )
            for b, hop in zip(bindings, hops, strict=True)
        ]
        best: ClientResult | None = None
        for next_done in asyncio.as_completed(branches):
            result = await next_done
            if result.success:
                return result  # the other branches finish on their own
            if best is None or _better_failure(result, best):
                best = result
        assert best is not None
        return best


_METHOD_COUNTERS = {
    "REGISTER": "requests_register",
    "MESSAGE": "requests_message",
    "OPTIONS": "requests_options",
}


def _allow() -> tuple[str, str]:
    name, _, value = ALLOW.partition(": ")
    return name, value


def _name_addr(display: str | None, uri: str) -> str:
    if display:
        quoted = display.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{uri}>'
    return f"<{uri}>"


def _better_failure(a: ClientResult, b: ClientResult) -> bool:
    # A real answer from a device says more than a local timeout.
    if a.local != b.local:
        return not a.local
    return a.status < b.status


def _silo_bindings(request: SipRequest, policy: RegistrarPolicy) -> list[RequestedBinding]:
    # Behind a proxy the lifetimes were already policed: only "positive or not" matters.
    result = []
    for contact in request.contacts:
        expires = contact.expires if contact.expires is not None else request.expires
        result.append(
            RequestedBinding(contact, policy.default_expires if expires is None else expires)
        )
    return result


def load_route(spec: str, search: Sequence[str] = ()) -> Route:
    """Import ``module:function`` for ``server.route``; ConfigError naming what is wrong.

    ``search``: directories tried after ``sys.path`` (the configuration file's directory,
    then the working directory), so a ``myroute.py`` beside ``msilo.toml`` or in the
    directory msilo was started from imports without ``PYTHONPATH``.
    """
    module_name, _, attr = spec.partition(":")
    for directory in search:
        # Appended, never prepended: a route module must not shadow an installed package.
        if directory and directory not in sys.path:
            sys.path.append(directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        where = f"; looked in sys.path and {', '.join(search)}" if search else ""
        raise ConfigError(f"server.route: cannot import {module_name!r} ({exc}{where})") from None
    route = getattr(module, attr, None)
    if route is None or not asyncio.iscoroutinefunction(route):
        raise ConfigError(f"server.route: {spec!r} is not an async function")
    return route  # type: ignore[no-any-return]
