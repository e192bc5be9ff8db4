"""Custom routes used by the tests (``server.route = "tests.service.routes:NAME"``)."""

from __future__ import annotations

from msilo.routing.service import RouteContext
from msilo.sip.message import SipRequest
from msilo.storage.base import StoreOutcome


async def shared_inbox(request: SipRequest, ctx: RouteContext) -> None:
    """Every MESSAGE goes to one shared inbox, scheduled if X-When says so; REGISTER as usual."""
    if request.method == "REGISTER":
        if await ctx.save():
            await ctx.m_dump()
        return
    when = request.get_header("X-When")
    if when is not None:
        ctx.avp["snd_time"] = when
    result = await ctx.m_store(owner="sip:inbox@127.0.0.1", notify=False)
    if result.outcome is StoreOutcome.OVER_QUOTA:
        ctx.reply(486, "Mailbox Full")
    else:
        ctx.reply(202, "Accepted")


async def relay_or_store(request: SipRequest, ctx: RouteContext) -> None:
    """The sample script, written out: relay, else store."""
    if request.method == "REGISTER":
        if await ctx.save():
            await ctx.m_dump(max=1)
        return
    result = await ctx.relay()
    if result is not None and result.success:
        ctx.reply(result.status, result.reason)
        return
    await ctx.m_store()
    ctx.reply(202, "Accepted")


async def forgets_to_reply(request: SipRequest, ctx: RouteContext) -> None:
    """A route with a bug: it never answers."""


def not_async(request: SipRequest, ctx: RouteContext) -> None:
    """Not a coroutine function: refused at start-up."""


async def owner_from_header(request: SipRequest, ctx: RouteContext) -> None:
    """Store every MESSAGE for the owner named in X-Owner (a script that trusts its input)."""
    await ctx.m_store(owner=request.get_header("X-Owner"), notify=False)
    ctx.reply(202, "Accepted")


async def stall_when_marked(request: SipRequest, ctx: RouteContext) -> None:
    """Store and answer 202; a request with ``X-Stall`` first blocks the event loop for
    that many seconds (what a long GC pause or a slow host does to a worker: requests
    pile up unread in its socket)."""
    import time

    stall = request.get_header("X-Stall")
    if stall is not None:
        time.sleep(float(stall))
    await ctx.m_store(notify=False)
    ctx.reply(202, "Accepted")
