"""The ``msilo`` command: serve, check-config, db init|upgrade, messages list|count|purge,
subscriber add|passwd|remove, migrate-config.

Every failure a user can cause (bad config, unreachable database, bad argument)
ends with one ``msilo: error: …`` line on stderr and a non-zero exit, never a
traceback.  Exit codes: 0 ok, 1 runtime error (database), 2 usage/config error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from msilo import __version__
from msilo.config import Config, describe, load_config, secret_header
from msilo.errors import ConfigError, MsiloError, StorageError
from msilo.log import REDACTED, redact_text, redact_url

if TYPE_CHECKING:
    from msilo.storage.base import Store, StoredMessage

T = TypeVar("T")

EXIT_RUNTIME = 1
EXIT_USAGE = 2
# Output into a closed pipe (``msilo messages list | head``): quiet, with the status a
# command killed by SIGPIPE has (128 + 13), as coreutils report it.
EXIT_BROKEN_PIPE = 141
LIST_LIMIT = 100


def _version_line() -> str:
    from msilo.sip.parser import IMPLEMENTATION

    return f"msilo {__version__} (parser: {IMPLEMENTATION})"


def _config_args(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # -c/--set are accepted before and after the subcommand; SUPPRESS keeps a
    # subcommand's absent option from overwriting the one given before it.
    default_c: Any = None if top else argparse.SUPPRESS
    default_set: Any = [] if top else argparse.SUPPRESS
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=default_c,
        help="TOML configuration file (default: none, built-in defaults)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=default_set,
        metavar="SECTION.KEY=VALUE",
        help="override one setting; VALUE is a TOML literal (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``msilo`` command."""
    parser = argparse.ArgumentParser(
        prog="msilo", description="SIP offline-message server (store and forward SIP MESSAGE)."
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the version and the active parser (C or Python)",
    )
    _config_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _config_args(p, top=False)
        return p

    add("serve", "run the server")
    add("check-config", "validate the configuration and print the effective settings")

    db = add("db", "create or upgrade the database schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, text in (
        ("init", "create the tables if missing"),
        ("upgrade", "upgrade an existing (OpenSIPS or Kamailio) silo table in place"),
    ):
        _config_args(db_sub.add_parser(name, help=text, description=text), top=False)

    migrate = sub.add_parser(
        "migrate-config",
        help="print a msilo.toml converted from an opensips.cfg or kamailio.cfg",
        description="Read an OpenSIPS or Kamailio configuration script and print the"
        " equivalent msilo.toml on stdout: msilo, registrar and tm parameters, listen lines;"
        " what has no equivalent is a comment saying why.",
    )
    migrate.add_argument("file", metavar="FILE", help="the opensips.cfg or kamailio.cfg")
    migrate.add_argument(
        "--from",
        dest="dialect",
        choices=("auto", "opensips", "kamailio"),
        default="auto",
        help="the script's server (default: auto, from its syntax); decides tm fr_timer's"
        " unit (Kamailio: milliseconds, OpenSIPS: seconds)",
    )

    subs = add("subscriber", "manage digest credentials (the subscriber table)")
    subs_sub = subs.add_subparsers(dest="subscriber_command", metavar="ACTION", required=True)
    for name, text in (
        ("add", "add a user; the password is read from a prompt, or from stdin"),
        ("passwd", "change a user's password"),
        ("remove", "remove a user's credentials"),
    ):
        p = subs_sub.add_parser(name, help=text, description=text)
        _config_args(p, top=False)
        p.add_argument("aor", metavar="USER@DOMAIN", help="the user's address of record")
        if name != "remove":
            p.add_argument(
                "--plain-password",
                action="store_true",
                help="also keep the plain password (OpenSIPS-style); default: only HA1s",
            )

    msgs = add("messages", "inspect or purge a user's stored messages")
    msgs_sub = msgs.add_subparsers(dest="messages_command", metavar="ACTION", required=True)
    for name, text in (
        ("list", "list the stored messages of a user"),
        ("count", "print the number of stored messages of a user"),
        ("purge", "delete every stored message of a user"),
    ):
        p = msgs_sub.add_parser(name, help=text, description=text)
        _config_args(p, top=False)
        p.add_argument(
            "--aor", required=True, metavar="USER@DOMAIN", help="the user's address of record"
        )
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if name == "list":
            p.add_argument(
                "--limit",
                type=_non_negative,
                default=LIST_LIMIT,
                metavar="N",
                help=f"show at most N messages (default {LIST_LIMIT}; 0 = all)",
            )
            p.add_argument(
                "--offset",
                type=_non_negative,
                default=0,
                metavar="N",
                help="skip the first N messages (arrival order)",
            )
            p.add_argument(
                "--json", action="store_true", help="one JSON object per message and line"
            )
    return parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def split_aor(text: str) -> tuple[str, str]:
    """``user@domain`` (or ``sip:user@domain``) -> (user, domain), domain lower-cased."""
    value = text.strip()
    lowered = value.lower()
    for scheme in ("sip:", "sips:"):
        if lowered.startswith(scheme):
            value = value[len(scheme) :]
            break
    user, at, domain = value.rpartition("@")
    domain = domain.split(";", 1)[0]
    if not at or not user or not domain or any(c in value for c in " <>\t"):
        raise ConfigError(f"--aor {text!r}: must be user@domain")
    return user, domain.lower()


def open_configured_store(config: Config, *, serving: bool = False, **options: Any) -> Store:
    """The storage backend the configuration names (not yet opened).

    ``serving``: for a process of ``msilo serve``, whose PostgreSQL pool is opened whole
    and warmed at start (``PostgresStore(warm=True)``); a command gets a lazy pool.
    """
    from msilo.storage import open_store
    from msilo.storage.base import SiloNames

    m = config.msilo
    names = SiloNames(
        table=m.db_table,
        mid=m.sc_mid,
        src_addr=m.sc_from,
        dst_addr=m.sc_to,
        username=m.sc_uri_user,
        domain=m.sc_uri_host,
        body=m.sc_body,
        ctype=m.sc_ctype,
        exp_time=m.sc_exp_time,
        inc_time=m.sc_inc_time,
        snd_time=m.sc_snd_time,
    )
    postgres = m.db_url.startswith(("postgres://", "postgresql://"))
    serving_options: dict[str, Any] = {"warm": True} if serving and postgres else {}
    return open_store(m.db_url, names, **serving_options, **options)


def open_serving_store(config: Config) -> Store:
    """``open_configured_store`` for a serving process (picklable for spawned children)."""
    return open_configured_store(config, serving=True)


async def _with_store(
    config: Config, work: Callable[[Store], Awaitable[int]], **options: Any
) -> int:
    store = open_configured_store(config, **options)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def check_files(config: Config) -> list[str]:
    """Open everything the configuration names, as ``serve`` would; raise ConfigError on the
    first that fails.  Returns one note per thing checked, for ``check-config``."""
    notes: list[str] = []
    server = config.server
    if server.route:
        from msilo.routing.service import load_route

        load_route(server.route, config.route_search_path())
        notes.append(f"server.route: {server.route} imports")
    tls = config.tls
    if tls.certificate or tls.private_key:
        from msilo.transport.tls import server_context

        server_context(tls.certificate, tls.private_key, tls.ca or None)
        notes.append(f"tls: {tls.certificate} and {tls.private_key} load")
    if tls.ca:
        from msilo.transport.tls import client_context

        client_context(tls.ca)
        notes.append(f"tls.ca: {tls.ca} loads")
    if server.hep:
        from msilo.server.hep import HepSender

        sender = HepSender(server.hep, server.hep_id)  # resolves the capture server's name
        sender.close()
        notes.append(f"server.hep: HEP v3 copies go to {sender.address[0]}:{sender.address[1]}")
    path = sqlite_path(config.msilo.db_url)
    if path is not None:
        if os.path.exists(path):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(
                    f"msilo.db_url: cannot read {path} ({exc.strerror or exc})"
                ) from None
            notes.append(f"msilo.db_url: {path} exists")
        else:
            notes.append(f"msilo.db_url: {path} does not exist yet (msilo db init creates it)")
    return notes


def sqlite_path(db_url: str) -> str | None:
    """The absolute file of an ``sqlite:///`` URL (relative to the working directory)."""
    if not db_url.startswith("sqlite:///"):
        return None
    return os.path.abspath(db_url[len("sqlite:///") :])


def require_database_file(config: Config) -> None:
    """Commands other than ``db init`` and ``serve`` never create a database: a missing
    SQLite file is an error that names it (a typo in ``db_url`` must not look empty)."""
    path = sqlite_path(config.msilo.db_url)
    if path is not None and not os.path.exists(path):
        raise StorageError(
            f"{path} does not exist (create it with `msilo db init`, or point msilo.db_url at "
            "the server's database: use the same -c file as msilo serve)"
        )


def _cmd_check_config(config: Config) -> int:
    notes = check_files(config)
    print(f"configuration OK ({config.source or 'built-in defaults'})")
    for note in notes:
        print(f"# {note}")
    for section, key, _default, _doc in describe():
        table = config.table(section)
        if table is None:  # an optional table that is absent ([push.fcm] not configured)
            continue
        value = getattr(table, key)
        if section == "push.webhook" and key == "headers":
            value = [(n, REDACTED if secret_header(n) else v) for n, v in value]
        elif section == "push.webhook" and key == "url":
            value = redact_url(value)
        if isinstance(value, tuple):
            value = list(value)
        if section == "auth" and key == "secret" and value:
            value = REDACTED
        elif section == "msilo" and key == "db_url":
            value = redact_url(value)
        print(f"{section}.{key} = {value!r}")
    return 0


async def _cmd_db(config: Config, action: str) -> int:
    if action != "init":
        require_database_file(config)
        await refuse_while_serving(config)
    options: dict[str, Any] = {}
    step: PgStep | None = None
    postgres = config.msilo.db_url.startswith(("postgres://", "postgresql://"))
    if action == "upgrade" and sys.stderr.isatty() and postgres:
        # Name our session so a second connection can say which statement it is running.
        options["application_name"] = f"msilo-db-upgrade-{os.getpid()}"
        step = PgStep(config.msilo.db_url, options["application_name"])

    async def work(store: Store) -> int:
        if action == "init":
            await store.create_schema()
            print(f"schema ready ({redact_url(config.msilo.db_url)})")
        else:
            try:
                done = await _with_progress("db upgrade", store.upgrade_schema(), step)
            finally:
                if step is not None:
                    await step.close()
            for line in done:
                print(line)
            print(f"schema up to date ({len(done)} change(s))")
        return 0

    return await _with_store(config, work, **options)


class PgStep:
    """What a PostgreSQL session named ``application_name`` is doing now, in a few words:
    its statement, and for CREATE INDEX the phase and share of blocks done
    (``pg_stat_progress_create_index``).  Read over a connection of its own."""

    QUERY = (
        "SELECT a.query, p.phase, p.blocks_done, p.blocks_total FROM pg_stat_activity a "
        "LEFT JOIN pg_stat_progress_create_index p ON p.pid = a.pid "
        "WHERE a.application_name = $1 AND a.state = 'active' LIMIT 1"
    )

    def __init__(self, dsn: str, application_name: str) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self._conn: Any = None

    async def __call__(self) -> str | None:
        """The current step, or None when unknown (progress is best effort)."""
        import asyncpg

        try:
            if self._conn is None:
                self._conn = await asyncpg.connect(self.dsn, timeout=2)
            row = await self._conn.fetchrow(self.QUERY, self.application_name, timeout=1)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None
        if row is None or not row["query"]:
            return None
        statement = " ".join(str(row["query"]).split())
        if len(statement) > 60:
            statement = statement[:57] + "..."
        if row["blocks_total"]:
            share = 100.0 * row["blocks_done"] / row["blocks_total"]
            return f"{statement} ({row['phase']}, {share:.0f} %)"
        return statement

    async def close(self) -> None:
        """Close the watching connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


async def refuse_while_serving(config: Config) -> None:
    """``db upgrade`` takes exclusive locks and rewrites the table: never under a running
    server.  A server's leader holds the deployment lock as long as it runs."""
    from msilo.leader.election import leader_election_for

    holder = await leader_election_for(config.msilo.db_url).current_leader()
    if holder is not None:
        who = f"host {holder.get('host') or '?'} pid {holder.get('pid') or '?'}"
        raise StorageError(
            f"db upgrade: msilo is serving this database (the leader lock is held by {who});"
            " stop every msilo serve that uses it, then run db upgrade again"
        )


async def _with_progress(
    label: str, work: Awaitable[T], step: Callable[[], Awaitable[str | None]] | None = None
) -> T:
    """Await ``work`` showing a live ``label: 12 s <step>`` line on a terminal (stderr),
    nothing otherwise: a log or a pipe gets only the result lines."""
    if not sys.stderr.isatty():
        return await work
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    spinner = "|/-\\"
    tick = 0
    current = "working"
    while True:
        # Shown at once and every 0.2 s: an ALTER TABLE on millions of rows takes minutes.
        elapsed = time.monotonic() - started
        sys.stderr.write(f"\r{label}: {spinner[tick % 4]} {elapsed:.0f} s {current}\x1b[K")
        sys.stderr.flush()
        tick += 1
        if task.done():
            break
        await asyncio.wait({task}, timeout=0.2)
        if step is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                now_doing: str | None = await asyncio.wait_for(step(), 1.5)
                current = now_doing or current
    sys.stderr.write(f"\r{label}: done in {time.monotonic() - started:.1f} s\x1b[K\n")
    sys.stderr.flush()
    return task.result()


def _fmt_time(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _message_json(row: StoredMessage) -> bytes:
    import base64

    import orjson

    out: dict[str, Any] = {
        "mid": row.mid,
        "username": row.username,
        "domain": row.domain,
        "src_addr": row.src_addr,
        "dst_addr": row.dst_addr,
        "ctype": row.ctype,
        "inc_time": row.inc_time,
        "exp_time": row.exp_time,
        "snd_time": row.snd_time,
    }
    try:
        out["body"] = row.body.decode("utf-8")
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(row.body).decode("ascii")
    return orjson.dumps(out)


async def _cmd_messages(
    config: Config, action: str, aor: str, yes: bool, args: argparse.Namespace | None = None
) -> int:
    user, domain = split_aor(aor)
    require_database_file(config)

    async def work(store: Store) -> int:
        await store.check_schema()
        if action == "count":
            print(await store.count(user, domain))
        elif action == "list":
            limit = getattr(args, "limit", LIST_LIMIT) or None
            offset = getattr(args, "offset", 0)
            rows = await store.list_page(user, domain, limit, offset)
            out = sys.stdout
            for row in rows:
                if getattr(args, "json", False):
                    out.write(_message_json(row).decode() + "\n")
                    continue
                body = row.body.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
                when = f"send={_fmt_time(row.snd_time)} " if row.snd_time else ""
                out.write(
                    f"{row.mid}\t{_fmt_time(row.inc_time)}\texpires={_fmt_time(row.exp_time)}"
                    f"\t{when}from={row.src_addr}\tctype={row.ctype or '-'}\t{body[:80]}\n"
                )
            out.flush()
            total = await store.count(user, domain)
            shown = f"{offset + 1}-{offset + len(rows)} of " if len(rows) < total else ""
            more = " (--limit/--offset for the others)" if len(rows) < total else ""
            print(f"{shown}{total} message(s) for {user}@{domain}{more}", file=sys.stderr)
        else:
            if not yes:
                if not sys.stdin.isatty():
                    raise ConfigError("messages purge: add --yes to confirm without a terminal")
                answer = input(f"delete every stored message of {user}@{domain}? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("nothing deleted")
                    return 0
            print(f"deleted {await store.purge(user, domain)} message(s)")
        return 0

    return await _with_store(config, work)


async def _cmd_subscriber(config: Config, args: argparse.Namespace) -> int:
    from msilo.cli_subscriber import subscriber_command

    realm = config.auth.realm or (config.server.domains[0] if config.server.domains else None)
    require_database_file(config)

    async def work(store: Store) -> int:
        await store.check_schema()
        return await subscriber_command(
            store,
            args.subscriber_command,
            args.aor,
            realm=realm,
            plain_password=getattr(args, "plain_password", False),
        )

    return await _with_store(config, work)


async def _cmd_serve(config: Config, overrides: Sequence[str] = ()) -> int:
    """Create the schema, then supervise the workers and the leader until SIGTERM/SIGINT.

    A SIGHUP re-reads the same ``-c`` file with the same ``--set`` overrides.
    """
    from msilo.log import set_process_title
    from msilo.server.supervisor import Supervisor

    set_process_title("supervisor" + (f" -c {config.source}" if config.source else ""))

    async def prepare(store: Store) -> int:
        await store.create_schema()
        return 0

    # The schema exists before any child starts; no connection is kept open here.
    await _with_store(config, prepare)

    def reload() -> Config:
        return load_config(config.source, list(overrides))

    # The loop running this coroutine stays idle: the supervisor's main loop is synchronous
    # and its children are spawned (fork + exec), so they inherit none of it.
    supervisor = Supervisor(config, store_factory=open_serving_store, reload=reload)
    return supervisor.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``msilo`` command; return its exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is ours to report
    except BrokenPipeError:
        # The reader went away (``| head``): nothing more to say, and no traceback.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_line())
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "migrate-config":
            # Needs no configuration of its own: it writes one.
            from msilo.migrate import migrate_config

            sys.stdout.write(migrate_config(args.file, args.dialect))
            return 0
        config = load_config(args.config, args.overrides)
        from msilo.log import setup_logging

        setup_logging(config.server.log_level, secrets=config.secrets())
        if args.command == "check-config":
            return _cmd_check_config(config)
        runner = _runner()
        if args.command == "db":
            return runner(_cmd_db(config, args.db_command))
        if args.command == "subscriber":
            return runner(_cmd_subscriber(config, args))
        if args.command == "messages":
            return runner(
                _cmd_messages(
                    config, args.messages_command, args.aor, getattr(args, "yes", False), args
                )
            )
        if args.command == "serve":
            return runner(_cmd_serve(config, args.overrides))
    except ConfigError as exc:
        _error(str(exc), args.overrides)
        return EXIT_USAGE
    except StorageError as exc:
        _error(f"database: {exc}", args.overrides)
        return EXIT_RUNTIME
    except MsiloError as exc:
        _error(str(exc), args.overrides)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _error(text: str, overrides: Sequence[str]) -> None:
    """Print ``msilo: error: text`` with every secret redacted: a message may quote a
    database URL, or a ``--set`` item that holds ``auth.secret``."""
    secrets = [
        value.strip().strip("\"'")
        for item in overrides
        for path, _, value in [item.partition("=")]
        if path.strip() == "auth.secret"
    ]
    print(f"msilo: error: {redact_text(text, secrets)}", file=sys.stderr)


def _runner() -> Callable[[Awaitable[int]], int]:
    def run(coro: Awaitable[int]) -> int:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            return asyncio.run(coro)  # type: ignore[arg-type]
        return uvloop.run(coro)  # type: ignore[arg-type]

    return run
