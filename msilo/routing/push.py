"""Push wake-up (RFC 8599) as the routes use it: remember a device's push parameters from
its REGISTER, push the devices a stored message cannot reach now, and time the wake-up.

The providers (FCM, APNs, a webhook) live in :mod:`msilo.push`; this module decides
*when* to push.  A push is claimed in the database (one conditional UPDATE per owner,
:meth:`Store.claim_push_targets`), so workers and hosts sharing it send one push per
device per ``push.coalesce`` seconds.  Everything here runs after the reply: a push never
delays a 202, and no failure of it reaches a store or a delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from msilo.errors import ParseError, StorageError
from msilo.lograte import LogRate
from msilo.push.base import PushOutcome, PushProvider, PushRequest, PushTarget, send_with_retries
from msilo.routing.registrar import RequestedBinding, device_key
from msilo.sip.message import Contact, SipRequest
from msilo.sip.parser import parse_uri
from msilo.storage.base import Store
from msilo.storage.push_targets import PushRecord

log = logging.getLogger("msilo.push")

# RFC 8599 §4.1: the UA puts these in the Contact URI of its REGISTER.
PN_PROVIDER, PN_PRID, PN_PARAM = "pn-provider", "pn-prid", "pn-param"
#: RFC 8599 §12.2 (and §5.2: a REGISTER asking for a push service the registrar lacks).
NOT_SUPPORTED = (555, "Push Notification Service Not Supported")


@dataclass(frozen=True, slots=True)
class PushParams:
    """A Contact's RFC 8599 parameters."""

    provider: str
    prid: str
    param: str | None


def push_params(contact: Contact) -> PushParams | None:
    """The Contact's ``pn-provider``/``pn-prid``/``pn-param``: from its URI (RFC 8599
    §4.1), else from its header parameters (some UAs put them there); None without a
    provider and a PRID (§4.1.3: a REGISTER without ``pn-prid`` asks for no push)."""
    if PN_PROVIDER not in contact.uri and PN_PROVIDER not in contact.params:
        return None  # the common case, told without parsing the URI
    try:
        params: Mapping[str, str | None] = parse_uri(contact.uri).params
    except ParseError:
        params = {}
    if PN_PROVIDER not in params:
        params = contact.params
    provider, prid = params.get(PN_PROVIDER), params.get(PN_PRID)
    if not provider or not prid:
        return None
    return PushParams(provider.strip('"').lower(), prid.strip('"'), params.get(PN_PARAM) or None)


@dataclass(frozen=True)
class PushSettings:
    """``[push]`` as the routes use it, with the providers built."""

    providers: Mapping[str, PushProvider]
    coalesce: float = 10.0
    include_body: bool = False
    max_attempts: int = 3
    device_memory: int = 2592000
    max_pending: int = 10_000  # pushes (owners) in flight at once; past it a push is skipped


class PushDispatch:
    """One worker's push decisions (see the module docstring)."""

    def __init__(
        self,
        settings: PushSettings,
        *,
        store: Store,
        count: Callable[[str], None],
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._count = count
        self._observe = observe
        self._tasks: set[asyncio.Task[None]] = set()
        # Owners this process claimed for within the window: a burst for one user costs one
        # claim, not one per message (the database still decides across processes).
        self._claimed: dict[tuple[str, str], float] = {}
        self._log = LogRate(log)  # a stalled provider means one line a second, not thousands
        names = sorted(settings.providers)
        # RFC 8599 §13.2 / RFC 6809: one indicator listing every service we push with.
        self.feature_caps = ("Feature-Caps", f'*;+sip.pns="{",".join(names)}"')

    # -- REGISTER ------------------------------------------------------------------------

    @staticmethod
    def requested(wanted: Iterable[RequestedBinding]) -> list[tuple[RequestedBinding, PushParams]]:
        """The Contacts of a REGISTER that register (positive expiry) with push
        parameters, each with them: read once per request (save() needs them three times)."""
        asked = []
        for want in wanted:
            if want.expires > 0 and (params := push_params(want.contact)) is not None:
                asked.append((want, params))
        return asked

    def unsupported(self, asked: Iterable[tuple[RequestedBinding, PushParams]]) -> str | None:
        """The first provider a Contact asks for that we lack."""
        for _, params in asked:
            if params.provider not in self.settings.providers:
                return params.provider
        return None

    def served(
        self, asked: Iterable[tuple[RequestedBinding, PushParams]]
    ) -> list[tuple[RequestedBinding, PushParams]]:
        """The Contacts whose provider we push with."""
        return [(w, p) for w, p in asked if p.provider in self.settings.providers]

    async def remember(
        self, username: str, domain: str, served: Iterable[tuple[RequestedBinding, PushParams]]
    ) -> None:
        """Keep the push parameters of each device this REGISTER registers with them."""
        now = int(time.time())
        for want, params in served:
            device = device_key(want.contact.instance, want.contact.uri)
            try:
                await self.store.save_push_target(
                    username, domain, device, provider=params.provider, prid=params.prid,
                    param=params.param, now=now,
                )  # fmt: skip
            except StorageError as exc:
                # The REGISTER is answered; the device is pushed from its next REGISTER on.
                log.error(
                    "event=push_target_not_saved aor=%s@%s device=%s error=%s",
                    username, domain, device, exc,
                )  # fmt: skip

    # -- MESSAGE stored -------------------------------------------------------------------

    def stored(
        self, username: str, domain: str, request: SipRequest, *, exclude: Collection[str] = ()
    ) -> None:
        """A message was stored for the owner: push (in the background) each device with
        push parameters that does not have it (``exclude``: devices that got it)."""
        if _non_urgent(request):
            return
        now = time.monotonic()
        owner = (username, domain)
        if not exclude and self._claimed.get(owner, 0.0) > now:
            return  # claimed here less than push.coalesce ago: nothing to win
        if len(self._tasks) >= self.settings.max_pending:
            # A provider that stalls must not pile up work without bound; the message is
            # stored and waits for the device's next REGISTER, as without push.
            self._count("pushes_failed")
            self._log.log(
                logging.WARNING, "push_skipped", "aor=%s@%s reason=too_many_pending pending=%d",
                username, domain, len(self._tasks),
            )  # fmt: skip
            return
        if not exclude:
            if len(self._claimed) >= _CLAIMED_MAX:
                self._claimed = {k: t for k, t in self._claimed.items() if t > now}
            self._claimed[owner] = now + self.settings.coalesce
        self._spawn(self._push_owner(username, domain, request, tuple(exclude)))

    async def _push_owner(
        self, username: str, domain: str, request: SipRequest, exclude: Sequence[str]
    ) -> None:
        store = self.store
        now_ms = int(time.time() * 1000)
        try:
            targets: list[PushRecord] = await store.claim_push_targets(
                username, domain, now_ms=now_ms, window_ms=int(self.settings.coalesce * 1000),
                since=now_ms // 1000 - self.settings.device_memory, exclude=exclude,
            )  # fmt: skip
        except StorageError as exc:
            log.error("event=push_claim_failed aor=%s@%s error=%s", username, domain, exc)
            return
        if not targets:
            return
        waiting = max(t.waiting for t in targets)
        body = None
        if self.settings.include_body and request.body:
            body = request.body.decode("utf-8", "replace")
        from_uri = request.from_.uri if request.from_ is not None else ""
        await asyncio.gather(
            *(
                self._push_one(
                    PushRequest(
                        target=PushTarget(username, domain, t.device, t.provider, t.prid, t.param),
                        count=max(waiting, 1),
                        from_uri=from_uri,
                        call_id=request.call_id or "",
                        body=body,
                    )
                )
                for t in targets
            )
        )

    async def _push_one(self, request: PushRequest) -> None:
        target = request.target
        provider = self.settings.providers.get(target.provider)
        if provider is None:
            # Registered while another config served that provider: nothing to push with.
            self._count("pushes_failed")
            log.warning(
                "event=push_failed provider=%s device=%s reason=not_configured",
                target.provider, target.device,
            )  # fmt: skip
            return
        # send_with_retries never raises and logs the one push_failed line itself.
        result = await send_with_retries(provider, request, max_attempts=self.settings.max_attempts)
        if result.outcome is PushOutcome.SENT:
            self._count("pushes_sent")
            log.info(
                "event=pushed aor=%s device=%s provider=%s count=%d",
                target.aor, target.device, target.provider, request.count,
            )  # fmt: skip
            return
        self._count("pushes_failed")
        if result.outcome is PushOutcome.DEAD_TOKEN:
            await self._drop(target, result.status)

    async def _drop(self, target: PushTarget, status: int | None) -> None:
        try:
            dropped = await self.store.drop_push_target(
                target.username, target.domain, target.device, prid=target.prid
            )
        except StorageError as exc:
            log.error("event=push_token_not_removed device=%s error=%s", target.device, exc)
            return
        if dropped:
            self._count("push_tokens_removed")
        log.info(
            "event=push_token_removed aor=%s@%s device=%s provider=%s status=%s",
            target.username, target.domain, target.device, target.provider, status,
        )  # fmt: skip

    # -- delivered -----------------------------------------------------------------------

    async def delivered(self, username: str, domain: str, device: str) -> None:
        """A dump reached ``device``: if a push woke it, record push -> delivered."""
        try:
            pushed = await self.store.take_push_time(username, domain, device)
        except StorageError as exc:
            log.debug("event=push_time_unknown device=%s error=%s", device, exc)
            return
        if pushed is not None and self._observe is not None:
            self._observe("push_delivery_seconds", max(0.0, time.time() - pushed / 1000))

    # -- life ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, grace: float = 2.0) -> None:
        """Let pushes in flight finish for up to ``grace`` seconds, then close providers."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
        for provider in self.settings.providers.values():
            try:
                await provider.aclose()
            except Exception as exc:  # closing must not fail a stop
                log.debug("event=push_close_failed provider=%s error=%r", provider.name, exc)


_CLAIMED_MAX = 100_000  # owners remembered at once (pruned to the live ones past this)


def _non_urgent(request: SipRequest) -> bool:
    # RFC 3261 §20.26; Flexisip pushes nothing for these either.
    value = request.get_header("priority")
    return value is not None and value.strip().lower() == "non-urgent"


__all__ = ["NOT_SUPPORTED", "PushDispatch", "PushParams", "PushSettings", "push_params"]
