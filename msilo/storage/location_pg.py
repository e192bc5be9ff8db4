"""A REGISTER's change to the location table in two round trips (PostgreSQL).

The registrar's plan is Python (expiry rules, limits, RFC 5626 instances), so it must
see the user's current bindings before anything is written.  Holding a transaction
and an advisory lock across that takes six round trips (BEGIN, lock, read, write,
re-read, COMMIT).  Instead the bindings are read without a lock, each with its row
version (``xmin``), and the plan is applied by one function call that takes the same
per-user advisory lock, checks that the versions are still the ones read, and only
then writes; if another REGISTER for the user got there first it changes nothing
and the caller reads and plans again.  plpgsql runs every statement of a VOLATILE
function with a fresh snapshot under READ COMMITTED, so the check sees whatever a
REGISTER that held the lock before us committed.
"""

from __future__ import annotations

from collections.abc import Sequence

from msilo.storage._sql import GENERIC_PLANS
from msilo.storage.location import COLUMNS, Binding, binding_row

FUNCTION = "msilo_location_apply"

# The user's bindings with their row versions ("contact/xmin"), read without a lock.
SELECT_VERSIONED = (
    f"SELECT {COLUMNS}, contact || '/' || xmin::text FROM location "
    "WHERE username = $1 AND domain = $2"
)

# The advisory-lock key is the one the transactional path uses too, so both serialise
# against each other (a rolling upgrade runs old and new workers side by side).
SOURCE = """
BEGIN
    PERFORM pg_advisory_xact_lock(
        hashtextextended('msilo-location:' || p_username || '@' || p_domain, 7));
    IF ARRAY(SELECT contact || '/' || xmin::text FROM location
             WHERE username = p_username AND domain = p_domain ORDER BY 1)
       IS DISTINCT FROM ARRAY(SELECT v FROM unnest(p_versions) AS v ORDER BY 1) THEN
        RETURN false;
    END IF;
    IF cardinality(p_removes) > 0 THEN
        DELETE FROM location
        WHERE username = p_username AND domain = p_domain AND contact = ANY(p_removes);
    END IF;
    IF cardinality(p_contact) > 0 THEN
        INSERT INTO location (username, domain, contact, received, path, expires, q,
                              callid, cseq, methods, instance, transport, last_modified)
        SELECT p_username, p_domain, u.* FROM unnest(
            p_contact, p_received, p_path, p_expires, p_q, p_callid, p_cseq, p_methods,
            p_instance, p_transport, p_last_modified) AS u
        ON CONFLICT (username, domain, contact) DO UPDATE SET
            received = excluded.received, path = excluded.path,
            expires = excluded.expires, q = excluded.q, callid = excluded.callid,
            cseq = excluded.cseq, methods = excluded.methods,
            instance = excluded.instance, transport = excluded.transport,
            last_modified = excluded.last_modified;
    END IF;
    RETURN true;
END
"""

# The input arguments' types: the function's identity.
FUNCTION_ARGS = (
    "text, text, text[], text[], text[], text[], text[], bigint[], real[], text[], integer[], "
    "text[], text[], text[], bigint[]"
)

_PARAMS = (
    "p_username text, p_domain text, p_versions text[], p_removes text[], "
    "p_contact text[], p_received text[], p_path text[], p_expires bigint[], p_q real[], "
    "p_callid text[], p_cseq integer[], p_methods text[], p_instance text[], "
    "p_transport text[], p_last_modified bigint[]"
)

DDL = (
    f"CREATE OR REPLACE FUNCTION {FUNCTION}({_PARAMS}) RETURNS boolean "
    f"LANGUAGE plpgsql VOLATILE SET {GENERIC_PLANS} AS $msilo${SOURCE}$msilo$"
)

CALL = f"SELECT {FUNCTION}({', '.join(f'${i}' for i in range(1, 16))})"


def apply_args(
    username: str,
    domain: str,
    versions: Sequence[str],
    removes: Sequence[str],
    upserts: Sequence[Binding],
) -> tuple[object, ...]:
    """The 15 arguments of :data:`CALL`: upserts column by column (username and domain
    are the call's own, the first two values of each row)."""
    columns: list[list[object]] = [[] for _ in range(11)]
    for binding in upserts:
        for column, value in zip(columns, binding_row(binding)[2:], strict=True):
            column.append(value)
    return (username, domain, list(versions), list(removes), *columns)


# -- one contact added or refreshed in one round trip ------------------------------------

REGISTER_ARGS = (
    "text, text, text, text, text, bigint, real, text, integer, text, text, text, bigint, "
    "text, integer"
)

_REGISTER_PARAMS = (
    "p_username text, p_domain text, p_contact text, p_received text, p_path text, "
    "p_expires bigint, p_q real, p_callid text, p_cseq integer, p_methods text, "
    "p_instance text, p_transport text, p_now bigint, p_device text, p_max_contacts integer, "
    "OUT done boolean, OUT pending boolean, OUT contacts text[], OUT expiries bigint[], "
    "OUT qs real[], OUT instances text[]"
)


def register_source(
    silo_table: str, username: str, domain: str, snd_time: str, exp_time: str, touch: int
) -> str:
    """The body of the one-contact REGISTER function (names already quoted).

    It holds the user's advisory lock (the key the plan path uses), so it serialises with
    every other REGISTER of the user; it hands back (done = false, nothing written) what
    the plan must judge.  The pending probe is an index lookup on the silo table's owner
    index in the same round trip: a REGISTER for a user with nothing stored needs no dump.
    """
    return f"""
BEGIN
    PERFORM pg_advisory_xact_lock(
        hashtextextended('msilo-location:' || p_username || '@' || p_domain, 7));
    -- RFC 3261 §10.3 step 7 (a replayed or out-of-order CSeq), RFC 5626 (the instance now
    -- at another contact) and the contact limit are the plan's to judge.
    IF EXISTS (SELECT 1 FROM location l
               WHERE l.username = p_username AND l.domain = p_domain AND l.expires > p_now
                 AND (l.contact = p_contact
                      OR (p_instance IS NOT NULL AND l.instance = p_instance))
                 AND (l.contact <> p_contact
                      OR (l.callid = p_callid AND l.cseq >= p_cseq)))
       OR (p_max_contacts > 0 AND
           (SELECT count(*) FROM location l
            WHERE l.username = p_username AND l.domain = p_domain AND l.expires > p_now
              AND l.contact <> p_contact) >= p_max_contacts) THEN
        done := false;
        RETURN;
    END IF;
    DELETE FROM location
    WHERE username = p_username AND domain = p_domain AND expires <= p_now;
    INSERT INTO location (username, domain, contact, received, path, expires, q, callid,
                          cseq, methods, instance, transport, last_modified)
    VALUES (p_username, p_domain, p_contact, p_received, p_path, p_expires, p_q, p_callid,
            p_cseq, p_methods, p_instance, p_transport, p_now)
    ON CONFLICT (username, domain, contact) DO UPDATE SET
        received = excluded.received, path = excluded.path, expires = excluded.expires,
        q = excluded.q, callid = excluded.callid, cseq = excluded.cseq,
        methods = excluded.methods, instance = excluded.instance,
        transport = excluded.transport, last_modified = excluded.last_modified;
    IF p_device IS NOT NULL THEN
        -- A refresh rewrites the device row only when it is older than the granularity.
        INSERT INTO msilo_device AS d (username, domain, device, last_register)
        VALUES (p_username, p_domain, p_device, p_now)
        ON CONFLICT (username, domain, device) DO UPDATE SET
            last_register = excluded.last_register
        WHERE d.last_register <= excluded.last_register - {touch};
    END IF;
    SELECT array_agg(l.contact ORDER BY COALESCE(l.q, 1.0) DESC, l.last_modified DESC,
                     l.contact),
           array_agg(l.expires ORDER BY COALESCE(l.q, 1.0) DESC, l.last_modified DESC,
                     l.contact),
           array_agg(l.q ORDER BY COALESCE(l.q, 1.0) DESC, l.last_modified DESC, l.contact),
           array_agg(l.instance ORDER BY COALESCE(l.q, 1.0) DESC, l.last_modified DESC,
                     l.contact)
    INTO contacts, expiries, qs, instances
    FROM location l
    WHERE l.username = p_username AND l.domain = p_domain AND l.expires > p_now;
    pending := EXISTS (SELECT 1 FROM {silo_table} m
                       WHERE m.{username} = p_username AND m.{domain} = p_domain
                         AND m.{snd_time} = 0 AND m.{exp_time} > p_now);
    done := true;
END
"""


def register_ddl(function: str, source: str) -> str:
    """CREATE OR REPLACE FUNCTION around ``register_source``."""
    return (
        f'CREATE OR REPLACE FUNCTION "{function}"({_REGISTER_PARAMS}) '
        f"LANGUAGE plpgsql VOLATILE SET {GENERIC_PLANS} AS $msilo${source}$msilo$"
    )


def register_call(function: str) -> str:
    """The statement that applies many REGISTERs (one per array position) in one round
    trip and one commit: group commit, as the store path does.

    Calls run in lock-key order (the subquery's order; a LATERAL call per row), so two
    batches holding several users' locks queue instead of deadlocking; two REGISTERs of
    one user in a batch run one after the other, the second seeing the first (each
    statement of a VOLATILE function takes a fresh snapshot).
    """
    return (
        f"SELECT s.ord, r.done, r.pending, r.contacts, r.expiries, r.qs, r.instances "
        f"FROM (SELECT k.*, hashtextextended('msilo-location:' || k.u || '@' || k.d, 7) AS lk "
        f"FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        f"$6::bigint[], $7::real[], $8::text[], $9::integer[], $10::text[], $11::text[], "
        f"$12::text[], $13::bigint[], $14::text[], $15::integer[]) WITH ORDINALITY AS "
        f"k(u, d, c, rc, pa, ex, q, ci, cs, me, ins, tr, nw, dv, mx, ord) "
        f"ORDER BY lk, k.ord) AS s "
        f'CROSS JOIN LATERAL "{function}"(s.u, s.d, s.c, s.rc, s.pa, s.ex, s.q, s.ci, s.cs, '
        f"s.me, s.ins, s.tr, s.nw, s.dv, s.mx) AS r"
    )


# -- registrar.write_behind: a pure refresh read now, written later ---------------------------


def state_many_sql(
    silo_table: str, username: str, domain: str, snd_time: str, exp_time: str
) -> str:
    """Many users' live bindings and their "anything stored?" probe in one read-only query
    (names already quoted): ``ord, COLUMNS…, pending``; a user without live bindings still
    has one row (its binding columns NULL), so the probe always comes back."""
    columns = ", ".join(f"l.{c.strip()}" for c in COLUMNS.split(","))
    return (
        f"SELECT k.ord, {columns}, EXISTS (SELECT 1 FROM {silo_table} m "
        f"WHERE m.{username} = k.u AND m.{domain} = k.d AND m.{snd_time} = 0 "
        f"AND m.{exp_time} > k.n) "
        f"FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS k(u, d, n, ord) "
        f"LEFT JOIN location l ON l.username = k.u AND l.domain = k.d AND l.expires > k.n"
    )


# The users' locks in the order every REGISTER takes them (register_call), so a flush
# holding several queues behind a batch instead of deadlocking with it.
REFRESH_LOCKS = (
    "SELECT pg_advisory_xact_lock(lk) FROM (SELECT DISTINCT "
    "hashtextextended('msilo-location:' || u || '@' || d, 7) AS lk "
    "FROM unnest($1::text[], $2::text[]) AS k(u, d) ORDER BY lk) AS s"
)


def refresh_sql(touch: int) -> str:
    """Deferred refreshes applied where the binding is still the one refreshed (same
    contact and Call-ID, lower CSeq: RFC 3261 §10.3 step 7 keeps a newer REGISTER's
    change), devices touched as the register function does; returns bindings updated."""
    return (
        "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
        "$5::integer[], $6::bigint[], $7::bigint[], $8::text[]) "
        "AS k(u, d, c, ci, cs, ex, lm, dv)), "
        "r AS (UPDATE location l SET expires = k.ex, cseq = k.cs, last_modified = k.lm FROM k "
        "WHERE l.username = k.u AND l.domain = k.d AND l.contact = k.c AND l.callid = k.ci "
        "AND l.cseq < k.cs RETURNING 1), "
        "t AS (INSERT INTO msilo_device AS dv (username, domain, device, last_register) "
        "SELECT DISTINCT ON (u, d, dv) u, d, dv, lm FROM k WHERE dv IS NOT NULL "
        "ORDER BY u, d, dv, lm DESC "
        "ON CONFLICT (username, domain, device) DO UPDATE SET "
        "last_register = excluded.last_register "
        f"WHERE dv.last_register <= excluded.last_register - {touch}) "
        "SELECT count(*) FROM r"
    )
