"""The storage contract: record types and the abstract ``Store`` both backends implement.

Storage knows nothing of SIP or of the config module; it receives plain values.  The
``silo`` table keeps every OpenSIPS ``silo`` column (table version 6) under configurable
names (``db_table`` / ``sc_*``), plus four columns of ours with fixed names:

* ``dedupe_key``  -- Call-ID + CSeq + From-tag of the request; unique, so a replayed
  MESSAGE is stored once (spec D12);
* ``lease_until`` / ``lease_owner`` -- the delivery lease (spec D6, §10 Q12);
* ``attempts``    -- failed deliveries so far (spec §10 Q17);
* ``callid``      -- the Call-ID every delivery of the message carries (one identity per
  message, whatever the device or the attempt: receivers de-duplicate on it).

Per-device delivery (``msilo.deliver_to = "all"``) keeps its state beside the silo table,
so an OpenSIPS table stays drop-in: ``msilo_device`` remembers a user's devices and the
delivery ledger records, per message and device, a live lease or a settled delivery
(:mod:`msilo.storage.ledger`).
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from msilo.errors import InvalidRecord
from msilo.storage.location import Binding, BindingsOutcome, PlanFunction, RegisterOutcome
from msilo.storage.push_targets import PushRecord
from msilo.storage.subscriber import Subscriber
from msilo.storage.values import OWNER_LIMIT, check_text

#: ``version.table_version`` of the silo table: OpenSIPS msilo's (spec §5.1).
SILO_VERSION = 6
#: OpenSIPS usrloc's ``location`` version (3.x).  Our layout is our own (the registrar owns
#: it), the number only keeps OpenSIPS tooling that reads ``version`` from tripping.
LOCATION_VERSION = 1013
#: OpenSIPS auth_db's ``subscriber`` version (3.x: ha1_sha256 + ha1_sha512t256 columns).
SUBSCRIBER_VERSION = 8

#: Our extra silo columns, in the order we create them.
EXTRA_COLUMNS = ("dedupe_key", "lease_until", "lease_owner", "attempts", "callid")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Character limits of the OpenSIPS columns (VARCHAR(n) counts characters on PostgreSQL).
# Checked before a row joins a batch, so one oversized row fails its own request only,
# never the whole group commit.
#: VARCHAR(255) of ``src_addr`` and ``dst_addr``.
SRC_DST_LIMIT = 255
_TEXT_LIMITS = (
    ("username", OWNER_LIMIT),
    ("domain", OWNER_LIMIT),
    ("src_addr", SRC_DST_LIMIT),
    ("dst_addr", SRC_DST_LIMIT),
)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def quote_ident(name: str) -> str:
    """Quote an already validated identifier (works on PostgreSQL and SQLite)."""
    return '"' + name + '"'


@dataclass(frozen=True)
class SiloNames:
    """Table and column names of the silo table (``db_table`` and ``sc_*``)."""

    table: str = "silo"
    mid: str = "mid"
    src_addr: str = "src_addr"
    dst_addr: str = "dst_addr"
    username: str = "username"
    domain: str = "domain"
    body: str = "body"
    ctype: str = "ctype"
    exp_time: str = "exp_time"
    inc_time: str = "inc_time"
    snd_time: str = "snd_time"

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not _IDENT.match(value):
                raise ValueError(
                    f"{f.name} is expected to be an SQL identifier "
                    f"(letters, digits, '_', not starting with a digit, at most 63), "
                    f"got {value!r}"
                )
            if f.name == "table":
                continue
            if value.lower() in EXTRA_COLUMNS:
                raise ValueError(f"{f.name} = {value!r} clashes with msilo's own column")
            if value.lower() in seen:
                raise ValueError(
                    f"{f.name} = {value!r} is the same column as {seen[value.lower()]}"
                )
            seen[value.lower()] = f.name

    def object_name(self, suffix: str, prefix: str = "") -> str:
        """Name of an index or function belonging to this table, at most 63 characters.

        PostgreSQL silently truncates longer names, which could make two tables' objects
        collide; a long table name is therefore shortened and made unique with a hash.
        """
        name = f"{prefix}{self.table}_{suffix}"
        if len(name) <= 63:
            return name
        import hashlib

        digest = hashlib.sha1(self.table.encode()).hexdigest()[:8]
        keep = 63 - len(prefix) - len(suffix) - len(digest) - 2
        return f"{prefix}{self.table[:keep]}_{digest}_{suffix}"


#: The admin guide's names (frozen, so one shared instance is a safe default).
DEFAULT_NAMES = SiloNames()


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store; times are Unix epoch seconds."""

    username: str
    domain: str
    src_addr: str
    dst_addr: str
    body: bytes
    ctype: str | None
    inc_time: int
    exp_time: int
    snd_time: int = 0
    dedupe_key: str | None = None
    # Registrar mode's default route: store only if the owner has no live binding that
    # takes MESSAGE (else ONLINE, nothing stored) -- the lookup in the store's round trip.
    unless_online: bool = False
    # The request's Call-ID: every delivery carries it (or a derived one when another
    # stored message of the owner already has it).
    callid: str | None = None
    # Per-device delivery after a relay: devices that already have it (their branch
    # answered 2xx) and devices whose branch is still running (leased until
    # ``lease_until`` by ``lease_owner``; a late 2xx settles them).
    delivered_to: tuple[str, ...] = ()
    leased_to: tuple[str, ...] = ()
    lease_until: int = 0
    lease_owner: str = ""


class StoreOutcome(enum.Enum):
    """What became of one message handed to ``store_batch``."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    OVER_QUOTA = "over_quota"
    ONLINE = "online"  # not stored: ``unless_online`` and the owner is registered


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The fate of one message: ``mid`` of the stored row (for DUPLICATE, the existing one)."""

    outcome: StoreOutcome
    mid: int | None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A row of the silo table as read back (``body`` is ``b""`` for SQL NULL)."""

    mid: int
    username: str
    domain: str
    src_addr: str
    dst_addr: str
    body: bytes
    ctype: str | None
    inc_time: int
    exp_time: int
    snd_time: int
    attempts: int
    callid: str | None = None


def validate_message(msg: NewMessage) -> None:
    """Raise ``InvalidRecord`` if ``msg`` cannot be stored as it is."""
    for field, limit in _TEXT_LIMITS:
        check_text(field, getattr(msg, field), limit)
    if msg.ctype is not None:
        check_text("ctype", msg.ctype)
    if msg.dedupe_key is not None:
        check_text("dedupe_key", msg.dedupe_key)
    if msg.callid is not None:
        check_text("callid", msg.callid)
    for device in (*msg.delivered_to, *msg.leased_to):
        check_text("device", device)
    if not isinstance(msg.body, bytes | bytearray | memoryview):
        raise InvalidRecord(f"body must be bytes, got {type(msg.body).__name__}", field="body")
    for field in ("inc_time", "exp_time", "snd_time"):
        value = getattr(msg, field)
        if not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidRecord(f"{field} must be a 64-bit integer, got {value!r}", field=field)


def fold_repeated_keys(
    messages: Sequence[NewMessage],
) -> tuple[list[NewMessage], list[tuple[int, bool]]]:
    """Drop rows whose dedupe key appeared earlier in the same batch.

    Returns the rows to send to the database and, per input row, (index in those rows,
    is a repeat).  A repeat shares the fate of its first occurrence (see ``unfold_results``):
    it is the same request, for the same owner, so it can neither be stored a second time
    nor fit a quota its first occurrence did not fit.
    """
    first: dict[str, int] = {}
    unique: list[NewMessage] = []
    slots: list[tuple[int, bool]] = []
    for m in messages:
        key = m.dedupe_key
        if key is not None:
            seen = first.get(key)
            if seen is not None:
                slots.append((seen, True))
                continue
            first[key] = len(unique)
        slots.append((len(unique), False))
        unique.append(m)
    return unique, slots


def unfold_results(
    results: Sequence[StoreResult], slots: Sequence[tuple[int, bool]]
) -> list[StoreResult]:
    """Map results of the folded rows back to every input row (see ``fold_repeated_keys``)."""
    out: list[StoreResult] = []
    for index, repeat in slots:
        r = results[index]
        if repeat and r.outcome is StoreOutcome.STORED:
            r = StoreResult(StoreOutcome.DUPLICATE, r.mid)
        out.append(r)
    return out


@dataclass(frozen=True)
class SiloSummary:
    """What the gauges show about the silo table as a whole."""

    rows: int
    oldest_inc_time: int | None  # None: the table is empty


class Store(abc.ABC):
    """The message store.  Every method raises ``StorageError`` (or a subclass) on failure.

    Owners are matched by exact ``(username, domain)`` equality, as OpenSIPS does.
    """

    names: SiloNames
    #: How many ``store_batch`` calls are worth running at once (the batch writer's
    #: flushes in flight): one for a single-writer database.
    write_concurrency: int = 1
    #: Expired rows one ``delete_expired`` statement of a mass expiry deletes: short enough
    #: that the stores waiting behind it (on a single-writer database: all of them) do not
    #: notice.
    expiry_batch: int = 2000

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (PostgreSQL: create the pool; SQLite: open the file)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection; idempotent."""

    @abc.abstractmethod
    async def create_schema(self) -> None:
        """Create missing tables, indexes and version rows, then ``check_schema()``."""

    @abc.abstractmethod
    async def check_schema(self) -> None:
        """Raise ``SchemaError`` with what to do if the schema cannot be used as it is."""

    @abc.abstractmethod
    async def upgrade_schema(self) -> list[str]:
        """Bring an existing (e.g. OpenSIPS-created) schema up to ours, in place.

        Returns the actions taken, one human-readable line each; empty when nothing was due.
        """

    @abc.abstractmethod
    async def store_batch(
        self, messages: Sequence[NewMessage], max_messages: int
    ) -> list[StoreResult]:
        """Store ``messages`` in one transaction; one result per message, in input order.

        A ``dedupe_key`` already present (in the table or earlier in the batch) gives
        DUPLICATE and inserts nothing.  With ``max_messages > 0`` an owner holding that many
        rows (every row counts, OpenSIPS-style) gets OVER_QUOTA, atomically with respect to
        concurrent stores from any process or host.
        """

    @abc.abstractmethod
    async def claim_for_dump(
        self,
        username: str,
        domain: str,
        *,
        lease_owner: str,
        lease_seconds: int,
        now: int,
        limit: int | None = None,
    ) -> list[StoredMessage]:
        """Lease and return the owner's deliverable rows in arrival order.

        Deliverable: ``snd_time = 0``, ``exp_time > now``, no live lease.  Concurrent claims
        never return the same row.
        """

    # -- per-device delivery (``msilo.storage.ledger``) -------------------------------

    @abc.abstractmethod
    async def claim_for_device(
        self,
        username: str,
        domain: str,
        device: str,
        *,
        lease_owner: str,
        lease_seconds: int,
        now: int,
        limit: int | None = None,
    ) -> list[tuple[StoredMessage, bool]]:
        """Lease for ``device`` and return, in arrival order, the owner's deliverable rows
        the device has not had, each with True when it is the first attempt to it.

        Deliverable as for ``claim_for_dump``; the lease is per (row, device), so other
        devices of the owner claim the same rows at the same time.  Concurrent claims for
        one device never return the same row.
        """

    @abc.abstractmethod
    async def settle_delivered(self, pairs: Sequence[tuple[int, str]], *, memory: int) -> int:
        """Record that each (mid, device) got its message; delete every message no due
        device lacks any more (due: remembered at most ``memory`` seconds before the
        message arrived).  Returns how many messages were deleted."""

    @abc.abstractmethod
    async def release_device_leases(
        self, pairs: Sequence[tuple[int, str]], *, failed: bool = True
    ) -> int:
        """Drop the (mid, device) leases of deliveries that did not succeed; ``failed``
        also counts an attempt on the row.  Returns how many leases were dropped."""

    @abc.abstractmethod
    async def touch_devices(
        self, username: str, domain: str, devices: Sequence[str], *, now: int
    ) -> None:
        """Remember ``devices`` of the owner as registered at ``now``."""

    @abc.abstractmethod
    async def forget_devices(
        self, username: str, domain: str, devices: Sequence[str] | None, *, memory: int
    ) -> int:
        """Forget the owner's ``devices`` (None: all of them: the user logged out
        everywhere) and delete the messages they leave complete; returns how many."""

    @abc.abstractmethod
    async def remembered_devices(self, username: str, domain: str, *, since: int) -> list[str]:
        """The owner's devices whose last REGISTER is at ``since`` or later."""

    @abc.abstractmethod
    async def forget_old_devices(self, before: int) -> int:
        """Forget devices last registered before ``before`` and drop ledger rows of
        messages that are gone; returns how many devices were forgotten."""

    # -- push targets (RFC 8599; :mod:`msilo.storage.push_targets`) ---------------------

    @abc.abstractmethod
    async def save_push_target(
        self,
        username: str,
        domain: str,
        device: str,
        *,
        provider: str,
        prid: str,
        param: str | None,
        now: int,
    ) -> None:
        """Keep (or replace) the push parameters of the owner's ``device``, registered at
        ``now``; ``forget_devices`` and ``forget_old_devices`` forget them with the device."""

    @abc.abstractmethod
    async def claim_push_targets(
        self,
        username: str,
        domain: str,
        *,
        now_ms: int,
        window_ms: int,
        since: int,
        exclude: Sequence[str] = (),
    ) -> list[PushRecord]:
        """Atomically take the owner's push targets that may be pushed now: registered at
        ``since`` or later, not in ``exclude``, not pushed in the last ``window_ms``
        milliseconds.  Each taken one is marked pushed at ``now_ms`` (across processes and
        hosts one caller gets a device per window) and says how many messages the owner
        has stored (``waiting``)."""

    @abc.abstractmethod
    async def drop_push_target(self, username: str, domain: str, device: str, *, prid: str) -> bool:
        """Forget a device's push parameters whose token ``prid`` the provider says is
        dead (unless the device registered another token meanwhile); True if dropped."""

    @abc.abstractmethod
    async def take_push_time(self, username: str, domain: str, device: str) -> int | None:
        """When the device was last pushed (epoch milliseconds), cleared so the next
        delivery does not count it again; None when no push is outstanding."""

    @abc.abstractmethod
    async def delete_delivered(self, mids: Sequence[int]) -> int:
        """Delete delivered rows; returns how many were deleted."""

    @abc.abstractmethod
    async def release_lease(self, mids: Sequence[int], *, failed: bool = True) -> int:
        """Clear the rows' leases; ``failed`` also counts a failed delivery attempt."""

    @abc.abstractmethod
    async def recover_expired_leases(self, now: int) -> int:
        """Clear leases whose deadline has passed (their holder died or hung)."""

    @abc.abstractmethod
    async def delete_expired(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` rows with ``exp_time <= now`` in one short statement and
        return how many went; call again until fewer than ``limit`` go (a mass expiry is
        many small statements, so the stores running meanwhile are not held up)."""

    @abc.abstractmethod
    async def take_expired(self, now: int, limit: int) -> list[StoredMessage]:
        """Delete up to ``limit`` rows with ``exp_time <= now`` and return them (to tell
        their senders), oldest ids first; call again until fewer than ``limit`` come back."""

    @abc.abstractmethod
    async def claim_due_reminders(
        self, *, now: int, lease_owner: str, lease_seconds: int, limit: int
    ) -> list[StoredMessage]:
        """Lease and return up to ``limit`` due reminders (``0 < snd_time <= now``), by time."""

    @abc.abstractmethod
    async def reset_reminder(self, mids: Sequence[int]) -> int:
        """Turn failed reminders into ordinary offline messages (``snd_time = 0``, unleased)."""

    @abc.abstractmethod
    async def count(self, username: str, domain: str) -> int:
        """Number of rows of the owner."""

    @abc.abstractmethod
    async def purge(self, username: str, domain: str) -> int:
        """Delete every row of the owner; returns how many."""

    # -- registrar bindings (the ``location`` table) --------------------------------

    @abc.abstractmethod
    async def update_bindings(
        self, username: str, domain: str, plan: PlanFunction, *, now: int
    ) -> BindingsOutcome:
        """Atomically apply ``plan`` to the user's bindings (one transaction per user,
        serialised against concurrent REGISTERs for that user on any host); returns the
        live bindings afterwards, or the plan's error with nothing changed."""

    async def register_contact(
        self, binding: Binding, *, now: int, device: str | None, max_contacts: int = 0
    ) -> RegisterOutcome | None:
        """Add or refresh one binding in one round trip, remember ``device``, and say whether
        the user has anything stored -- or None, changing nothing, when the registrar's plan
        must judge (the binding's Call-ID with a CSeq not higher than stored, its instance
        at another contact, ``max_contacts`` reached) or the backend has no such path."""
        return None

    async def registration_state(
        self, username: str, domain: str, *, now: int
    ) -> tuple[list[Binding], bool] | None:
        """The user's live bindings and whether anything stored awaits them, read without
        writing (``registrar.write_behind``'s check of a refresh); None where the backend
        has no such cheap read (the caller then writes through)."""
        return None

    async def refresh_bindings(self, refreshes: Sequence[tuple[Binding, str | None]]) -> int:
        """Write deferred refreshes (binding, its device key) where the stored binding is
        still the one refreshed (same contact and Call-ID, lower CSeq); bindings updated."""
        raise NotImplementedError(f"{type(self).__name__} defers no refreshes")

    @abc.abstractmethod
    async def lookup_bindings(self, username: str, domain: str, *, now: int) -> list[Binding]:
        """The user's bindings that have not expired, best ``q`` first."""

    @abc.abstractmethod
    async def delete_expired_bindings(self, now: int) -> int:
        """Delete bindings whose expiry has passed; returns how many."""

    # -- digest credentials (the ``subscriber`` table) and nonce counts --------------

    @abc.abstractmethod
    async def get_subscriber(self, username: str, domain: str) -> Subscriber | None:
        """The user's credentials, or None when there is no such subscriber."""

    @abc.abstractmethod
    async def set_subscriber(
        self,
        username: str,
        domain: str,
        *,
        password: str | None = None,
        ha1: str | None = None,
        ha1_sha256: str | None = None,
        ha1_sha512t256: str | None = None,
    ) -> bool:
        """Create the subscriber or replace its credentials; True when it was created.

        The credentials are replaced as a whole: a field left None is stored empty, so an
        old HA1 never outlives a password change.
        """

    @abc.abstractmethod
    async def remove_subscriber(self, username: str, domain: str) -> bool:
        """Delete the subscriber; False when there was none."""

    @abc.abstractmethod
    async def use_nonce(self, nonce: str, nc: int, *, expires: int) -> bool:
        """Record nonce-count ``nc`` for ``nonce`` if it is greater than every count recorded
        for it before; returns False (and records nothing) for a replay.  Atomic across
        processes and hosts.  ``expires``: when the row may be deleted."""

    @abc.abstractmethod
    async def delete_expired_nonces(self, now: int) -> int:
        """Forget the counts of nonces whose ``expires`` has passed; returns how many."""

    @abc.abstractmethod
    async def count_auth_failures(
        self, source: str, identity: str, *, now: int, window: int
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Count one failed (or pending) authentication for each key in its current window
        (a new one of ``window`` seconds starts when the last has ended); returns, per key,
        the count so far (this one included) and when its window ends.  Atomic across
        processes and hosts; one round trip."""

    @abc.abstractmethod
    async def forgive_auth_failures(self, source: str, identity: str, *, now: int) -> None:
        """Take back one counted failure of each key (the attempt succeeded)."""

    @abc.abstractmethod
    async def delete_expired_auth_failures(self, now: int) -> int:
        """Forget failure counts whose window has ended; returns how many."""

    # -- read-only helpers for operations (the CLI, the leader's gauges) -----------------

    async def list_page(
        self, username: str, domain: str, limit: int | None, offset: int = 0
    ) -> list[StoredMessage]:
        """Rows of the owner in arrival order, at most ``limit`` (None: all) from ``offset``.

        Backends answer with LIMIT/OFFSET in SQL; this fallback slices :meth:`list`.
        """
        rows = await self.list(username, domain)
        return rows[offset:] if limit is None else rows[offset : offset + limit]

    async def silo_summary(self) -> SiloSummary:
        """Stored rows and the arrival time of the oldest, for the leader's gauges.

        Backends answer from the expiry index (the row that expires first arrived first
        under one ``expire_time``) plus one count; this fallback is for test doubles.
        """
        return SiloSummary(rows=0, oldest_inc_time=None)

    # Defined last: inside the class body ``list`` names this method from here on.
    @abc.abstractmethod
    async def list(self, username: str, domain: str) -> list[StoredMessage]:
        """Every row of the owner, in arrival order."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
