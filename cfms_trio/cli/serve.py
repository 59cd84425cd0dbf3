"""`cfms-trio serve`: run the server until SIGINT or SIGTERM, logging to stderr and a file."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path

import trio

from ..config import Limits, Settings, parse_size
from ..content import parse_storage_url
from ..errors import StartupError, StorageUnavailable
from ..storage.backends import parse_database_url

log = logging.getLogger("cfms_trio")


def _setup_logging(log_dir: Path | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            log_dir / "server.log", maxBytes=10 * 1024 * 1024, backupCount=5))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


async def _serve_until_signalled(settings: Settings) -> None:
    from ..server import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, settings)
            if running.generated_admin_password:
                print(f"admin password: {running.generated_admin_password} "
                      f"(also in {running.app.paths.admin_password})", flush=True)
            print(f"listening on {running.url}", flush=True)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def cmd_serve(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    if args.certfile and not args.keyfile:
        print("error: --certfile needs --keyfile", file=sys.stderr)
        return 2
    if args.database:
        try:
            parse_database_url(args.database)
        except ValueError as exc:
            print(f"error: --database: {exc}", file=sys.stderr)
            return 2
    defaults = Limits()
    archive = dataclasses.replace(
        defaults.archive,
        archive_bytes=args.max_archive_bytes or defaults.archive.archive_bytes,
        extracted_bytes=args.max_extracted_bytes or defaults.archive.extracted_bytes)
    limits = dataclasses.replace(
        defaults, archive=archive, upload_bytes=args.max_upload_bytes or defaults.upload_bytes,
        **_connection_limits(args, defaults))
    settings = Settings(root=root, host=args.host, port=args.port, tls=not args.no_tls,
                        certfile=Path(args.certfile) if args.certfile else None,
                        keyfile=Path(args.keyfile) if args.keyfile else None,
                        initial_admin_password=os.environ.get("CFMS_ADMIN_PASSWORD") or None,
                        limits=limits, database_url=args.database,
                        s3_endpoint_url=args.s3_endpoint,
                        s3_region=args.s3_region, storage_url=args.storage,
                        lease_s=args.lease_seconds or Settings.lease_s,
                        instance_name=args.instance_name)
    try:
        _setup_logging(settings.content / "logs", args.verbose)
        trio.run(_serve_until_signalled, settings)
    except (OSError, StartupError, BaseExceptionGroup) as exc:
        startup = _find_error(exc, StartupError)
        if startup is not None:
            print(f"error: {startup}", file=sys.stderr)
            return 1
        os_error = _find_error(exc, OSError)
        if os_error is None:
            unavailable = _find_error(exc, StorageUnavailable)
            if unavailable is None:
                raise
            print(f"error: {unavailable.message}", file=sys.stderr)
            return 1
        if os_error.errno == errno.EADDRINUSE:
            print(f"error: cannot listen on {settings.host}:{settings.port}: address already "
                  f"in use", file=sys.stderr)
        else:
            print(f"error: {os_error}", file=sys.stderr)
        return 1
    return 0


def _find_error(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The error of `kind` (a StartupError; an OSError: port in use, unreadable root...)
    behind a start-up failure, if that is what it was: it deserves one clear line, not a
    traceback."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_error(inner, kind)
            if found is not None:
                return found
    return None


def _storage(text: str) -> str:
    try:
        parse_storage_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# -- connection bounds (issue 12 item 7) --------------------------------------------------------

def _connection_limits(args: argparse.Namespace, defaults: Limits) -> dict:
    return {"connections_max": args.max_connections or defaults.connections_max,
            "connections_per_address_max": (args.max_connections_per_address
                                            or defaults.connections_per_address_max),
            "login_timeout_s": args.login_timeout or defaults.login_timeout_s}


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def _add_connection_flags(serve) -> None:
    defaults = Limits()
    serve.add_argument("--max-connections", type=_positive(int), metavar="N",
                       help="open connections in total; more are closed when accepted "
                            f"(default {defaults.connections_max})")
    serve.add_argument("--max-connections-per-address", type=_positive(int), metavar="N",
                       help="open connections from one address (default "
                            f"{defaults.connections_per_address_max}; raise it behind a proxy)")
    serve.add_argument("--login-timeout", type=_positive(float), metavar="SECONDS",
                       help="close a connection that has not logged in this long after "
                            f"connecting (default {defaults.login_timeout_s:g})")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub) -> None:
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5104, help="port (default 5104; 0 picks a free one)")
    serve.add_argument("--root", default=".", help="server root; data lives in ROOT/content/")
    serve.add_argument("--no-tls", action="store_true", help="plain ws:// (only behind a TLS proxy)")
    serve.add_argument("--certfile", help="PEM certificate (default: self-signed, made on first start)")
    serve.add_argument("--keyfile", help="PEM private key for --certfile")
    serve.add_argument("--max-upload-bytes", type=_size, metavar="SIZE",
                       help="largest file a client may upload (default 64G; e.g. 512M)")
    serve.add_argument("--max-archive-bytes", type=_size, metavar="SIZE",
                       help="largest backup archive an import accepts (default 64G)")
    serve.add_argument("--max-extracted-bytes", type=_size, metavar="SIZE",
                       help="most bytes one import may unpack (default 256G)")
    _add_connection_flags(serve)
    serve.add_argument("--database", metavar="URL",
                       help="the database: postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (a "
                            "password may also come from $PGPASSWORD or ~/.pgpass); default: "
                            "the SQLite file ROOT/content/cfms.db")
    serve.add_argument("--storage", type=_storage, metavar="s3://BUCKET/PREFIX",
                       help="keep file contents, partial uploads, restored files and backups "
                            "in this S3 bucket (default: local files under ROOT/content/); "
                            "the bucket must exist")
    serve.add_argument("--s3-endpoint", metavar="URL",
                       help="S3-compatible service for --storage and for backup targets that "
                            "name no endpoint (default: $AWS_ENDPOINT_URL, else AWS); "
                            "credentials come from the standard AWS_* environment variables")
    serve.add_argument("--s3-region", metavar="REGION",
                       help="S3 region (default: $AWS_DEFAULT_REGION)")
    serve.add_argument("--lease-seconds", type=_positive(float), metavar="SECONDS",
                       help="several instances on PostgreSQL: an instance silent this long is "
                            "taken for dead and its imports failed, its uploads resumable "
                            "elsewhere (default 30)")
    serve.add_argument("--instance-name", metavar="NAME",
                       help="several instances on PostgreSQL: this instance's name, kept across "
                            "restarts so a restarted instance fails at once the imports it was "
                            "running; each instance needs its own (default: host name, root "
                            "folder and port)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve.set_defaults(func=cmd_serve)
