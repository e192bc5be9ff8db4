"""Per-device delivery: the devices a user reads messages on, and who has which message.

Two tables beside the silo table (so an OpenSIPS ``silo`` table stays drop-in):

* ``msilo_device`` -- one row per device of a user (its ``+sip.instance``, else its
  normalised Contact URI) with the time of its last REGISTER.  A device is remembered for
  ``msilo.device_memory`` seconds after that; an explicit de-registration forgets it.
* the delivery ledger (``msilo_<silo table>_delivery``) -- one row per (message, device):
  a live lease while a delivery to that device is in flight, or ``delivered = 1`` once the
  device answered 2xx.

Who must get a message is derived, not stored: every device remembered when the message
arrived, plus every device that registers while it lives -- i.e. every remembered device
whose last REGISTER is at most ``device_memory`` seconds before the message's arrival.
So storing a message writes nothing here (the store path stays as fast as before); a
delivery writes one ledger row, and the message is deleted by the delivery that leaves
no due device without it.  A user with no remembered device is the old behaviour: the
first device that registers becomes the only due one and takes the message.

Storage knows nothing of SIP: device keys are plain strings chosen by the routing layer.
"""

from __future__ import annotations

from msilo.storage.base import SiloNames, quote_ident

DEVICE_TABLE = "msilo_device"

#: A refresh REGISTER rewrites a device's ``last_register`` only when it is older than
#: this: remembering a device for 30 days does not need a write per refresh, and one
#: hour of slack shortens the memory by at most that.
TOUCH_GRANULARITY = 3600


def ledger_table(names: SiloNames) -> str:
    """The ledger's table name for the silo table ``names.table``."""
    return names.object_name("delivery", prefix="msilo_")


def device_ddl() -> list[str]:
    """CREATE statements of the device table (the same text on both dialects)."""
    return [
        f"""CREATE TABLE IF NOT EXISTS {DEVICE_TABLE} (
    username VARCHAR(64) NOT NULL,
    domain VARCHAR(64) NOT NULL,
    device TEXT NOT NULL,
    last_register BIGINT NOT NULL,
    PRIMARY KEY (username, domain, device)
)""",
        # The leader forgets devices by age.
        f"CREATE INDEX IF NOT EXISTS {DEVICE_TABLE}_last_idx ON {DEVICE_TABLE} (last_register)",
    ]


def ledger_ddl(names: SiloNames) -> list[str]:
    """CREATE statements of the ledger table (the same text on both dialects)."""
    table = quote_ident(ledger_table(names))
    return [
        f"""CREATE TABLE IF NOT EXISTS {table} (
    mid BIGINT NOT NULL,
    device TEXT NOT NULL,
    delivered SMALLINT NOT NULL DEFAULT 0,
    lease_until BIGINT DEFAULT NULL,
    lease_owner TEXT DEFAULT NULL,
    PRIMARY KEY (mid, device)
)"""
    ]


class LedgerSql:
    """Statements both dialects share (``{n}`` placeholders, see ``_sql.to_pg``)."""

    def __init__(self, names: SiloNames) -> None:
        q = quote_ident
        t = q(names.table)
        mid, user, domain = q(names.mid), q(names.username), q(names.domain)
        inc = q(names.inc_time)
        self.table = t
        self.ledger = q(ledger_table(names))
        led = self.ledger
        # A due device of message m still without it: remembered when m arrived (or
        # registered since), and no delivered ledger row.
        self.undelivered_due = (
            f"SELECT 1 FROM {DEVICE_TABLE} d WHERE d.username = m.{user} "
            f"AND d.domain = m.{domain} AND d.last_register >= m.{inc} - {{memory}} "
            f"AND NOT EXISTS (SELECT 1 FROM {led} l WHERE l.mid = m.{mid} "
            f"AND l.device = d.device AND l.delivered <> 0)"
        )
        self.remembered = (
            f"SELECT device FROM {DEVICE_TABLE} WHERE username = {{0}} AND domain = {{1}} "
            f"AND last_register >= {{2}} ORDER BY device"
        )
        self.forget_all = f"DELETE FROM {DEVICE_TABLE} WHERE username = {{0}} AND domain = {{1}}"
        self.forget_old = f"DELETE FROM {DEVICE_TABLE} WHERE last_register < {{0}}"
        self.orphans = (
            f"DELETE FROM {led} WHERE NOT EXISTS (SELECT 1 FROM {t} m WHERE m.{mid} = {led}.mid)"
        )
        # After devices were forgotten: messages delivered somewhere whose remaining due
        # devices are all gone are complete.
        self.complete_of_owner = (
            f"SELECT m.{mid} FROM {t} m WHERE m.{user} = {{0}} AND m.{domain} = {{1}} "
            f"AND EXISTS (SELECT 1 FROM {led} l WHERE l.mid = m.{mid} AND l.delivered <> 0) "
            f"AND NOT EXISTS ({self.undelivered_due.format(memory='{2}')})"
        )

    def undelivered(self, memory: str) -> str:
        """``undelivered_due`` with the memory given as SQL text (a placeholder)."""
        return self.undelivered_due.format(memory=memory)


__all__ = [
    "DEVICE_TABLE",
    "TOUCH_GRANULARITY",
    "LedgerSql",
    "device_ddl",
    "ledger_ddl",
    "ledger_table",
]
