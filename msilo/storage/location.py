"""Registrar bindings as the storage layer sees them (the ``location`` table).

Storage only offers an atomic read-modify-write of one user's bindings; what
to change (RFC 3261 §10.3 rules) is decided by a plan function the caller
passes in, so SIP semantics stay out of the storage layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from msilo.storage.values import OWNER_LIMIT, check_int, check_text


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
class RegisterOutcome:
    """Result of ``register_contact``: the user's live bindings after it, and whether the
    user has stored messages that may be deliverable now (False: no dump needed)."""

    bindings: tuple[Binding, ...]
    pending: bool


@dataclass(frozen=True, slots=True)
class BindingsOutcome:
    """Result of ``update_bindings``: the user's bindings after the change, or the plan's error."""

    bindings: tuple[Binding, ...] = ()
    error: tuple[int, str] | None = None


# -- SQL shared by both backends (the table's name is fixed: OpenSIPS's ``location``) --------

COLUMNS = (
    "username, domain, contact, received, path, expires, q, callid, cseq, methods, instance, "
    "transport, last_modified"
)
ORDER_BY = "ORDER BY COALESCE(q, 1.0) DESC, last_modified DESC, contact"


def location_sql(param: Callable[[int], str]) -> dict[str, str]:
    """The statements, with placeholders made by ``param(n)`` ($n or ?)."""
    p = param
    values = ", ".join(p(i) for i in range(1, 14))
    return {
        "select_all": f"SELECT {COLUMNS} FROM location WHERE username = {p(1)} AND domain = {p(2)}",
        "select_live": (
            f"SELECT {COLUMNS} FROM location WHERE username = {p(1)} AND domain = {p(2)} "
            f"AND expires > {p(3)} {ORDER_BY}"
        ),
        "delete_one": (
            f"DELETE FROM location WHERE username = {p(1)} AND domain = {p(2)} AND contact = {p(3)}"
        ),
        "upsert": (
            f"INSERT INTO location ({COLUMNS}) VALUES ({values}) "
            "ON CONFLICT (username, domain, contact) DO UPDATE SET "
            "received = excluded.received, path = excluded.path, expires = excluded.expires, "
            "q = excluded.q, callid = excluded.callid, cseq = excluded.cseq, "
            "methods = excluded.methods, instance = excluded.instance, "
            "transport = excluded.transport, last_modified = excluded.last_modified"
        ),
        "delete_expired": f"DELETE FROM location WHERE expires <= {p(1)}",
    }


_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def validate_owner(username: str, domain: str) -> None:
    """Raise ``InvalidRecord`` when the user does not fit the location table's key."""
    check_text("username", username, OWNER_LIMIT)
    check_text("domain", domain, OWNER_LIMIT)


def validate_binding(b: Binding) -> None:
    """Raise ``InvalidRecord`` when a column of ``b`` cannot hold its value (before any SQL:
    a refused value must not look like a database failure)."""
    validate_owner(b.username, b.domain)
    check_text("contact", b.contact)
    check_text("callid", b.callid)
    for name in ("received", "path", "instance", "transport"):
        value = getattr(b, name)
        if value is not None:
            check_text(name, value)
    if b.methods is not None:
        check_text("methods", ",".join(b.methods))
    check_int("cseq", b.cseq, *_INT32)
    check_int("expires", b.expires, *_INT64)
    check_int("last_modified", b.last_modified, *_INT64)


def _rank(b: Binding) -> tuple[float, int, str]:
    return (-(b.q if b.q is not None else 1.0), -b.last_modified, b.contact)


def live_bindings(bindings: Iterable[Binding], now: int) -> tuple[Binding, ...]:
    """The bindings that have not expired at ``now``, best q first (as ORDER_BY sorts)."""
    return tuple(sorted((b for b in bindings if b.expires > now), key=_rank))


def apply_plan(current: Iterable[Binding], plan: BindingPlan) -> list[Binding]:
    """The user's bindings once ``plan`` is applied to ``current`` (keyed by contact)."""
    by_contact = {b.contact: b for b in current}
    for contact in plan.removes:
        by_contact.pop(contact, None)
    for binding in plan.upserts:
        by_contact[binding.contact] = binding
    return list(by_contact.values())


def binding_row(b: Binding) -> tuple[object, ...]:
    """A binding as the 13 values of :data:`COLUMNS`."""
    methods = ",".join(b.methods) if b.methods is not None else None
    return (
        b.username, b.domain, b.contact, b.received, b.path, b.expires, b.q, b.callid, b.cseq,
        methods, b.instance, b.transport, b.last_modified,
    )  # fmt: skip


def binding_from_row(r: Sequence[Any]) -> Binding:
    """A row of :data:`COLUMNS` as a binding."""
    methods = tuple(m for m in str(r[9]).split(",") if m) if r[9] is not None else None
    return Binding(
        username=r[0], domain=r[1], contact=r[2], received=r[3], path=r[4], expires=int(r[5]),
        q=float(r[6]) if r[6] is not None else None, callid=r[7], cseq=int(r[8]),
        methods=methods, instance=r[10], transport=r[11], last_modified=int(r[12]),
    )  # fmt: skip
