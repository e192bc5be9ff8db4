"""MySQL/MariaDB dialect of msilo's schema: table definitions, the store procedure and the
placeholder renderer.

Every connection runs with ``sql_mode`` ``ANSI_QUOTES`` and ``PIPES_AS_CONCAT`` (see
``SESSION_SQL_MODE``), so the statements both other backends share (``_sql``, ``ledger``,
``subscriber``: double-quoted names, ``||``) run here unchanged, and with
``STRICT_ALL_TABLES``: a value a column cannot hold is an error, never silently cut, whatever
the server's own ``sql_mode`` says.

Our tables are ``utf8mb4`` with the binary collation ``utf8mb4_bin``: owners, Call-IDs and
dedupe keys compare exactly, as on PostgreSQL and SQLite (the servers' default collations
ignore case, so ``Alice`` and ``alice`` would share a mailbox and two Call-IDs differing in
case one dedupe key).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from msilo.storage import ledger, push_targets, subscriber
from msilo.storage._sql import SiloSql
from msilo.storage.base import SiloNames, quote_ident

#: ``sql_mode`` of every msilo session (the server's global mode does not matter).
SESSION_SQL_MODE = (
    "ANSI_QUOTES,PIPES_AS_CONCAT,STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,"
    "ERROR_FOR_DIVISION_BY_ZERO,NO_ZERO_DATE,NO_ZERO_IN_DATE"
)
TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
COLLATION = "utf8mb4_bin"

#: The longest contact URI and device key msilo keeps on MySQL.  InnoDB keys are at most
#: 3072 bytes: ``(username, domain, contact)`` in ``utf8mb4`` (4 bytes a character) leaves
#: 600 characters for the contact (Kamailio's own column is 512).
KEY_TEXT_LIMIT = 600
#: ``dedupe_key`` is a ``VARCHAR(255)`` (a unique index needs a bounded column); a longer key
#: (a very long Call-ID) is stored as its SHA-256, which is as unique.
DEDUPE_LIMIT = 255
#: ``MEDIUMBLOB``: the largest body (16 MiB - 1 bytes).
BODY_LIMIT = 2**24 - 1

#: Rows of the lock table (``LOCK_TABLE``): per-owner locks for the quota and per-user locks
#: for REGISTER are row locks on ``slot = hash(key) mod LOCK_SLOTS``.  Two keys sharing a
#: slot only wait for each other; the rows exist from the start, so taking one never inserts
#: (no gap locks, no insert races).
LOCK_SLOTS = 65536
LOCK_TABLE = "msilo_lock"
#: The leader's note of who holds the deployment lock (``GET_LOCK`` tells only a connection id).
LEADER_TABLE = "msilo_leader"

# Outcome codes the store procedure reports (as PostgreSQL's store function).
STORED, DUPLICATE, OVER_QUOTA, ONLINE = 0, 1, 2, 4

_PLACEHOLDER = re.compile(r"\{(\d+)\}")


class Q:
    """A statement written with ``{n}`` placeholders, rendered for the ``%s`` paramstyle of
    the MySQL drivers (arguments bound by position, so a repeated ``{n}`` repeats its value).
    """

    __slots__ = ("order", "text")

    def __init__(self, sql: str) -> None:
        order: list[int] = []

        def sub(m: re.Match[str]) -> str:
            order.append(int(m.group(1)))
            return "%s"

        # A literal % must be doubled: the drivers format the statement with %.
        self.text = _PLACEHOLDER.sub(sub, sql.replace("%", "%%"))
        self.order = tuple(order)

    def args(self, *values: object) -> tuple[object, ...]:
        """The arguments in the order their placeholders appear."""
        return tuple(values[i] for i in self.order)


def slot(key: str) -> int:
    """The lock-table row of ``key`` (stable across processes and hosts)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % LOCK_SLOTS


def owner_slot(table: str, username: str, domain: str) -> int:
    """The quota lock of an owner of silo table ``table``."""
    return slot(f"silo|{table}|{username}@{domain}")


def location_slot(username: str, domain: str) -> int:
    """The REGISTER lock of a user (one location table per database)."""
    return slot(f"location|{username}@{domain}")


def device_slot(table: str, username: str, domain: str, device: str) -> int:
    """The claim lock of one device of an owner."""
    return slot(f"device|{table}|{username}@{domain}|{device}")


def dedupe_value(key: str | None) -> str | None:
    """``key`` as the ``dedupe_key`` column holds it (a long key by its SHA-256)."""
    if key is None or len(key) <= DEDUPE_LIMIT:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def in_list(n: int) -> str:
    """``%s, %s, ...`` for an ``IN`` list of ``n`` values."""
    return ", ".join(["%s"] * n)


# --- DDL ------------------------------------------------------------------------------------

ID_TYPE = "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY"

#: Our extra silo columns on MySQL (``_sql.EXTRA_COLUMN_DEFS`` with bounded types where an
#: index needs them).
EXTRA_COLUMN_DEFS = {
    "dedupe_key": f"VARCHAR({DEDUPE_LIMIT}) COLLATE {COLLATION} DEFAULT NULL",
    "lease_until": "BIGINT DEFAULT NULL",
    "lease_owner": "VARCHAR(255) COLLATE utf8mb4_bin DEFAULT NULL",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "callid": "TEXT COLLATE utf8mb4_bin DEFAULT NULL",
}


def silo_indexes(s: SiloSql) -> list[tuple[str, tuple[str, ...], str]]:
    """(index name, its columns, definition) of the silo indexes (names are per table on
    MySQL).

    MySQL has no partial indexes: the reminder and lease indexes cover every row (their
    NULL and 0 values are one key each, skipped by the range scans that use them).  The
    owner index holds the arrival time too: InnoDB locks rows as it reads them, before any
    sort, so a claim (``ORDER BY inc_time LIMIT n FOR UPDATE SKIP LOCKED``) must read them in
    index order -- after a sort it would have locked every deliverable row of the owner, and
    a concurrent claimer would skip them all.
    """
    n = s.names
    return [
        (
            n.object_name("account_idx"),
            (n.username, n.domain, n.inc_time),
            f"INDEX {s.idx_account} ({s.username}, {s.domain}, {s.inc_time})",
        ),
        (n.object_name("exp_time_idx"), (n.exp_time,), f"INDEX {s.idx_expiry} ({s.exp_time})"),
        (n.object_name("snd_time_idx"), (n.snd_time,), f"INDEX {s.idx_due} ({s.snd_time})"),
        (n.object_name("lease_idx"), ("lease_until",), f"INDEX {s.idx_lease} (lease_until)"),
        (
            n.object_name("dedupe_key_idx"),
            ("dedupe_key",),
            f"UNIQUE INDEX {s.idx_dedupe} (dedupe_key)",
        ),
    ]


def silo_table_ddl(s: SiloSql) -> str:
    """CREATE TABLE of the silo table: OpenSIPS's ten columns, 64-bit, plus ours."""
    extras = [f"{name} {ddl}" for name, ddl in EXTRA_COLUMN_DEFS.items()]
    indexes = [ddl for _, _, ddl in silo_indexes(s)]
    body = ",\n    ".join(
        [
            f"{s.mid} {ID_TYPE}",
            f"{s.src_addr} VARCHAR(255) NOT NULL DEFAULT ''",
            f"{s.dst_addr} VARCHAR(255) NOT NULL DEFAULT ''",
            f"{s.username} VARCHAR(64) NOT NULL DEFAULT ''",
            f"{s.domain} VARCHAR(64) NOT NULL DEFAULT ''",
            f"{s.inc_time} BIGINT NOT NULL DEFAULT 0",
            f"{s.exp_time} BIGINT NOT NULL DEFAULT 0",
            f"{s.snd_time} BIGINT NOT NULL DEFAULT 0",
            f"{s.ctype} TEXT DEFAULT NULL",
            # MEDIUMBLOB, not BLOB: a BLOB holds 64 KiB, and outside strict mode a longer
            # body would be cut without an error.
            f"{s.body} MEDIUMBLOB DEFAULT NULL",
            *extras,
            *indexes,
        ]
    )
    return f"CREATE TABLE {s.table} (\n    {body}\n) {TABLE_OPTIONS}"


VERSION_DDL = f"""CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER UNSIGNED NOT NULL DEFAULT 0,
    CONSTRAINT version_t_name_idx UNIQUE (table_name)
) {TABLE_OPTIONS}"""

_K = KEY_TEXT_LIMIT


def aux_tables_ddl() -> list[tuple[str, str]]:
    """(table, CREATE TABLE) of every table beside the silo's ones (fixed names)."""
    return [
        (
            "location",
            f"""CREATE TABLE IF NOT EXISTS location (
    id {ID_TYPE},
    username VARCHAR(64) NOT NULL DEFAULT '',
    domain VARCHAR(64) NOT NULL DEFAULT '',
    contact VARCHAR({_K}) NOT NULL,
    received TEXT DEFAULT NULL,
    path TEXT DEFAULT NULL,
    expires BIGINT NOT NULL DEFAULT 0,
    q DOUBLE DEFAULT NULL,
    callid TEXT NOT NULL,
    cseq INTEGER NOT NULL DEFAULT 0,
    methods TEXT DEFAULT NULL,
    instance TEXT DEFAULT NULL,
    transport TEXT DEFAULT NULL,
    last_modified BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT location_contact_idx UNIQUE (username, domain, contact),
    INDEX location_expires_idx (expires)
) {TABLE_OPTIONS}""",
        ),
        (
            "subscriber",
            f"""CREATE TABLE IF NOT EXISTS subscriber (
    id {ID_TYPE},
    username VARCHAR(64) NOT NULL DEFAULT '',
    domain VARCHAR(64) NOT NULL DEFAULT '',
    password VARCHAR(25) NOT NULL DEFAULT '',
    ha1 VARCHAR(64) NOT NULL DEFAULT '',
    ha1_sha256 VARCHAR(64) NOT NULL DEFAULT '',
    ha1_sha512t256 VARCHAR(64) NOT NULL DEFAULT '',
    CONSTRAINT subscriber_account_idx UNIQUE (username, domain),
    INDEX subscriber_username_idx (username)
) {TABLE_OPTIONS}""",
        ),
        (
            subscriber.NONCE_TABLE,
            f"""CREATE TABLE IF NOT EXISTS {subscriber.NONCE_TABLE} (
    nonce VARCHAR({subscriber.NONCE_MAX}) NOT NULL PRIMARY KEY,
    nc BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    INDEX {subscriber.NONCE_TABLE}_expires_idx (expires)
) {TABLE_OPTIONS}""",
        ),
        (
            subscriber.AUTH_FAIL_TABLE,
            f"""CREATE TABLE IF NOT EXISTS {subscriber.AUTH_FAIL_TABLE} (
    who VARCHAR({subscriber.AUTH_KEY_MAX}) NOT NULL PRIMARY KEY,
    failures BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    INDEX {subscriber.AUTH_FAIL_TABLE}_end_idx (window_end)
) {TABLE_OPTIONS}""",
        ),
        (
            ledger.DEVICE_TABLE,
            f"""CREATE TABLE IF NOT EXISTS {ledger.DEVICE_TABLE} (
    username VARCHAR(64) NOT NULL,
    domain VARCHAR(64) NOT NULL,
    device VARCHAR({_K}) NOT NULL,
    last_register BIGINT NOT NULL,
    PRIMARY KEY (username, domain, device),
    INDEX {ledger.DEVICE_TABLE}_last_idx (last_register)
) {TABLE_OPTIONS}""",
        ),
        (
            push_targets.PUSH_TABLE,
            f"""CREATE TABLE IF NOT EXISTS {push_targets.PUSH_TABLE} (
    username VARCHAR(64) NOT NULL,
    domain VARCHAR(64) NOT NULL,
    device VARCHAR({_K}) NOT NULL,
    provider VARCHAR(64) NOT NULL,
    prid TEXT NOT NULL,
    param TEXT DEFAULT NULL,
    last_register BIGINT NOT NULL,
    pushed_ms BIGINT DEFAULT NULL,
    PRIMARY KEY (username, domain, device),
    INDEX {push_targets.PUSH_TABLE}_last_idx (last_register)
) {TABLE_OPTIONS}""",
        ),
        (
            LOCK_TABLE,
            f"""CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (
    slot INTEGER NOT NULL PRIMARY KEY
) {TABLE_OPTIONS}""",
        ),
        (
            LEADER_TABLE,
            f"""CREATE TABLE IF NOT EXISTS {LEADER_TABLE} (
    lock_name VARCHAR(64) NOT NULL PRIMARY KEY,
    conn_id BIGINT NOT NULL,
    host VARCHAR(255) NOT NULL,
    pid BIGINT NOT NULL,
    since DOUBLE NOT NULL
) {TABLE_OPTIONS}""",
        ),
    ]


# The lock table's rows, 0 .. LOCK_SLOTS-1, from a cross join of four 16-row tables.
_HEX = " UNION ALL ".join(f"SELECT {i} AS n" for i in range(16))
FILL_LOCKS = (
    f"INSERT IGNORE INTO {LOCK_TABLE} (slot) "
    f"SELECT a.n + 16 * b.n + 256 * c.n + 4096 * d.n "
    f"FROM ({_HEX}) a, ({_HEX}) b, ({_HEX}) c, ({_HEX}) d"
)


def ledger_ddl(names: SiloNames) -> str:
    """CREATE TABLE of the delivery ledger of silo table ``names.table``."""
    return f"""CREATE TABLE IF NOT EXISTS {quote_ident(ledger.ledger_table(names))} (
    mid BIGINT NOT NULL,
    device VARCHAR({_K}) NOT NULL,
    delivered SMALLINT NOT NULL DEFAULT 0,
    lease_until BIGINT DEFAULT NULL,
    lease_owner VARCHAR(255) DEFAULT NULL,
    PRIMARY KEY (mid, device)
) {TABLE_OPTIONS}"""


# --- the store procedure -----------------------------------------------------------------

_TEXT = f"CHARACTER SET utf8mb4 COLLATE {COLLATION}"


def _json_rows(with_body: bool) -> str:
    """``JSON_TABLE`` over the batch (``p_rows``): one row per message, ``ord`` from 1."""
    body = "b LONGTEXT PATH '$.b', " if with_body else ""
    return f"""JSON_TABLE(p_rows, '$[*]' COLUMNS (
            ord FOR ORDINALITY,
            u VARCHAR(64) PATH '$.u', d VARCHAR(64) PATH '$.d',
            sa VARCHAR(255) PATH '$.s', da VARCHAR(255) PATH '$.t',
            {body}ct TEXT PATH '$.c',
            inc BIGINT PATH '$.i', exp BIGINT PATH '$.e', snd BIGINT PATH '$.n',
            k VARCHAR(255) PATH '$.k', chk INT PATH '$.o', cid TEXT PATH '$.x')) AS j"""


def store_procedure_body(s: SiloSql) -> str:
    """The body of the batch-store procedure (compared with information_schema on start).

    One CALL stores a batch: one round trip and, with ``p_txn``, one transaction of its own.
    ``p_rows`` is a JSON array of row objects (bodies base64: JSON holds text); ``p_slots``
    the owners' lock rows, sorted, so two batches sharing owners queue instead of
    deadlocking.  The session runs READ COMMITTED, so each statement after the locks sees
    what the previous holder committed: the quota holds across processes and hosts.

    The fast path (``p_fast``) is set-based: one SELECT gives every row its fate (a dedupe
    key already stored, the owner online, the owner's count plus the row's rank over the
    quota), one INSERT ... SELECT stores the rest in input order.  Its ids are consecutive
    (``innodb_autoinc_lock_mode`` 0 or 1: an INSERT ... SELECT holds the AUTO-INC lock to its
    end), so the caller derives each row's id from the first one.  A dedupe key inserted by
    a concurrent transaction fails that INSERT as a whole (1062, nothing of it stays) and the
    batch takes the slow path: a loop storing row by row, each duplicate found by its key.
    """
    t = s.table
    owner_count = f"(SELECT count(*) FROM {t} x WHERE x.{s.username} = j.u AND x.{s.domain} = j.d)"
    online = (
        "(j.chk = 1 AND EXISTS (SELECT 1 FROM location l "
        "WHERE l.username = j.u AND l.domain = j.d AND l.expires > p_now "
        "AND (l.methods IS NULL OR FIND_IN_SET('MESSAGE', l.methods) > 0)))"
    )
    columns = (
        f"{s.username}, {s.domain}, {s.src_addr}, {s.dst_addr}, {s.body}, {s.ctype}, "
        f"{s.inc_time}, {s.exp_time}, {s.snd_time}, dedupe_key, callid"
    )
    return f"""BEGIN
    DECLARE v_done INT DEFAULT 0;
    DECLARE v_i INT DEFAULT 0;
    DECLARE v_slot INT;
    DECLARE v_conflict INT DEFAULT 0;
    DECLARE v_codes LONGTEXT CHARACTER SET ascii;
    DECLARE v_olds LONGTEXT CHARACTER SET ascii;
    DECLARE v_first BIGINT DEFAULT NULL;
    DECLARE v_n BIGINT DEFAULT 0;
    DECLARE v_u VARCHAR(64) {_TEXT};
    DECLARE v_d VARCHAR(64) {_TEXT};
    DECLARE v_sa VARCHAR(255) {_TEXT};
    DECLARE v_da VARCHAR(255) {_TEXT};
    DECLARE v_b LONGTEXT CHARACTER SET ascii;
    DECLARE v_ct TEXT {_TEXT};
    DECLARE v_inc BIGINT;
    DECLARE v_exp BIGINT;
    DECLARE v_snd BIGINT;
    DECLARE v_k VARCHAR(255) {_TEXT};
    DECLARE v_chk INT;
    DECLARE v_cid TEXT {_TEXT};
    DECLARE v_mid BIGINT;
    DECLARE v_o INT;
    DECLARE v_dup INT;
    DECLARE v_out LONGTEXT CHARACTER SET ascii DEFAULT '';
    DECLARE v_rows CURSOR FOR
        SELECT j.u, j.d, j.sa, j.da, j.b, j.ct, j.inc, j.exp, j.snd, j.k, j.chk, j.cid
        FROM {_json_rows(True)}
        ORDER BY j.ord;
    DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_done = 1;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION
    BEGIN
        IF p_txn THEN
            ROLLBACK;
        END IF;
        RESIGNAL;
    END;
    IF p_txn THEN
        START TRANSACTION;
    END IF;
    -- Owners' locks for the quota, in slot order.
    WHILE v_i < JSON_LENGTH(p_slots) DO
        SET v_slot = JSON_EXTRACT(p_slots, CONCAT('$[', v_i, ']'));
        SELECT slot INTO v_slot FROM {LOCK_TABLE} WHERE slot = v_slot FOR UPDATE;
        SET v_i = v_i + 1;
    END WHILE;
    IF p_fast THEN
        -- Every row's fate, in input order: "code,code,..." and the duplicates' ids.
        SELECT GROUP_CONCAT(c.code ORDER BY c.ord SEPARATOR ','),
               GROUP_CONCAT(IFNULL(c.old, '') ORDER BY c.ord SEPARATOR ',')
        INTO v_codes, v_olds
        FROM (
            SELECT f.ord, f.old,
                   CASE WHEN f.old IS NOT NULL THEN {DUPLICATE}
                        WHEN f.onl THEN {ONLINE}
                        WHEN p_max > 0 AND f.have + ROW_NUMBER() OVER (
                                 PARTITION BY f.u, f.d, f.old IS NULL AND NOT f.onl
                                 ORDER BY f.ord) > p_max THEN {OVER_QUOTA}
                        ELSE {STORED} END AS code
            FROM (
                SELECT j.ord, j.u, j.d,
                       (SELECT x.{s.mid} FROM {t} x WHERE x.dedupe_key = j.k) AS old,
                       {online} AS onl,
                       CASE WHEN p_max > 0 THEN {owner_count} ELSE 0 END AS have
                FROM {_json_rows(False)}
            ) AS f
        ) AS c;
        BEGIN
            DECLARE CONTINUE HANDLER FOR 1062 SET v_conflict = 1;
            INSERT INTO {t} ({columns})
            SELECT j.u, j.d, j.sa, j.da, FROM_BASE64(j.b), j.ct, j.inc, j.exp, j.snd, j.k,
                   j.cid
            FROM {_json_rows(True)}
            WHERE SUBSTRING_INDEX(SUBSTRING_INDEX(v_codes, ',', j.ord), ',', -1)
                  = '{STORED}'
            ORDER BY j.ord;
        END;
        IF NOT v_conflict THEN
            SET v_n = ROW_COUNT();
            IF v_n > 0 THEN
                SET v_first = LAST_INSERT_ID();
            END IF;
        END IF;
    END IF;
    IF NOT p_fast OR v_conflict THEN
        SET v_done = 0;
        OPEN v_rows;
        each_row: LOOP
            FETCH v_rows INTO v_u, v_d, v_sa, v_da, v_b, v_ct, v_inc, v_exp, v_snd, v_k,
                              v_chk, v_cid;
            IF v_done THEN
                LEAVE each_row;
            END IF;
            SET v_mid = NULL;
            IF v_k IS NOT NULL THEN
                SET v_mid = (SELECT {s.mid} FROM {t} WHERE dedupe_key = v_k);
            END IF;
            IF v_mid IS NOT NULL THEN
                SET v_o = {DUPLICATE};
            ELSEIF v_chk = 1 AND EXISTS (
                    SELECT 1 FROM location l
                    WHERE l.username = v_u AND l.domain = v_d AND l.expires > p_now
                      AND (l.methods IS NULL OR FIND_IN_SET('MESSAGE', l.methods) > 0)) THEN
                SET v_o = {ONLINE};
            ELSEIF p_max > 0 AND (SELECT count(*) FROM (SELECT 1 FROM {t} x
                                      WHERE x.{s.username} = v_u AND x.{s.domain} = v_d
                                      LIMIT p_max) AS capped) >= p_max THEN
                SET v_o = {OVER_QUOTA};
            ELSE
                BEGIN
                    DECLARE CONTINUE HANDLER FOR 1062 SET v_dup = 1;
                    SET v_dup = 0;
                    INSERT INTO {t} ({columns})
                    VALUES (v_u, v_d, v_sa, v_da, FROM_BASE64(v_b), v_ct, v_inc, v_exp, v_snd,
                            v_k, v_cid);
                    IF v_dup = 1 THEN
                        SET v_o = {DUPLICATE};
                        SET v_mid = (SELECT {s.mid} FROM {t} WHERE dedupe_key = v_k);
                    ELSE
                        SET v_o = {STORED};
                        SET v_mid = LAST_INSERT_ID();
                    END IF;
                END;
            END IF;
            SET v_out = CONCAT(v_out, v_o, ':', IFNULL(v_mid, ''), ',');
        END LOOP;
        CLOSE v_rows;
    END IF;
    IF p_txn THEN
        COMMIT;
    END IF;
    SELECT v_out, v_codes, v_olds, v_first, v_n, @@auto_increment_increment;
END"""


STORE_PROCEDURE_PARAMS = (
    "IN p_rows LONGTEXT, IN p_slots LONGTEXT, IN p_max BIGINT, IN p_now BIGINT, IN p_txn INT, "
    "IN p_fast INT"
)


def store_procedure_ddl(name: str, body: str) -> str:
    """CREATE PROCEDURE around ``store_procedure_body``."""
    return (
        f"CREATE PROCEDURE {quote_ident(name)}({STORE_PROCEDURE_PARAMS}) MODIFIES SQL DATA {body}"
    )


def parse_outcomes(row: Sequence[object], n: int) -> tuple[list[int], list[int | None]]:
    """The store procedure's result row as (outcomes, mids), one each per input row.

    The slow path reports ``outcome:mid,`` per row; the fast path the codes, the duplicates'
    ids, the first id it inserted, how many, and ``auto_increment_increment`` (the stored
    rows' ids follow the first one by that step, in input order).
    """
    out, codes, olds, first, count, step = row
    outcomes: list[int] = []
    mids: list[int | None] = []
    if out:
        for item in str(out).split(",")[:-1]:
            code, _, mid = item.partition(":")
            outcomes.append(int(code))
            mids.append(int(mid) if mid else None)
    else:
        outcomes = [int(c) for c in str(codes or "").split(",") if c != ""]
        old = str(olds or "").split(",")
        next_id = None if first is None else int(str(first))
        stored = 0
        for i, fate in enumerate(outcomes):
            if fate == STORED:
                if next_id is None:
                    raise ValueError("the store procedure stored rows without an id")
                mids.append(next_id)
                next_id += int(str(step or 1))
                stored += 1
            else:
                mids.append(int(old[i]) if i < len(old) and old[i] else None)
        if stored != int(str(count or 0)):
            raise ValueError(f"the store procedure inserted {count} rows, expected {stored}")
    if len(outcomes) != n:
        raise ValueError(f"the store procedure returned {len(outcomes)} results for {n} rows")
    return outcomes, mids


def server_version_problem(version: str) -> str | None:
    """Why msilo cannot use a server that reports ``version`` (``SELECT VERSION()``), or None.

    ``SELECT ... FOR UPDATE SKIP LOCKED`` (the delivery leases) needs MySQL 8.0.1 or MariaDB
    10.6, and ``JSON_TABLE`` (the store procedure) MySQL 8.0.4 or MariaDB 10.6.
    """
    text = version.removeprefix("5.5.5-")  # an old MariaDB handshake prefix
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if m is None:
        return f"cannot tell the server's version from {version!r}"
    found = tuple(int(x) for x in m.groups())
    mariadb = "mariadb" in text.lower()
    need = (10, 6, 0) if mariadb else (8, 0, 4)
    if found >= need:
        return None
    name = "MariaDB" if mariadb else "MySQL"
    return (
        f"{name} {'.'.join(map(str, found))} is too old: msilo needs MySQL 8.0.4 or newer, or "
        f"MariaDB 10.6 or newer (SELECT ... FOR UPDATE SKIP LOCKED and JSON_TABLE)"
    )


def mids_args(mids: Sequence[int]) -> tuple[int, ...]:
    """``mids`` as ints (an ``IN`` list's arguments)."""
    return tuple(int(m) for m in mids)
