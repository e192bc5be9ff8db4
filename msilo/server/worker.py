"""One msilo worker: sockets, transactions, routing, storage, and (when elected) the timer cycles.

This is the only place that wires the layers together.  Start-up is a list of
named steps; shutdown runs them backwards: stop reading, answer what is in
flight, flush the batch writer, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from msilo.config import LISTEN, Config
from msilo.errors import ConfigError, ParseError
from msilo.leader.cycles import CycleSettings, TimerCycles
from msilo.leader.election import LeaderElection, leader_election_for
from msilo.log import redact_url
from msilo.push.base import build_providers
from msilo.routing.delivery import Deliverer, DeliverySettings, binding_hop
from msilo.routing.notify import ExpirySettings, NotifySettings
from msilo.routing.policy import trusted_networks
from msilo.routing.push import PushDispatch, PushSettings
from msilo.routing.registrar import RegistrarPolicy
from msilo.routing.service import (
    AuthSettings,
    MsiloService,
    ServiceSettings,
    load_route,
)
from msilo.routing.templates import compile_template
from msilo.routing.timefmt import zone
from msilo.routing.writebehind import RefreshWriteBehind
from msilo.server.hep import HepSender
from msilo.server.http import ManagementViews, start_management_http
from msilo.server.metrics import (
    SUMMARY_PERIOD_MAX,
    MeasuredDeliverer,
    keep_queue_gauges,
    keep_silo_summary,
)
from msilo.server.stats import Counters, StatsBlock, prometheus_text
from msilo.server.trace import Send, SipTrace
from msilo.sip.parser import IMPLEMENTATION, parse_uri
from msilo.storage.base import Store
from msilo.storage.batch import BatchWriter
from msilo.transaction.client import ClientResult, ClientTransaction
from msilo.transaction.clock import TimerValues
from msilo.transaction.layer import TransactionLayer
from msilo.transport.base import UDP, Address, Source, Target
from msilo.transport.dns import Resolver
from msilo.transport.handoff import LEADER, WORKER, Handoff, process_tag
from msilo.transport.manager import Transports
from msilo.transport.tls import client_context, server_context

log = logging.getLogger("msilo.server")


class LayerRequester:
    """Routing's :class:`~msilo.routing.delivery.Requester` on top of the transaction layer."""

    def __init__(self, layer: TransactionLayer) -> None:
        self.layer = layer

    def start_message(
        self,
        uri: str,
        target: Target,
        *,
        from_: str,
        to: str,
        body: bytes,
        content_type: str | None,
        headers: Sequence[tuple[str, str]] = (),
        date: int | None = None,
        **build: Any,
    ) -> ClientTransaction:
        """Send a MESSAGE without waiting."""
        return self.layer.request(
            "MESSAGE",
            uri,
            target,
            from_=from_,
            to=to,
            body=body,
            content_type=content_type,
            headers=headers,
            date=float(date) if date is not None else False,
            **build,
        )

    async def send_message(
        self,
        uri: str,
        target: Target,
        *,
        from_: str,
        to: str,
        body: bytes,
        content_type: str | None,
        headers: Sequence[tuple[str, str]] = (),
        date: int | None = None,
        **build: Any,
    ) -> ClientResult:
        """Send a MESSAGE and wait for its final outcome (2xx, ≥ 300, 408 or 503 local)."""
        txn = self.start_message(
            uri, target, from_=from_, to=to, body=body, content_type=content_type,
            headers=headers, date=date, **build,
        )  # fmt: skip
        result = await txn.wait()
        if (
            result.local
            and result.status == 503
            and txn.request.transport == "TCP"
            and target.transport == "UDP"
            and not target.explicit
        ):
            # RFC 3261 §18.1.1: TCP was chosen only because the request is large; when the
            # connection is refused or reset the request SHOULD be retried over UDP.
            txn = self.start_message(
                uri, target._replace(explicit=True), from_=from_, to=to, body=body,
                content_type=content_type, headers=headers, date=date, **build,
            )  # fmt: skip
            result = await txn.wait()
        return result


def service_settings(config: Config) -> ServiceSettings:
    """Routing settings from the configuration (templates compiled here, D2)."""
    m = config.msilo
    notify = None
    if m.from_address is not None and m.offline_message is not None:
        notify = NotifySettings(
            from_address=compile_template(m.from_address),
            offline_message=compile_template(m.offline_message),
            content_type_hdr=compile_template(m.content_type_hdr) if m.content_type_hdr else None,
            contact_hdr=compile_template(m.contact_hdr) if m.contact_hdr else None,
            use_contact=m.use_contact,
        )
    avp = m.snd_time_avp[len("$avp(") : -1] if m.snd_time_avp else None
    r = config.registrar
    return ServiceSettings(
        mode=config.server.mode,
        domains=frozenset(d.lower() for d in config.server.domains),
        trusted=trusted_networks(config.server.trusted),
        expire_time=m.expire_time,
        snd_time_hdr=m.snd_time_hdr,
        snd_time_avp=avp,
        transient_types=frozenset(m.transient_types),
        deliver_to=m.deliver_to,
        device_memory=m.device_memory,
        relay_timeout=m.relay_timeout,
        tz=zone(m.timezone),
        registrar=RegistrarPolicy(
            r.default_expires, r.min_expires, r.max_expires, max_contacts=r.max_contacts
        ),
        notify=notify,
        outbound_proxy=proxy_target(m.outbound_proxy),
        max_queue_delay=config.limits.max_queue_delay,
        rate=config.limits.rate,
        burst=config.limits.burst,
        auth=auth_settings(config),
    )


def push_dispatch(
    config: Config,
    store: Store,
    count: Callable[[str], None],
    observe: Callable[[str, float], None],
) -> PushDispatch | None:
    """The RFC 8599 wake-up of this worker, or None when no ``[push.NAME]`` is configured."""
    providers = build_providers(config.push)
    if not providers:
        return None
    p = config.push
    settings = PushSettings(
        providers=providers,
        coalesce=p.coalesce,
        include_body=p.include_body,
        max_attempts=p.max_attempts,
        device_memory=config.msilo.device_memory,
    )
    return PushDispatch(settings, store=store, count=count, observe=observe)


def expiry_settings(config: Config) -> ExpirySettings | None:
    """The notice about messages that expired undelivered, or None when it is off."""
    m = config.msilo
    if m.expired_message is None or m.from_address is None:
        return None
    return ExpirySettings(
        from_address=compile_template(m.from_address),
        message=compile_template(m.expired_message),
        content_type_hdr=compile_template(m.content_type_hdr) if m.content_type_hdr else None,
    )


def auth_settings(config: Config) -> AuthSettings | None:
    """``[auth]`` for the routes, or None when authentication is off."""
    auth = config.auth
    if not auth.enabled:
        return None
    realm = auth.realm or config.server.domains[0]
    return AuthSettings(
        realm=realm,
        secret=auth.secret,
        nonce_expires=auth.nonce_expires,
        algorithms=auth.algorithms,
        message=auth.message,
        source_failures=auth.source_failures,
        user_failures=auth.user_failures,
        failure_window=auth.failure_window,
    )


def proxy_target(uri: str | None) -> Target | None:
    """``outbound_proxy`` as a next hop."""
    if uri is None:
        return None
    try:
        return Target.from_uri(parse_uri(uri))
    except ParseError as exc:
        raise ConfigError(f"msilo.outbound_proxy: {uri!r} is not a SIP URI ({exc})") from None


def parse_listen(item: str) -> tuple[str, str, int]:
    """``udp:HOST:PORT`` -> (transport, host, port)."""
    match = LISTEN.match(item)
    if match is None:
        raise ConfigError(f"server.listen: {item!r} is not transport:HOST:PORT")
    return match.group(1), match.group(2).strip("[]"), int(match.group(3))


class Worker:
    """Runs the SIP service in this process until :meth:`stop`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        stats: StatsBlock | None = None,
        row: int = 0,
        run_leader: bool = True,
        timers: TimerValues | None = None,
        listen: bool = True,
        deployment: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.stats = stats or StatsBlock()
        self._own_stats = stats is None
        self.counters: Counters = self.stats.counters(row)
        self.row = row
        self.run_leader = run_leader
        # listen=False: no listener (the supervisor's leader process sends reminders and
        # dumps, through a worker's listener, but takes no SIP traffic).
        self.listen = listen
        # Set when this process shares its UDP port with others (the supervisor's
        # children): names the hand-off sockets, and ``row`` (the process's slot) names
        # this process in the branches it sends (msilo.transport.handoff).
        self.deployment = deployment
        self.handoff: Handoff | None = None
        self.timers = timers
        self.transports: Transports | None = None
        self.layer: TransactionLayer | None = None
        self.writer: BatchWriter | None = None
        self.service: MsiloService | None = None
        self.push: PushDispatch | None = None
        self.write_behind: RefreshWriteBehind | None = None
        self.election: LeaderElection | None = None
        self.http: asyncio.Server | None = None
        self.trace: SipTrace | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._cycles_task: asyncio.Task[None] | None = None
        self.lease_owner = f"{socket.gethostname()}:{os.getpid()}"
        self.started_at = time.time()

    def count(self, name: str, amount: int = 1) -> None:
        """Add to one of this worker's counters."""
        self.counters.incr(name, amount)

    def _flushed(self, rows: int) -> None:
        self.counters.incr("batch_flushes")
        self.counters.incr("batch_rows", rows)
        self.counters.observe("batch_size_rows", rows)

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, wire and start everything; raises on any start-up failure."""
        config = self.config
        limits = config.limits
        # Everything that can refuse the configuration comes first, before any task starts.
        route = (
            load_route(config.server.route, config.route_search_path())
            if config.server.route
            else None
        )
        settings = service_settings(config)
        server = config.server
        hep = HepSender(server.hep, server.hep_id) if server.hep else None
        self.writer = BatchWriter(
            self.store,
            max_messages=config.msilo.max_messages,
            max_inflight=self.store.write_concurrency,
            on_flush=self._flushed,
        )
        self.writer.start()
        self.transports = Transports(
            max_message=limits.max_message_size,
            idle_timeout=limits.idle_timeout,
            max_connections=limits.max_connections,
            message_timeout=limits.message_timeout,
            max_buffered=limits.max_buffered,
            advertise=config.server.advertise.split(":")[0] or None,
            resolver=Resolver(config.server.dns),
            ws_path=config.server.ws_path,
            ws_origins=config.server.ws_origins,
            ws_ping=limits.ws_ping,
        )
        tag = None
        if self.deployment is not None:
            tag = process_tag(WORKER if self.listen else LEADER, self.row)
            self.handoff = Handoff(
                self.deployment,
                tag,
                on_response=self._handed_response,
                on_send=self.transports.send_from_listener if self.listen else None,
                # A device's TCP/TLS/WS connection may be held here, by another worker's
                # request (msilo.transport.handoff).
                on_connection=self.transports.write_held if self.listen else None,
            )
        self.trace = SipTrace.from_settings(
            log_level=server.log_level, sip_trace=server.sip_trace, hep=hep
        )
        send: Send = self.transports.send
        if self.trace is not None:
            send = self.trace.wrap_send(send, self.transports.sent_by)
        self.layer = TransactionLayer(
            self._handle,
            send,
            sent_by=self.transports.sent_by,
            timers=self.timers,
            tag=tag,
            forward=self._forward if self.handoff is not None else None,
        )
        self.transports.on_message = self._receive
        requester = LayerRequester(self.layer)
        deliverer = MeasuredDeliverer(
            self.store,
            requester,
            DeliverySettings(
                add_date=config.msilo.add_date,
                tz=settings.tz,
                outbound_proxy=settings.outbound_proxy,
                timer_f=self.layer.timers.timer_f,
                deliver_to=config.msilo.deliver_to,
                device_memory=config.msilo.device_memory,
            ),
            lease_owner=self.lease_owner,
            count=self.count,
            counters=self.counters,
        )
        self.push = push_dispatch(config, self.store, self.count, self.counters.observe)
        if self.listen and config.registrar.write_behind > 0 and config.server.mode == "registrar":
            self.write_behind = RefreshWriteBehind(
                self.store, config.registrar.write_behind, count=self.count
            )
            self.write_behind.start()
        self.service = MsiloService(
            settings,
            store=self.store,
            writer=self.writer,
            requester=requester,
            deliverer=deliverer,
            count=self.count,
            route=route,
            push=self.push,
            backlog=self._udp_backlog,
            write_behind=self.write_behind,
        )
        if self.service.guard is not None:
            self.layer.shed = self.service.shed_early
        tls = config.tls
        self.transports.configure_tls(
            server_context(tls.certificate, tls.private_key, tls.ca or None)
            if tls.certificate
            else None,
            client_context(tls.ca or None),
        )
        await self._bind()
        if config.server.http:
            host, _, port = config.server.http.rpartition(":")
            self.http = await start_management_http(self._views(), host.strip("[]"), int(port))
        loop = asyncio.get_running_loop()
        writer = self.writer
        self._tasks.append(
            loop.create_task(
                keep_queue_gauges(self.counters, lambda: writer.pending, writer.max_queue)
            )
        )
        if self.run_leader:
            self._start_leader(deliverer)
            period = min(float(config.msilo.check_time), SUMMARY_PERIOD_MAX)
            self._tasks.append(
                loop.create_task(
                    keep_silo_summary(self.counters, self.store, self._leading, period)
                )
            )
        log.info(
            "event=serving mode=%s parser=%s listen=%s",
            config.server.mode,
            IMPLEMENTATION,
            ",".join(config.server.listen) if self.listen else "-",
        )

    async def _bind(self) -> None:
        assert self.transports is not None
        if self.handoff is not None:
            self.handoff.open()
        client_hosts: dict[str, str] = {}  # family -> address for a client socket
        shared: list[Address] = []  # the UDP listening addresses of the deployment
        udp_families: set[str] = set()
        for item in self.config.server.listen:
            transport, host, port = parse_listen(item)
            family = "6" if ":" in host else "4"
            if transport == "udp":
                shared.append((host, port))
                udp_families.add(family)
            try:
                if not self.listen:
                    pass
                elif transport == "udp":
                    spread = self.config.server.worker_count
                    await self.transports.listen_udp(host, port, spread=spread)
                elif transport == "tcp":
                    await self.transports.listen_tcp(host, port)
                elif transport in ("ws", "wss"):
                    await self.transports.listen_ws(host, port, secure=transport == "wss")
                else:
                    await self.transports.listen_tls(host, port)
            except OSError as exc:
                # Name the listener: with three of them "cannot bind" alone says nothing.
                raise ConfigError(
                    f"server.listen: cannot bind {item} ({exc.strerror or exc})"
                ) from None
            # Send from the address we listen on (so our Via names it and a firewall
            # rule for the listener covers us too); several addresses -> the wildcard.
            wildcard = "::" if family == "6" else "0.0.0.0"
            known = client_hosts.get(family)
            client_hosts[family] = host if known in (None, host) else wildcard
        if self.handoff is not None:
            self.transports.use_handoff(
                self.handoff, shared, lambda: self.count("requests_handed_off")
            )
        for family, host in client_hosts.items():
            # UDP requests leave from the listener (a device behind NAT only hears the
            # port it registered to, RFC 4787 §5); a client socket is left for a family
            # with no UDP listener, and for the leader when no worker can send for it.
            if family not in udp_families or not self.listen:
                await self.transports.open_client_udp(host)

    def _forward(self, tag: str, data: bytes, peer: Address) -> bool:
        """Hand a response to the process that sent its request (the layer's ``forward``)."""
        assert self.handoff is not None
        if self.handoff.forward(tag, data, peer):
            self.count("responses_handed_off")
            return True
        return False

    def _handed_response(self, data: bytes, peer: Address) -> None:
        """A response another worker received for one of our requests."""
        assert self.handoff is not None
        with contextlib.suppress(ParseError):
            self._receive(data, Source(UDP, peer, self.handoff), handed=True)

    def _start_leader(self, deliverer: Deliverer) -> None:
        assert self.service is not None
        m = self.config.msilo
        cycles = TimerCycles(
            self.store,
            deliverer,
            CycleSettings(
                check_time=m.check_time,
                clean_period=m.clean_period,
                send_time=m.send_time,
                reminder=m.reminder,
                mode=self.config.server.mode,
            ),
            count=self.count,
            lookup=self.service_lookup,
            hop_for=binding_hop,
            purge_bindings=getattr(self.store, "delete_expired_bindings", None),
            expiry=expiry_settings(self.config),
        )
        self.election = leader_election_for(m.db_url)

        async def elected() -> None:
            self._cycles_task = asyncio.get_running_loop().create_task(cycles.run())

        async def lost() -> None:
            if self._cycles_task is not None:
                self._cycles_task.cancel()
                self._cycles_task = None

        self._tasks.append(asyncio.get_running_loop().create_task(self.election.run(elected, lost)))

    def _udp_backlog(self) -> int:
        """Requests waiting unread in this worker's UDP sockets (overload control)."""
        if self.transports is None:
            return 0
        return sum(endpoint.backlog() for endpoint in self.transports.udp_listeners)

    def _leading(self) -> bool:
        return self.election is not None and self.election.is_leader

    async def service_lookup(self, user: str, domain: str) -> list[Any]:
        """Bindings of a user that take MESSAGE (for reminders)."""
        assert self.service is not None
        return await self.service.lookup(f"{user}@{domain}")

    # -- per message ----------------------------------------------------------------------

    def _receive(self, data: bytes, source: Any, *, handed: bool = False) -> None:
        assert self.layer is not None
        if self.trace is not None:
            source = self.trace.received(data, source)
        try:
            self.layer.receive(data, source, handed=handed)
        except ParseError:
            self.count("parse_errors")
            raise  # the transport answers 400 (or drops what cannot be answered)

    async def _handle(self, request: Any, txn: Any) -> None:
        assert self.service is not None
        if self.trace is not None:
            self.trace.request(request, txn.source)
        started = time.perf_counter()
        await self.service.handle(request, txn)
        if txn.status == 202 and request.method == "MESSAGE":
            # The 202 goes out only after the commit that holds the row (DESIGN.md).
            self.counters.observe("message_reply_seconds", time.perf_counter() - started)

    # -- management -----------------------------------------------------------------------

    def _views(self) -> ManagementViews:
        def totals() -> dict[str, int]:
            result = self.stats.total()
            if self.layer is not None:
                # Absorbed retransmissions are counted by the transaction layer itself.
                txn = self.layer.stats
                result["retransmissions_absorbed"] = (
                    txn.retransmissions_absorbed + txn.responses_replayed
                )
            return result

        def health() -> tuple[bool, dict[str, Any]]:
            leader = self.election.holder_info() if self.election is not None else None
            ok = self.transports is not None and self.writer is not None
            return ok, {
                "status": "ok" if ok else "starting",
                "pid": os.getpid(),
                "parser": IMPLEMENTATION,
                "uptime": int(time.time() - self.started_at),
                "leader": leader,
                "database": redact_url(self.config.msilo.db_url),
            }

        return ManagementViews(
            health=health,
            stats=totals,
            metrics=lambda: prometheus_text(totals()),
        )

    # -- shutdown -------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: stop reading, finish what is in flight, flush, close."""
        grace = self.config.server.grace_period if grace is None else grace
        if self.http is not None:
            self.http.close()
        if self.transports is not None:
            for server in self.transports.tcp_servers:
                server.close()
            # In-flight requests go on through the hand-off while we drain.
            self.transports.stop_listening()
        if self.layer is not None:
            await self.layer.drain(grace)
        if self.writer is not None:
            await self.writer.close()
        if self.push is not None:
            await self.push.aclose()
        if self.write_behind is not None:
            await self.write_behind.aclose()  # before the store closes: nothing forgotten
        if self._cycles_task is not None:
            self._cycles_task.cancel()
        if self.election is not None:
            await self.election.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.layer is not None:
            self.layer.close()
        if self.transports is not None:
            await self.transports.close()
        if self.trace is not None and self.trace.hep is not None:
            self.trace.hep.close()
        if self._own_stats:
            self.stats.close()
        log.info("event=stopped")
