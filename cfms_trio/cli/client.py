"""`cfms-trio client ...`: drive a running server from the command line."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from ..client import ClientError, ProgressBar, export_backup, import_backup, open_client
from ..conventions import ARCHIVE_SUFFIX, KEY_SUFFIX, STATUS_COMPLETED


def _password(args) -> str:
    if args.password_file:
        return Path(args.password_file).read_text().strip()
    if os.environ.get("CFMS_PASSWORD"):
        return os.environ["CFMS_PASSWORD"]
    return getpass.getpass(f"password for {args.username}: ")


def _run(args, flow) -> int:
    password = _password(args)

    async def main():
        async with open_client(args.server, cafile=args.cafile, insecure=args.insecure,
                               check_certificate_first=True) as client:
            await client.login(args.username, password)
            return await flow(client)

    try:
        return trio.run(main)
    except ClientError as err:
        code = f" (code {err.code})" if err.code else ""  # 0: found by the client itself
        print(f"error: {err.message}{code}", file=sys.stderr)
    except (OSError, HandshakeError, ConnectionClosed) as err:
        print(f"error: cannot talk to {args.server}: {err}", file=sys.stderr)
    return 1


def cmd_backup_import(args) -> int:
    archive, key = Path(args.archive), Path(args.key)
    for path in (archive, key):
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2

    async def flow(client) -> int:
        upload_bar = ProgressBar(sys.stderr, "upload  ")
        status_bar = ProgressBar(sys.stderr, "restore ")
        started = []

        def on_status(status):
            if not started:
                upload_bar.done()
                started.append(True)
            status_bar.show(status["progress_percent"], status["current_step"])

        final = await import_backup(client, archive, key, timeout_seconds=args.timeout,
                                    poll_interval_s=args.poll,
                                    upload_progress=upload_bar.bytes_progress,
                                    on_status=on_status,
                                    allow_missing_content=args.allow_missing_content)
        status_bar.done()
        if final["status"] != STATUS_COMPLETED:
            print(f"import {final['status']}: {final['error_message']}", file=sys.stderr)
            if "allow_missing_content" in (final["error_message"] or ""):
                print("(to do so, run this command again with --allow-missing-content)",
                      file=sys.stderr)
            return 1
        print(f"import completed: {final['folders_count']} folders, "
              f"{final['documents_count']} documents, {final['files_count']} files "
              f"(task {final['backup_task_id']})")
        for warning in final.get("warnings", []):
            print(f"warning: {warning}")
        return 0

    return _run(args, flow)


def cmd_backup_export(args) -> int:
    async def flow(client) -> int:
        bar = ProgressBar(sys.stderr, "download ")
        archive, key, result = await export_backup(client, Path(args.out), args.name,
                                                   args.compression, bar.bytes_progress)
        bar.done()
        meta = result["metadata"]
        print(f"archive: {archive}\nkey:     {key}\n"
              f"content: {meta['folders_count']} folders, {meta['documents_count']} documents, "
              f"{meta['files_count']} files")
        return 0

    return _run(args, flow)


def _connection_args(parser) -> None:
    parser.add_argument("--server", required=True, help="e.g. wss://backup-host:5104")
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password-file", help="file holding the password "
                        "(default: $CFMS_PASSWORD, else a prompt)")
    parser.add_argument("--cafile", help="CA or self-signed certificate to trust "
                        "(the server's content/tls/cert.pem)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server's certificate")


def register(sub) -> None:
    client = sub.add_parser("client", help="talk to a running server")
    commands = client.add_subparsers(dest="client_command", required=True)
    imp = commands.add_parser("backup-import", help="restore a backup on a server")
    _connection_args(imp)
    imp.add_argument("--archive", required=True, help=f"the NAME{ARCHIVE_SUFFIX} file")
    imp.add_argument("--key", required=True, help=f"the NAME{KEY_SUFFIX} file")
    imp.add_argument("--timeout", type=int, default=3600,
                     help="seconds allowed for the uploads (default 3600)")
    imp.add_argument("--poll", type=float, default=2.0, help="status poll interval in seconds")
    imp.add_argument("--allow-missing-content", action="store_true",
                     help="restore a legacy (1.0) archive that lists files it does not hold: "
                     "everything else is restored and the missing files are reported")
    imp.set_defaults(func=cmd_backup_import)
    exp = commands.add_parser("backup-export", help="make a backup and download it")
    _connection_args(exp)
    exp.add_argument("--out", required=True, help="folder to write the archive and key into (existing files are "
                     "never replaced)")
    exp.add_argument("--name", help="backup name")
    exp.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    exp.set_defaults(func=cmd_backup_export)
