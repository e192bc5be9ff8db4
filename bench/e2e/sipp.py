"""Running sipp and reading what it leaves behind.

Three sipp outputs are used:
- ``-trace_stat`` CSV: the cumulative counters (SuccessfulCall, FailedCall, Retransmissions)
  of the last line decide pass or fail;
- ``-trace_shortmsg``: one line per message sent or received with a microsecond timestamp,
  from which latencies are computed (the ``-trace_rtt`` CSV has 1 ms resolution only, too
  coarse for a 2 ms p50; it is read too and kept as a cross-check);
- ``-trace_msg`` (dump UAS only): whole messages, to tell which stored row each delivered
  MESSAGE carried, so duplicates and losses are seen.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SIPP_TOOLS = Path(__file__).resolve().parents[2] / "tools" / "sipp"


BENCH_SCENARIOS = Path(__file__).resolve().parent


def scenario(name: str) -> Path:
    """Path of a scenario in tools/sipp/ (the same files the tests use), else bench/e2e/."""
    path = SIPP_TOOLS / name
    if not path.is_file():
        path = BENCH_SCENARIOS / name
    if not path.is_file():
        raise FileNotFoundError(f"sipp scenario {path} is missing")
    return path


def users_csv(
    path: Path,
    count: int,
    contact: tuple[str, int] | None = None,
    cseq: int | None = None,
    *,
    first: int = 1,
) -> Path:
    """An injection CSV of users first..first+count-1 (make_users.py's format), optionally
    with a contact and a CSeq number (register_uac.xml's field3)."""
    extra = f"{contact[0]};{contact[1]};" if contact else ""
    if cseq is not None:
        extra += f"{cseq};"
    lines = ["SEQUENTIAL", *(f"user{i};{extra}" for i in range(first, first + count))]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- statistics -----------------------------------------------------------------------------


def read_stat(path: Path) -> dict[str, str]:
    """The last line of a ``-trace_stat`` CSV as {column: value}; {} if sipp wrote none."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def stat_int(stat: dict[str, str], column: str) -> int:
    """A cumulative counter, 0 when absent."""
    value = stat.get(column, "").strip()
    return int(value) if value.isdigit() else 0


# --- latencies ------------------------------------------------------------------------------


PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(values_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9, mean and max in milliseconds, plus the sample count."""
    values = sorted(values_ms)
    out = {f"p{p:g}": percentile(values, p) for p in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else math.nan
    out["max"] = values[-1] if values else math.nan
    out["count"] = float(len(values))
    return out


@dataclass
class Transaction:
    """One client transaction as seen in the short trace: first send and first final answer."""

    call_id: str
    sent: float
    answered: float | None = None
    status: int | None = None
    sends: int = 1  # > 1: sipp retransmitted the request


def read_shortmsg(path: Path, *, by_cseq: bool = False) -> dict[str, Transaction]:
    """Client transactions by Call-ID from a ``-trace_shortmsg`` file (UAC side).

    ``by_cseq``: keyed by "Call-ID CSeq" instead, for refreshes that reuse one Call-ID
    (each line's fifth column is the message's CSeq).
    """
    calls: dict[str, Transaction] = {}
    if not path.exists():
        return calls
    with path.open(errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 7:
                continue
            ts, direction, call_id, first_line = float(parts[2]), parts[3], parts[4], parts[6]
            key = f"{call_id} {parts[5]}" if by_cseq else call_id
            call = calls.get(key)
            if direction == "S":
                if call is None:
                    calls[key] = Transaction(call_id, ts)
                else:
                    call.sends += 1
            elif direction == "R" and call is not None and call.answered is None:
                code = _status(first_line)
                if code is not None and code >= 200:
                    call.answered, call.status = ts, code
    return calls


def _status(first_line: str) -> int | None:
    if not first_line.startswith("SIP/2.0 "):
        return None
    code = first_line[8:11]
    return int(code) if code.isdigit() else None


def read_rtt(path_glob: Iterator[Path]) -> list[tuple[float, float]]:
    """(ms since sipp's start, response time ms) from ``-trace_rtt`` CSVs."""
    out = []
    for path in path_glob:
        with path.open() as f:
            for line in f:
                parts = line.strip().split(";")
                if len(parts) >= 2 and parts[0][:1].isdigit():
                    out.append((float(parts[0]), float(parts[1])))
    return out


# --- received messages (dump UAS) ----------------------------------------------------------


@dataclass
class Deliveries:
    """What the UAS received, reduced to transactions and preloaded keys."""

    received: int = 0  # MESSAGE datagrams, retransmissions included
    transactions: int = 0  # distinct (Call-ID, CSeq)
    first_arrival: dict[str, float] = field(default_factory=dict)  # key -> time
    by_key: dict[str, int] = field(default_factory=dict)  # key -> distinct transactions
    unkeyed: int = 0  # MESSAGEs without a key (e.g. not one of the preloaded rows)

    @property
    def retransmissions(self) -> int:
        """MESSAGEs the server sent again because our 200 came late or was lost."""
        return self.received - self.transactions

    @property
    def duplicates(self) -> int:
        """Extra deliveries of a row already delivered in another transaction."""
        return sum(n - 1 for n in self.by_key.values() if n > 1)


_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$")


def read_trace_msg(path: Path, key_pattern: re.Pattern[str]) -> Deliveries:
    """Parse a ``-trace_msg`` file of message_uas.xml into ``Deliveries``."""
    import datetime as _dt

    out = Deliveries()
    seen: set[tuple[str, str]] = set()
    if not path.exists():
        return out
    for stamp, text in _trace_blocks(path):
        if "message received" not in text[:80] or "\nMESSAGE " not in text[:200]:
            continue
        # The key is only ever in the body, so the whole block can be searched.
        call_id = _header(text, "Call-ID") or _header(text, "i") or ""
        cseq = _header(text, "CSeq") or ""
        out.received += 1
        if (call_id, cseq) in seen:
            continue
        seen.add((call_id, cseq))
        out.transactions += 1
        match = key_pattern.search(text)
        if match is None:
            out.unkeyed += 1
            continue
        key = match.group(0)
        at = _dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        out.by_key[key] = out.by_key.get(key, 0) + 1
        out.first_arrival.setdefault(key, at)
    return out


def _trace_blocks(path: Path) -> Iterator[tuple[str, str]]:
    stamp: str | None = None
    lines: list[str] = []
    with path.open(errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            m = _SEPARATOR.match(line)
            if m:
                if stamp is not None:
                    yield stamp, "\n".join(lines)
                stamp, lines = m.group(1), []
            else:
                lines.append(line)
    if stamp is not None:
        yield stamp, "\n".join(lines)


def _header(headers: str, name: str) -> str | None:
    prefix = name.lower() + ":"
    for line in headers.split("\n"):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip()
    return None
