"""Push wake-ups (RFC 8599): providers that tell a sleeping device a message waits for it.

Only :mod:`msilo.config`, :mod:`msilo.log` and :mod:`msilo.lograte` are used from the rest
of msilo; the server wires :func:`build_providers` and :func:`send_with_retries` to storage
and statistics."""

from msilo.push.base import (
    PushOutcome,
    PushProvider,
    PushRequest,
    PushResult,
    PushTarget,
    build_providers,
    send_with_retries,
)

__all__ = [
    "PushOutcome",
    "PushProvider",
    "PushRequest",
    "PushResult",
    "PushTarget",
    "build_providers",
    "send_with_retries",
]
