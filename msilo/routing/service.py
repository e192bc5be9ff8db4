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
import dataclasses
import datetime as dt
import importlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from msilo.auth import (
    Authenticator,
    AuthOutcome,
    Verdict,
    require_registrar_owner,
    require_sender,
)
from msilo.auth.throttle import AuthThrottle
from msilo.errors import (
    ConfigError,
    InvalidRecord,
    ParseError,
    QueueFull,
    SipError,
    StorageError,
)
from msilo.lograte import LogRate
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
from msilo.routing.overload import OverloadGuard
from msilo.routing.policy import ALLOW, check_request, check_source
from msilo.routing.push import NOT_SUPPORTED, PushDispatch
from msilo.routing.pv import pv_values
from msilo.routing.ratelimit import RateLimiter
from msilo.routing.registrar import (
    IntervalTooBrief,
    RegistrarPolicy,
    RequestedBinding,
    contact_lines,
    device_changes,
    device_key,
    dump_target,
    path_lines,
    plan_register,
    requested_bindings,
    single_binding,
    takes_message,
    udp_contact_budget,
)
from msilo.routing.timefmt import parse_snd_time
from msilo.routing.writebehind import RefreshWriteBehind
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
    deliver_to: str = "all"  # "all": every device once; "first": the first 2xx takes it
    device_memory: int = 2592000  # seconds a device is remembered after its REGISTER
    relay_timeout: float = 5.0  # no 2xx from any device by then: store, answer 202
    tz: dt.tzinfo = dt.UTC
    registrar: RegistrarPolicy = field(default_factory=RegistrarPolicy)
    notify: NotifySettings | None = None
    outbound_proxy: Target | None = None
    max_queue_delay: float = 0.0  # overload: shed while the oldest waits longer; 0 = off
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
    source_failures: int = 10  # per source per window, then banned (0 = no limit)
    user_failures: int = 10  # per identity per window, then only fresh sources are judged
    failure_window: int = 600


class RouteContext:
    """The script functions a route may call for one request."""

    def __init__(self, service: MsiloService, request: SipRequest, txn: ServerTransaction) -> None:
        self.service = service
        self.request = request
        self.txn = txn
        self.avp: dict[str, str] = {}  # $avp(name) values, e.g. avp["snd_time"] (D10)
        self.ruri: SipURI | None = None  # the Request-URI as the policy check parsed it
        self.devices_tracked = False  # this REGISTER's devices were remembered/forgotten
        self.stored: StoreResult | None = None  # the fate of this request's m_store
        self.pending: bool | None = None  # REGISTER: the owner has stored messages (None: ?)
        self.wanted: list[RequestedBinding] | None = None  # REGISTER: its Contacts, judged
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
        self.service.waiting_elsewhere(self.txn)
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
        push: PushDispatch | None = None,
        backlog: Callable[[], int] | None = None,
        write_behind: RefreshWriteBehind | None = None,
    ) -> None:
        self.settings = settings
        self.push = push  # RFC 8599 wake-up; None: no [push] provider configured
        self.write_behind = write_behind  # registrar.write_behind; None: write through
        self.store = store
        self.writer = writer
        self.requester = requester
        self.deliverer = deliverer
        self.count = count
        self.route = route
        self.limiter = RateLimiter(settings.rate, settings.burst) if settings.rate > 0 else None
        self.guard = (
            OverloadGuard(settings.max_queue_delay, backlog=backlog)
            if settings.max_queue_delay > 0
            else None
        )
        self.db = DatabaseHealth()
        self._background: set[asyncio.Future[None]] = set()  # relay branches followed
        # A guesser decides how many failures there are: a few lines a second, not one each.
        self._auth_log = LogRate(log)
        auth = settings.auth
        self.auth = (
            Authenticator(
                store, auth.realm, auth.secret, nonce_expires=auth.nonce_expires,
                algorithms=auth.algorithms,
                throttle=AuthThrottle(
                    store, source_failures=auth.source_failures,
                    user_failures=auth.user_failures, window=auth.failure_window,
                ),
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
        guard = self.guard
        if guard is not None and not guard.admit(txn):
            self.count("overload_shed")
            self.reply(txn, 503, "Service Unavailable", [RETRY_AFTER])
            return
        try:
            await self._handle(request, txn)
        finally:
            if guard is not None:
                guard.done(txn)

    def shed_early(self, request: SipRequest) -> bool:
        """The transaction layer's overload check for a new request, before a transaction
        or a task is made for it: True = refuse it now (the layer answers 503 +
        Retry-After statelessly).  Refusing then costs a parse and a send, a fraction of
        serving (RFC 6357 §3.2)."""
        guard = self.guard
        if guard is None or not guard.overloaded():
            return False
        guard.refused()
        self.count("requests")
        self.count(_METHOD_COUNTERS.get(request.method, "requests_other"))
        self.count("overload_shed")
        self.count("replies_5xx")
        return True

    async def _handle(self, request: SipRequest, txn: ServerTransaction) -> None:
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
        except InvalidRecord as exc:
            # A value no table can hold is the request's fault, never an outage (issue 14).
            self.reply(txn, 400, f"Bad Request: {exc}")
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
        ip = txn.source.ip
        throttle = self.auth.throttle
        if throttle is not None and throttle.banned(ip):
            self.count("auth_dropped")
            txn.drop()  # a banned source: silence, and no database round trip
            return False
        outcome = await self.auth.check(request, proxy=proxy, source=ip)
        identity = outcome.identity
        if identity is None:
            self._auth_failed(request, txn, outcome)
            return False
        if proxy:
            require_sender(request, identity)
        else:
            require_registrar_owner(request, identity)
        return True

    def _auth_failed(
        self, request: SipRequest, txn: ServerTransaction, outcome: AuthOutcome
    ) -> None:
        if outcome.verdict is Verdict.DROPPED:
            self.count("auth_dropped")
            txn.drop()
            return
        if outcome.throttled:
            self.count("auth_throttled")
        elif outcome.judged and not outcome.judged_right:
            self.count("auth_failures")
        self._auth_log.log(logging.INFO, f"auth_{outcome.verdict.name.lower()}",
                      "method=%s status=%d detail=%r source=%s", request.method, outcome.status,
                      outcome.detail, txn.source.ip)  # fmt: skip
        self.reply(txn, outcome.status, outcome.reason, outcome.headers)

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
            if self.guard is not None:
                self.guard.done(txn)  # what follows (a dump) is not the sender's wait

    def waiting_elsewhere(self, txn: ServerTransaction) -> None:
        """``txn`` now waits on a device (a relay), not on this server's queue."""
        if self.guard is not None:
            self.guard.done(txn)

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
        wanted = self.wanted(ctx)
        push = self.push
        asked = push.requested(wanted) if push is not None else []
        served = push.served(asked) if push is not None else []
        if self.settings.mode == "registrar":
            if push is not None and (missing := push.unsupported(asked)) is not None:
                # RFC 8599 §5.2: refused, with the services we do push with.
                log.info(
                    "event=push_not_supported call_id=%s provider=%s", request.call_id, missing
                )
                self.reply(txn, *NOT_SUPPORTED, [push.feature_caps])
                return False
            bindings = await self._register_one(ctx, wanted)
            if bindings is None:
                bindings = await self.save_bindings(request, txn, wanted)
            if bindings is None:
                return False
            paths = path_lines(request)
            # Over UDP nobody verified the source: never answer with more than a datagram.
            udp = not txn.source.reliable
            budget = udp_contact_budget(request, paths) if udp else 0
            own = [want.contact.uri for want in wanted]
            lines = contact_lines(bindings, int(time.time()), budget=budget, own=own)
            if served and push is not None:
                paths = [*paths, push.feature_caps]  # RFC 8599 §5.2: on the 2xx too
            self.reply(txn, 200, "OK", lines + paths)
        else:
            # Behind a proxy there is nothing to keep: the proxy is the registrar.
            self.reply(txn, 200, "OK", [("Contact", f"<{c.uri}>") for c in request.contacts])
        await self.track_devices(ctx, wanted)
        if served and push is not None and request.to is not None:
            # Before the dump that follows: a push it answers is then timed.
            await push.remember(*mstore.split_owner(normalize_aor(request.to.uri)), served)
        return True

    def wanted(self, ctx: RouteContext) -> list[RequestedBinding]:
        """The REGISTER's Contacts with their expiries, judged once per request (save and
        m_dump both need them): §10.3's rules in registrar mode; behind a proxy only
        "positive or not" matters."""
        if ctx.wanted is None:
            policy = self.settings.registrar
            ctx.wanted = (
                requested_bindings(ctx.request, policy)
                if self.settings.mode == "registrar"
                else _silo_bindings(ctx.request, policy)
            )
        return ctx.wanted

    async def _register_one(
        self, ctx: RouteContext, wanted: list[RequestedBinding]
    ) -> list[Binding] | None:
        """A device's first REGISTER or a refresh in one round trip where the store offers
        it: binding, device and "anything stored?" together; None = take the plan path."""
        request = ctx.request
        if request.to is None:
            return None
        aor, facts = _register_facts(request, ctx.txn)
        now = facts["now"]
        binding = single_binding(
            request, wanted, max_contacts=self.settings.registrar.max_contacts, **facts
        )
        if binding is None:
            return None
        contact = wanted[0].contact
        device = (
            device_key(contact.instance, contact.uri)
            if self.settings.deliver_to == "all" and takes_message(contact, request.allow)
            else None
        )
        register = (
            self.write_behind.register
            if self.write_behind is not None
            else self.store.register_contact
        )
        outcome = await register(
            binding, now=now, device=device, max_contacts=self.settings.registrar.max_contacts
        )
        if outcome is None:
            return None
        self.db.ok()
        ctx.devices_tracked = True
        ctx.pending = outcome.pending
        # Refreshes are most of a registrar's traffic: one line each only at debug.
        log.debug("event=registered aor=%s contacts=%d", aor, len(outcome.bindings))
        return list(outcome.bindings)

    async def track_devices(self, ctx: RouteContext, wanted: list[RequestedBinding]) -> None:
        """Remember the devices this REGISTER keeps and forget those it logs out
        (``deliver_to = "all"``; once per request).  After the 200: the REGISTER does not
        wait for it, and it is done before the dump that follows settles anything."""
        if ctx.devices_tracked or self.settings.deliver_to != "all":
            return
        ctx.devices_tracked = True
        request = ctx.request
        if request.to is None:
            return
        user, host = mstore.split_owner(normalize_aor(request.to.uri))
        keep, forget = device_changes(request, wanted)
        try:
            if keep:
                await self.store.touch_devices(user, host, keep, now=int(time.time()))
            if forget is None or forget:
                completed = await self.store.forget_devices(
                    user, host, forget, memory=self.settings.device_memory
                )
                log.info(
                    "event=devices_forgotten aor=%s@%s devices=%s completed=%d",
                    user,
                    host,
                    "*" if forget is None else ",".join(forget),
                    completed,
                )
        except StorageError as exc:
            # The binding is saved and answered; a device not remembered only gets the
            # messages stored from its next REGISTER on.
            log.error("event=device_update_failed aor=%s@%s error=%s", user, host, exc)

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
            if self.settings.deliver_to == "all":
                await self.relay_to_devices(ctx, snd_time)
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

    async def relay_to_devices(self, ctx: RouteContext, snd_time: str | None) -> None:
        """Fork to every binding; the first 2xx answers the sender.  Devices that did not
        answer 2xx within ``relay_timeout`` (failed, timed out, still running) and
        remembered devices that are offline have the message stored for them alone;
        if none answered 2xx by then, the sender gets 202 once it is committed.  A branch
        still running goes on: its late 2xx settles its device (no second delivery)."""
        bindings = await ctx.lookup()
        if not bindings:
            await self.store_and_reply(ctx, snd_time=snd_time)  # went offline meanwhile
            return
        request = ctx.request
        self.waiting_elsewhere(ctx.txn)
        branches: dict[asyncio.Future[ClientResult], str] = {
            asyncio.ensure_future(self._relay_branch(request, b)): device_key(b.instance, b.contact)
            for b in bindings
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.relay_timeout
        pending: set[asyncio.Future[ClientResult]] = set(branches)
        succeeded: set[str] = set()
        while pending:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                answer = task.result()
                if answer.success:
                    succeeded.add(branches[task])
                    if not ctx.replied:
                        self.count("relayed_messages")
                        ctx.reply(answer.status, answer.reason)
                else:
                    log.info(
                        "event=relay_failed call_id=%s device=%s status=%d",
                        request.call_id,
                        branches[task],
                        answer.status,
                    )
        running = {branches[t]: t for t in pending}
        user, host = mstore.split_owner(self.owner(request, None, ctx.ruri))
        since = int(time.time()) - self.settings.device_memory
        remembered = await self.store.remembered_devices(user, host, since=since)
        due = (set(remembered) | set(branches.values())) - succeeded
        if not due:
            return  # every device has it
        leased = tuple(d for d in running if d not in succeeded)
        delivered = tuple(sorted(succeeded))
        if ctx.replied:
            result = await self._store_quietly(ctx, snd_time, delivered, leased)
        else:
            outcome = await self.store_and_reply(
                ctx, snd_time=snd_time, delivered_to=delivered, leased_to=leased
            )
            result = None if outcome is None else ctx.stored
        if running:
            mid = (
                result.mid if result is not None and result.outcome is StoreOutcome.STORED else None
            )
            self._follow_branches(request, running, mid)

    async def _store_quietly(
        self,
        ctx: RouteContext,
        snd_time: str | None,
        delivered: tuple[str, ...],
        leased: tuple[str, ...],
    ) -> StoreResult | None:
        """Store for the devices that lack it after the sender was answered 2xx."""
        try:
            return await self.m_store(
                ctx, None, snd_time, False, delivered_to=delivered, leased_to=leased
            )
        except (SipError, StorageError, QueueFull) as exc:
            log.error(
                "event=store_for_devices_failed call_id=%s error=%s", ctx.request.call_id, exc
            )
            return None

    def _follow_branches(
        self,
        request: SipRequest,
        running: dict[str, asyncio.Future[ClientResult]],
        mid: int | None,
    ) -> None:
        """Settle (2xx) or release (failure) each device whose branch outlived
        ``relay_timeout``, once it ends."""

        async def follow(device: str, branch: asyncio.Future[ClientResult]) -> None:
            result = await branch
            if result.success:
                self.count("relayed_late")
            if mid is None:
                return
            try:
                if result.success:
                    memory = self.settings.device_memory
                    await self.store.settle_delivered([(mid, device)], memory=memory)
                else:
                    await self.store.release_device_leases([(mid, device)], failed=True)
            except StorageError as exc:
                # The lease runs out and the device gets it on its next REGISTER.
                log.error("event=late_branch_unsettled mid=%d device=%s error=%s", mid, device, exc)
            log.info(
                "event=relay_late call_id=%s mid=%d device=%s status=%d",
                request.call_id,
                mid,
                device,
                result.status,
            )

        for device, branch in running.items():
            task = asyncio.ensure_future(follow(device, branch))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _relay_branch(self, request: SipRequest, binding: Binding) -> ClientResult:
        """One branch of a relay: the request to one binding, keeping its identity."""
        assert request.from_ is not None and request.to is not None and request.cseq is not None
        max_forwards = (request.max_forwards if request.max_forwards is not None else 70) - 1
        hop = binding_hop(binding)
        return await self.requester.send_message(
            binding.contact,
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
        delivered_to: tuple[str, ...] = (),
        leased_to: tuple[str, ...] = (),
    ) -> StoreOutcome | None:
        """m_store, then 202 / 486 Mailbox Full / 503 as the outcome says (D9, D12);
        no answer when the owner is ONLINE (``unless_online``: the caller relays)."""
        try:
            result = await self.m_store(
                ctx,
                owner,
                snd_time,
                True,
                unless_online=unless_online,
                delivered_to=delivered_to,
                leased_to=leased_to,
            )
            ctx.stored = result
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
        delivered_to: tuple[str, ...] = (),
        leased_to: tuple[str, ...] = (),
    ) -> StoreResult:
        """Store the request; answer-worthy errors are raised, the row's fate returned
        (ONLINE, nothing stored, when ``unless_online`` and the owner is registered).
        ``delivered_to`` / ``leased_to``: devices that have it / whose relay branch is
        still running (per-device delivery after a relay)."""
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
            if delivered_to or leased_to:
                message = dataclasses.replace(
                    message,
                    delivered_to=delivered_to,
                    leased_to=leased_to,
                    lease_until=now + int(self.deliverer.settings.timer_f) + 10,
                    lease_owner=self.deliverer.lease_owner,
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
            if self.push is not None:
                # In the background: the 202 that follows does not wait for it.
                self.push.stored(*mstore.split_owner(aor), request, exclude=delivered_to)
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
        wanted = self.wanted(ctx)
        await self.track_devices(ctx, wanted)
        contact = dump_target(wanted, request.allow)
        if contact is None:
            return None
        if ctx.pending is False and owner is None:
            return DumpReport()  # the REGISTER's own round trip found nothing stored
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
            user,
            host,
            contact.uri,
            hop.target,
            limit=limit,
            route=hop.route,
            device=device_key(contact.instance, contact.uri),
        )
        if report.delivered and self.push is not None:
            await self.push.delivered(user, host, device_key(contact.instance, contact.uri))
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
        aor, facts = _register_facts(request, txn)
        user, host, now = facts["username"], facts["domain"], facts["now"]
        plan = plan_register(
            request, wanted, max_contacts=self.settings.registrar.max_contacts, **facts
        )
        outcome = await self.store.update_bindings(user, host, plan, now=now)
        self.db.ok()
        if outcome.error is not None:
            self.reply(txn, *outcome.error)
            return None
        # Refreshes are most of a registrar's traffic: one line each only at debug.
        log.debug("event=registered aor=%s contacts=%d", aor, len(outcome.bindings))
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
        branches = [asyncio.ensure_future(self._relay_branch(request, b)) for b in bindings]
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


def _register_facts(request: SipRequest, txn: ServerTransaction) -> tuple[str, dict[str, Any]]:
    """The AoR of a REGISTER and what a plan needs besides its Contacts: owner, time, and
    where it came from."""
    assert request.to is not None
    aor = normalize_aor(request.to.uri)
    user, host = mstore.split_owner(aor)
    source = txn.source
    return aor, {
        "username": user,
        "domain": host,
        "now": int(time.time()),
        "received": format_received(source.transport, source.ip, source.port),
        "transport": source.transport.lower(),
    }


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
