"""Database faults under load, against a private PostgreSQL that the tests stop and start.

Every test counts each 202 against the rows in the database: a MESSAGE answered 202
must be in the table exactly once (nothing acknowledged lost, nothing stored twice).
A 503 may or may not have left a row (the commit can succeed after the connection
is lost); the dedupe key makes the sender's retry harmless, so that is allowed.

Load comes from sipp (tools/sipp/store_uac.xml) with ``-trace_msg``: the message log
tells which Call-ID was answered what, and when.  Every sipp body is unique
("Offline message <call number> ..."), which is how rows are matched to calls.
After the load, every request refused with 503 is sent again as its sender would, and
then every request must be in the table exactly once.

The last test races two devices of one user registering at once (two dumps of one
mailbox): the delivery leases must hand each stored message to exactly one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests.faults.conftest import WorkerFactory
from tests.pgcluster import PgCluster
from tests.service.conftest import Running
from tests.service.sipua import UserAgent, free_port

ROOT = Path(__file__).resolve().parents[2]
SIPP_DIR = ROOT / "tools" / "sipp"

pytestmark = [
    pytest.mark.pg,
    pytest.mark.sipp,
    # The whole module (cluster set-up included) is meant to take well under a minute.
    pytest.mark.timeout(90),
]
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")

# Calls per second and duration of each sipp run: modest, and long enough that there
# is load before, during and well after each fault.
RATE = 50
SIPP_SECONDS = 10
# How long after the fault ended the worker has to be back to 202s by itself.
RECOVERY = 1.0


# -- sipp ----------------------------------------------------------------------------


@dataclass
class Call:
    """One sipp call (one MESSAGE and its retransmissions) as the message log shows it."""

    call_id: str
    body: str = ""
    request_uri: str = ""
    from_uri: str = ""
    from_tag: str = ""
    cseq: int = 0
    sent_at: float = 0.0  # first transmission, epoch seconds
    finals: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Retry-After)

    @property
    def status(self) -> int | None:
        return self.finals[0][0] if self.finals else None


_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d[ \t]\d\d:\d\d:\d\d\.\d+)$", re.M)


def _header(text: str, name: str) -> str | None:
    match = re.search(rf"^{name}\s*:\s*(.*?)\s*$", text, re.M | re.I)
    return match.group(1) if match else None


def parse_message_log(path: Path) -> dict[str, Call]:
    """Calls by Call-ID from a sipp ``-trace_msg`` log."""
    calls: dict[str, Call] = {}
    text = path.read_text(errors="replace")
    parts = _SEPARATOR.split(text)
    # parts: [prefix, stamp1, entry1, stamp2, entry2, ...]
    for stamp, entry in zip(parts[1::2], parts[2::2], strict=True):
        when = dt.datetime.strptime(stamp.replace("\t", " "), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        head, _, payload = entry.strip("\n").partition("\n\n")
        call_id = _header(payload, "Call-ID")
        if call_id is None:
            continue
        call = calls.setdefault(call_id, Call(call_id))
        if "message sent" in head:
            if payload.startswith("MESSAGE ") and not call.body:
                call.sent_at = when
                call.body = re.split(r"\r?\n\r?\n", payload, maxsplit=1)[-1].strip()
                call.request_uri = payload.split()[1]
                from_ = re.match(r"<([^>]+)>;tag=(\S+)", _header(payload, "From") or "")
                if from_:
                    call.from_uri, call.from_tag = from_.groups()
                call.cseq = int((_header(payload, "CSeq") or "0").split()[0])
        elif "message received" in head:
            status = re.match(r"SIP/2\.0 (\d{3}) ", payload)
            if status and int(status.group(1)) >= 200:
                call.finals.append((int(status.group(1)), _header(payload, "Retry-After")))
    return calls


@contextlib.asynccontextmanager
async def _spawn(*argv: str, cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a tool; whatever happens in the block, it is not left running."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _users_csv(directory: Path, count: int) -> Path:
    """An injection CSV written by tools/sipp/make_users.py (user1..userN)."""
    async with _spawn(
        sys.executable, str(SIPP_DIR / "make_users.py"), str(count), cwd=directory
    ) as process:
        output, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, output
    path = directory / "users.csv"
    path.write_bytes(output)
    return path


async def sipp_store_load(
    srv: Running, tmp_path: Path, during: Callable[[], Awaitable[None]]
) -> dict[str, Call]:
    """Run store_uac.xml at RATE for SIPP_SECONDS while ``during()`` injects the fault;
    return every call sipp made, as its message log tells it."""
    csv = await _users_csv(tmp_path, 10)
    log = tmp_path / "messages.log"
    argv = [
        "sipp", f"127.0.0.1:{srv.port}", "-sf", str(SIPP_DIR / "store_uac.xml"),
        "-inf", str(csv), "-i", "127.0.0.1", "-p", str(free_port()),
        "-m", str(RATE * SIPP_SECONDS), "-r", str(RATE), "-rp", "1000",
        # A failed MESSAGE is no dialog: no BYE.  -timeout bounds a stuck run.
        "-default_behaviors", "all,-bye", "-nostdin", "-timeout", "40",
        "-trace_msg", "-message_file", str(log),
    ]  # fmt: skip
    async with _spawn(*argv, cwd=tmp_path) as process:
        await during()
        output, _ = await asyncio.wait_for(process.communicate(), SIPP_SECONDS + 30)
    # sipp exits non-zero when any call failed (503 during the fault): expected here.
    assert process.returncode in (0, 1), output.decode(errors="replace")
    return parse_message_log(log)


# -- checks --------------------------------------------------------------------------


async def table_bodies(dsn: str) -> Counter[str]:
    """How often each body is in the silo table."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT body FROM silo")
    finally:
        await conn.close()
    return Counter(bytes(r["body"]).decode().strip() for r in rows)


@dataclass
class Tally:
    """Counts for the report, and the checks every fault test shares."""

    sent: int
    accepted: int
    unavailable: int
    rows: int
    stored_unacknowledged: int

    def line(self, name: str, srv: Running) -> str:
        stats = srv.stats()
        return (
            f"{name}: sent={self.sent} 202={self.accepted} 503={self.unavailable} "
            f"rows={self.rows} rows_without_202={self.stored_unacknowledged} "
            f"(worker: stored={stats.get('stored_messages', 0)} "
            f"duplicates={stats.get('duplicates', 0)} "
            f"store_failures={stats.get('store_failures', 0)})"
        )


async def check_calls_against_rows(calls: dict[str, Call], dsn: str) -> Tally:
    """Every call answered 202 or 503 (+ Retry-After), and every 202 stored exactly once."""
    assert calls, "sipp sent nothing"
    unanswered = [c.call_id for c in calls.values() if c.status is None]
    assert not unanswered, (
        f"{len(unanswered)} MESSAGEs never got a final response: {unanswered[:5]}"
    )
    statuses = Counter(c.status for c in calls.values())
    assert set(statuses) <= {202, 503}, f"unexpected final responses: {statuses}"
    inconsistent = [c for c in calls.values() if len({s for s, _ in c.finals}) > 1]
    assert not inconsistent, f"one request answered two ways: {inconsistent[:3]}"
    no_retry_after = [
        c.call_id
        for c in calls.values()
        if c.status == 503 and not (c.finals[0][1] or "").isdigit()
    ]
    assert not no_retry_after, f"503 without a Retry-After: {no_retry_after[:5]}"

    bodies = await table_bodies(dsn)
    twice = {body: n for body, n in bodies.items() if n > 1}
    assert not twice, f"stored more than once: {list(twice.items())[:3]}"
    accepted = [c for c in calls.values() if c.status == 202]
    lost = [c.call_id for c in accepted if bodies[c.body] != 1]
    assert not lost, f"{len(lost)} MESSAGEs answered 202 are not in the table: {lost[:5]}"
    sent_bodies = {c.body for c in calls.values()}
    strangers = [b for b in bodies if b not in sent_bodies]
    assert not strangers, f"rows nobody sent: {strangers[:3]}"
    return Tally(
        sent=len(calls),
        accepted=len(accepted),
        unavailable=statuses[503],
        rows=sum(bodies.values()),
        stored_unacknowledged=sum(
            1 for c in calls.values() if c.status == 503 and c.body in bodies
        ),
    )


async def resend_refused(srv: Running, calls: dict[str, Call]) -> Counter[int]:
    """Do what a real sender does after a 503, once the server is back: send the same
    request again (same Call-ID, CSeq and From tag: a new transaction).  Its final
    statuses."""
    ua = await srv.agent("sipp-retry")
    limit = asyncio.Semaphore(20)

    async def resend(call: Call) -> int:
        async with limit:
            answer = await ua.request(
                "MESSAGE", call.request_uri, body=call.body.encode(), call_id=call.call_id,
                cseq=call.cseq, from_uri=call.from_uri, from_tag=call.from_tag, timeout=10,
            )  # fmt: skip
            return answer.status

    refused = [c for c in calls.values() if c.status == 503]
    return Counter(await asyncio.gather(*(resend(c) for c in refused)))


async def check_everything_stored_once(
    srv: Running, calls: dict[str, Call], dsn: str
) -> Counter[int]:
    """After the refused requests were sent again, every request is in the table exactly
    once: also those whose row was committed although the answer was 503 (the retry must
    be recognised as a duplicate, not stored again)."""
    retried = await resend_refused(srv, calls)
    assert set(retried) <= {202}, f"a retry after the fault was not accepted: {retried}"
    bodies = await table_bodies(dsn)
    assert bodies == Counter({c.body: 1 for c in calls.values()}), {
        "missing": [c.call_id for c in calls.values() if c.body not in bodies][:5],
        "twice": [b for b, n in bodies.items() if n > 1][:5],
    }
    return retried


def msilo_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("msilo") and f"event={event}" in r.getMessage().split()
    ]


def noisy_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Lines at WARNING or above, from msilo or its libraries (asyncpg's pool retries
    with back-off), other than the two health transitions and the leader's own state
    changes: an outage must not produce them per request."""
    return [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.name != "msilo.leader"
        and not any(e in r.getMessage() for e in ("event=db_down", "event=db_up"))
    ]


def per_phone(phone: UserAgent) -> list[str]:
    """The bodies one phone got, one per transaction (retransmissions folded)."""
    seen = {
        (r.request.via.branch if r.request.via else id(r)): r.request.body.decode()
        for r in phone.received
        if r.request.method == "MESSAGE"
    }
    return list(seen.values())


def deliveries(phones: list[UserAgent]) -> Counter[str]:
    """How often each body reached any of the phones.  A retransmission (same branch) is
    not a second delivery; a new transaction is."""
    seen = {
        (p.port, r.request.via.branch if r.request.via else id(r)): r.request.body.decode()
        for p in phones
        for r in p.received
        if r.request.method == "MESSAGE"
    }
    return Counter(seen.values())


# -- tests ---------------------------------------------------------------------------


@needs_sipp
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_stopped_and_restarted_under_sipp_load(
    mode: str,
    fault_worker: WorkerFactory,
    fault_db: str,
    pg_cluster: PgCluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="msilo")
    srv = await fault_worker("server.mode=silo")
    marks: dict[str, float] = {}

    async def outage() -> None:
        await asyncio.sleep(3.0)
        await pg_cluster.stop(mode)
        marks["down"] = time.time()
        await asyncio.sleep(2.0)
        marks["starting"] = time.time()
        await pg_cluster.start()
        marks["up"] = time.time()

    calls = await sipp_store_load(srv, tmp_path, outage)
    tally = await check_calls_against_rows(calls, fault_db)
    print(tally.line(f"stop -m {mode}", srv))
    retried = await check_everything_stored_once(srv, calls, fault_db)
    print(f"  503s sent again: {dict(retried)}; now {len(calls)} rows, each once")

    # While the server was certainly down every MESSAGE was refused with 503 at once.
    in_outage = [c for c in calls.values() if marks["down"] <= c.sent_at <= marks["starting"]]
    assert len(in_outage) >= RATE, f"only {len(in_outage)} MESSAGEs during the outage"
    assert {c.status for c in in_outage} == {503}, Counter(c.status for c in in_outage)
    # Back to 202 by itself, without restarting the worker.
    after = [c for c in calls.values() if c.sent_at >= marks["up"] + RECOVERY]
    assert len(after) >= RATE, f"only {len(after)} MESSAGEs after the recovery"
    assert {c.status for c in after} == {202}, Counter(c.status for c in after)

    # One line when it went down, one when it came back: not one per refused request.
    down, up = msilo_lines(caplog, "db_down"), msilo_lines(caplog, "db_up")
    assert (len(down), len(up)) == (1, 1), [r.getMessage() for r in down + up]
    assert down[0].created < up[0].created
    noise = noisy_lines(caplog)
    assert len(noise) <= 6, f"{len(noise)} warning lines for {tally.unavailable} 503s: {noise[:6]}"


@needs_sipp
async def test_backends_terminated_under_sipp_load(
    fault_worker: WorkerFactory,
    fault_db: str,
    pg_cluster: PgCluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="msilo")
    srv = await fault_worker("server.mode=silo")
    database = fault_db.rsplit("/", 1)[1]
    terminated: list[int] = []
    marks: dict[str, float] = {}

    async def terminate_backends() -> None:
        admin = await asyncpg.connect(pg_cluster.dsn(), timeout=10)
        try:
            # Every 0.7 s from 2 s to 5.5 s: some terminations hit a flush in flight.
            for _ in range(6):
                await asyncio.sleep(0.7 if terminated else 2.0)
                killed = await admin.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database,
                )
                terminated.append(int(killed))
            marks["last"] = time.time()
        finally:
            await admin.close()

    calls = await sipp_store_load(srv, tmp_path, terminate_backends)
    tally = await check_calls_against_rows(calls, fault_db)
    print(tally.line(f"pg_terminate_backend x{len(terminated)} (backends {terminated})", srv))
    retried = await check_everything_stored_once(srv, calls, fault_db)
    print(f"  503s sent again: {dict(retried)}; now {len(calls)} rows, each once")
    assert all(n >= 1 for n in terminated), f"nothing to terminate: {terminated}"

    after = [c for c in calls.values() if c.sent_at >= marks["last"] + RECOVERY]
    assert len(after) >= RATE, f"only {len(after)} MESSAGEs after the last termination"
    assert {c.status for c in after} == {202}, Counter(c.status for c in after)
    # At most one down/up pair per termination, and it ends up.
    down, up = msilo_lines(caplog, "db_down"), msilo_lines(caplog, "db_up")
    assert len(down) == len(up) <= len(terminated), [r.getMessage() for r in down + up]
    noise = noisy_lines(caplog)
    assert len(noise) <= 6, f"{len(noise)} warning lines for {tally.unavailable} 503s: {noise[:6]}"


@pytest.mark.parametrize("deliver_to", ["first", "all"])
async def test_two_devices_registering_at_once_get_each_message_once(
    fault_worker: WorkerFactory, fault_db: str, deliver_to: str
) -> None:
    # Registrar mode: REGISTER saves the binding and dumps to the contact it registers.
    # The user has no remembered device, so the first device to register takes each
    # message; two registering at once race for it.  "first" (OpenSIPS): each message
    # reaches one phone, once.  "all": a phone that registered while a message lived is
    # due it too, so a message reaches one or both -- never one phone twice, none lost.
    srv = await fault_worker("msilo.add_date=false", f"msilo.deliver_to={deliver_to}")
    sender = await srv.agent("sender")
    delivered = 0
    for round_ in range(5):
        user = f"dev{round_}"
        texts = [f"{user} note {i} {uuid.uuid4().hex}" for i in range(20)]
        answers = await asyncio.gather(
            *(sender.message(f"sip:{user}@127.0.0.1", t, timeout=10) for t in texts)
        )
        assert [a.status for a in answers] == [202] * 20
        assert await srv.store.count(user, "127.0.0.1") == 20

        phones = [await srv.agent(user), await srv.agent(user)]
        registered = await asyncio.gather(*(p.register() for p in phones))
        assert [r.status for r in registered] == [200, 200]

        deadline = time.monotonic() + 10
        while sum(deliveries(phones).values()) < 20 or await srv.store.count(user, "127.0.0.1"):
            assert time.monotonic() < deadline, (deliveries(phones), srv.stats())
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a late duplicate would arrive by now (T1 = 50 ms)

        got = deliveries(phones)
        assert sorted(got) == sorted(texts), got
        for phone in phones:
            mine = per_phone(phone)
            assert len(mine) == len(set(mine)), f"a phone got a message twice: {mine}"
        if deliver_to == "first":
            assert set(got.values()) == {1}, {t: n for t, n in got.items() if n > 1}
        assert await srv.store.count(user, "127.0.0.1") == 0
        delivered += sum(got.values())
        assert srv.stats()["dumped_messages"] == delivered
        split = [sum(1 for r in p.received if r.request.method == "MESSAGE") for p in phones]
        print(f"two devices, round {round_}: delivered {sum(got.values())} of 20 as {split}")
