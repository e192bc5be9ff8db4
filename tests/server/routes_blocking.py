"""A custom route whose event loop blocks on a marked request (``X-Block: yes``).

Used to show that a worker stuck in a blocking call is detected by its missing
heartbeat and replaced; any other request takes the usual store path.
"""

from __future__ import annotations

import time

from msilo.routing.service import RouteContext
from msilo.sip.message import SipRequest


async def block_when_marked(request: SipRequest, ctx: RouteContext) -> None:
    """Store and answer 202, unless the request carries X-Block: then freeze the loop."""
    if request.get_header("X-Block") is not None:
        time.sleep(60)  # the bug under test: a blocking call on the event loop
    await ctx.m_store(notify=False)
    ctx.reply(202, "Accepted")
