"""Registrar bindings as the storage layer sees them (the ``location`` table).

Storage only offers an atomic read-modify-write of one user's bindings; what
to change (RFC 3261 §10.3 rules) is decided by a plan function the caller
passes in, so SIP semantics stay out of the storage layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact of a user."""

    username: str
    domain: str
    contact: str  # the Contact URI exactly as registered (a dump's Request-URI, D5)
    expires: int  # absolute epoch seconds
    q: float | None = None
    callid: str = ""
    cseq: int = 0
    methods: tuple[str, ...] | None = None  # methods the contact takes; None = unknown (assume)
    instance: str | None = None  # +sip.instance (RFC 5626)
    received: str | None = None  # "transport:ip:port" the REGISTER came from
    path: str | None = None  # Path header values (RFC 3327), comma-joined
    transport: str | None = None  # udp / tcp / tls
    last_modified: int = 0

    def takes_message(self) -> bool:
        """True unless the contact's methods (RFC 3840) or Allow leave MESSAGE out (D5)."""
        return self.methods is None or "MESSAGE" in self.methods


@dataclass(frozen=True, slots=True)
class BindingPlan:
    """What to change: bindings to insert or replace (by contact) and contacts to remove."""

    upserts: tuple[Binding, ...] = ()
    removes: tuple[str, ...] = ()
    error: tuple[int, str] | None = None  # abort with this (status, reason); nothing changes
    extra: dict[str, str] = field(default_factory=dict)  # e.g. Min-Expires for a 423


PlanFunction = Callable[[list[Binding]], BindingPlan]


@dataclass(frozen=True, slots=True)
class BindingsOutcome:
    """Result of ``update_bindings``: the user's bindings after the change, or the plan's error."""

    bindings: tuple[Binding, ...] = ()
    error: tuple[int, str] | None = None
