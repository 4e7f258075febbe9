"""The ``cti-bridge`` command: run | demo | migrate | render | check-config.

Exit codes (README.md): 0 ok, 1 unexpected failure, 2 bad command line, 3 invalid setting (one line
names it), 4 database unavailable, locked by another instance, or migration failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import signal
import sys
import threading
import time

from cti_bridge import __version__
from cti_bridge.errors import ConfigError, ExitCode, SchemaTooNewError, StoreLockedError

log = logging.getLogger("cti_bridge")
#: How check-config shows a secret that is set (as pydantic shows a SecretStr).
MASK = "**********"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cti-bridge", description="Xelion call events to CRM requests.")
    parser.add_argument("--version", action="version", version=f"cti-bridge {__version__}")
    parser.add_argument("--config", help="TOML settings file (also CTI_BRIDGE_CONFIG)")
    # Also after the command (``cti-bridge run --config FILE``), as operators write it; given
    # there, it wins. SUPPRESS keeps the subcommand from resetting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML settings file (also CTI_BRIDGE_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon: admin API, Xelion sources, delivery worker")
    demo = sub.add_parser(
        "demo", parents=[common], help="run everything against the built-in Xelion and CRM simulators"
    )
    demo.add_argument("--calls", type=int, default=20, help="calls to place, 0 for until Ctrl-C (default 20)")
    demo.add_argument("--rate", type=float, default=4.0, help="calls per second (default 4)")
    demo.add_argument("--database", default=None, help="database URL (default: a fresh SQLite file)")
    sub.add_parser("migrate", parents=[common], help="bring the database to the newest schema and exit")
    sub.add_parser(
        "check-config", parents=[common], help="validate the settings and print them (secrets masked)"
    )
    render = sub.add_parser(
        "render", parents=[common], help="render a mapping for an event and print the request as JSON"
    )
    render.add_argument("--mapping", required=True, help="a JSON file with one eventUriMapping")
    render.add_argument("--event", required=True, help="a JSON file with a notification or a websocket frame")
    render.add_argument("--user", help="the Xelion user name of the party the delivery is for")
    render.add_argument("--token", help="a JSON file with a token endpoint response")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        _stop_on_sigterm_until_running()
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"cti-bridge: invalid setting: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except (StoreLockedError, SchemaTooNewError) as exc:
        print(f"cti-bridge: {exc}", file=sys.stderr)
        return ExitCode.DATABASE
    except (KeyboardInterrupt, _StopDuringStart):
        return ExitCode.OK


class _StopDuringStart(BaseException):
    """SIGTERM during the start. A BaseException, so that no ``except Exception`` on the way takes
    it, and not KeyboardInterrupt itself: CPython marks a KeyboardInterrupt that leaves any
    ``eval`` of a string as unhandled and then ends the process with SIGINT at its exit, even after
    ``main`` caught it and returned 0 (FastAPI evaluates annotations while the admin API's modules
    are imported: one SIGTERM in about ten during the start exited -2 instead of 0)."""


def _stop_on_sigterm_until_running() -> None:
    """SIGTERM before the event loop's own handlers exist (imports, migrations, building the
    parts: a second or two) had its default action: exit 143, no line, and a SIGTERM is how every
    orchestrator stops a container (a chaos soak's finding). It ends the start as Ctrl-C does now
    (exit 0): a migration under way rolls back, its transaction never committed, and the database
    lock is released. ``serve`` replaces the handler once it runs."""

    def stop(_signum: int, _frame: object) -> None:
        raise _StopDuringStart

    signal.signal(signal.SIGTERM, stop)


def _dispatch(args: argparse.Namespace) -> int:
    from cti_bridge.config import load_settings

    if args.command == "render":
        from cti_bridge.el import TemplateError
        from cti_bridge.render import render_command

        try:
            out = render_command(args.mapping, args.event, args.user, args.token)
        except (ValueError, TemplateError, OSError) as exc:
            print(f"cti-bridge render: {exc}", file=sys.stderr)
            return ExitCode.FAILURE
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return ExitCode.OK

    if args.command == "demo":
        from cti_bridge.demo import run_demo

        return run_demo(calls=args.calls, rate=args.rate, database_url=args.database, config_file=args.config)

    settings = load_settings(args.config)
    from cti_bridge.config import overridden_by_environment
    from cti_bridge.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    for key, variable in overridden_by_environment(args.config):
        log.warning("the setting file's %s is not used: the environment's %s wins over it", key, variable)

    if args.command == "check-config":
        from cti_bridge.store.crypto import read_key_file

        # The key file as ``run`` will read it (a missing one it creates): a short one passed
        # here and then stopped ``run`` with a traceback.
        if settings.key_file is not None:
            read_key_file(settings.key_file)  # ConfigError: exit 3, naming the setting
        shown = settings.model_dump(mode="json")
        # SecretStr settings print as stars already; the Xelion app key (a str: the sources take
        # it as one) and a password in the database URL did not.
        if settings.xelion_app_key is not None:
            shown["xelion_app_key"] = MASK
        from sqlalchemy.engine import make_url

        url = make_url(settings.database_url)
        # libpq takes a password in the query too (``?password=...``, ``sslpassword``).
        url = url.update_query_dict({k: "***" for k in url.query if "password" in k.lower()})
        shown["database_url"] = url.render_as_string(hide_password=True)
        print(json.dumps(shown, indent=2))
        return ExitCode.OK

    if args.command == "migrate":
        from cti_bridge.store import migrate
        from cti_bridge.store.db import InstanceLock, make_engine

        # An SQLite file belongs to one process: migrating it under a running daemon (of an
        # older release, say) changed the schema beneath that daemon's code.
        lock = InstanceLock(settings.sqlite_path.resolve()) if settings.sqlite_path is not None else None
        if lock is not None:
            try:
                lock.acquire()  # StoreLockedError: exit 4, naming the lock
            except OSError as exc:
                # Its folder cannot be made or written (a file in the path, no permission): as
                # ``run`` says it, not a traceback and exit 1.
                return _database_unavailable(exc)
        try:
            engine = make_engine(settings.database_url)
            migrate.upgrade(engine)
            engine.dispose()
        except SchemaTooNewError:
            raise
        except Exception as exc:
            log.error("migration failed: %s", type(exc).__name__)
            print(f"cti-bridge: migration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return ExitCode.DATABASE
        finally:
            if lock is not None:
                lock.release()
        print("database is at the newest schema")
        return ExitCode.OK

    # run
    from cti_bridge.app import build, install_signal_handlers, serve

    try:
        daemon = build(settings)
    except (StoreLockedError, SchemaTooNewError):
        raise
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError | OSError):
            return _database_unavailable(exc)
        raise

    # Python's GIL switch interval (5 ms) is left as it is. It was 1 ms while SQLite's transactions
    # ran in the database thread (a thread back from the database waits for the GIL up to that
    # long); they now run in the loop's thread (store/db.py), and on PostgreSQL 5 ms measured
    # better in throughput and in latency alike (bench_e2e.py --db postgresql, three runs each:
    # 1,101 / 994 / 1,200 -> 1,220 / 1,277 / 1,293 events/s, p99 at 200 ev/s 38.5 / 16.7 / 13.9 ->
    # 13.2 / 11.8 / 12.8 ms).

    async def _main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await serve(daemon, stop)

    tune_gc()
    raise_open_files_limit()
    asyncio.run(_main())
    _exit_if_a_thread_hangs(ExitCode.OK)
    return ExitCode.OK


def _database_unavailable(exc: Exception) -> int:
    """Say in one line why the database cannot be opened; ``ExitCode.DATABASE``."""
    # The driver's first line says why (refused, unknown database or role, timeout); libpq and
    # sqlite3 messages name the host, port, user or file, never a password.
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = f": {reason[0][:300]}" if reason else ""
    print(f"cti-bridge: database unavailable: {type(exc).__name__}{detail}", file=sys.stderr)
    return ExitCode.DATABASE


#: How long the process waits at its exit for database threads still running (seconds).
EXIT_THREAD_WAIT = 5.0


def _exit_if_a_thread_hangs(code: int) -> None:
    """Python joins every database thread at exit, and one held by a database that does not answer
    would hold the process for ever after a stop that has done all it could. Wait a little, then
    exit without it: what it was doing is a transaction the database never confirmed, which a
    ``kill -9`` could leave as well."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + EXIT_THREAD_WAIT
    for t in others:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in others if t.is_alive()]
    if stuck:
        log.warning("exiting without waiting for %d database thread(s) that do not finish", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


#: The open files the daemon asks for (its soft limit, up to the hard one).
OPEN_FILES = 65536


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files towards the hard one (at most ``OPEN_FILES``); the limit
    now. Many systems start a process at 1,024 while allowing far more: admin API connections, CRM
    connections, the database's files and the websockets share it, and running out fails them all
    at once (the admin port bounds its own share, admin/http.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
        except (OSError, ValueError):
            log.warning("could not raise the open files limit from %d", soft)
    return soft


#: The cyclic garbage collector's thresholds while the daemon runs (Python's are 700, 10, 10).
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Freeze the start-up heap and collect young objects less often.

    The daemon's start-up leaves some hundred thousand long-lived objects (FastAPI, SQLAlchemy,
    pydantic, the compiled templates), and every full collection walked them all: 90-135 ms with
    the loop stopped, a few times a minute at full load (measured with ``gc.callbacks`` during
    ``bench_e2e.py``), which is a p99 outlier by itself. Frozen (``gc.freeze``), they are never
    walked again. Young collections came every 700 net new container objects, a few per batch of
    events; at 10,000 they are rare, and what a collection does not find (the daemon makes few
    cycles: reference counting frees nearly everything) is only held a little longer. Measured
    with ``bench_e2e.py --db sqlite``: the collector's time in a 5,000-event run 0.39 s -> 0.004 s,
    and with 1,000 users and 200 mappings 1.09 s -> 0.1-0.17 s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


if __name__ == "__main__":
    sys.exit(main())
