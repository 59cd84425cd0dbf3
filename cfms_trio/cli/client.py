"""`cfms-trio client ...`: drive a running server from the command line.

This module registers the `client` group and holds the backup commands; the others live in
`profile` (login, logout, profiles), `docs` (documents and folders by path) and `admin` (users,
groups, audit, info). `common` has what they share: flags, sessions, output and exit codes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

from ..client import export_backup, import_backup, start_import
from ..conventions import (
    ACCOUNTS_DEFAULT_POLICY,
    ACCOUNTS_POLICIES,
    CONFLICT_DEFAULT_POLICY,
    CONFLICT_POLICIES,
    ARCHIVE_SUFFIX,
    BACKUP_PARTS,
    FINAL_STATUSES,
    KEY_SUFFIX,
    STATUS_COMPLETED,
)
from ..errors import CfmsError
from . import admin, docs, profile, schedules
from .common import EXIT_REFUSED, EXIT_USAGE, Output, add_connection_args, fail, progress_bar, run
from .keys import read_passphrase_file


def _run(args, flow) -> int:
    return run(args, flow)


def _passphrase(args) -> str | None:
    return read_passphrase_file(args.passphrase_file) if args.passphrase_file else None


def cmd_backup_import(args) -> int:
    archive = Path(args.archive) if args.archive else None
    key = Path(args.key or args.identity) if (args.key or args.identity) else None
    if (archive is None) == (args.task is None):
        return fail(args, EXIT_USAGE, "give either --archive FILE (a new import) or --task "
                                      "TASK_ID (an import whose uploads the server kept)")
    if args.task is not None and key is not None:
        return fail(args, EXIT_USAGE, "--task starts an import whose key was uploaded already "
                                      "(or give --passphrase-file); --key and --identity "
                                      "upload one")
    if archive is not None and key is None and not args.passphrase_file:
        return fail(args, EXIT_USAGE, "give --key FILE, --identity FILE or --passphrase-file FILE")
    for path in (archive, key):
        if path is not None and not path.is_file():
            return fail(args, EXIT_USAGE, f"{path} is not a file")
    try:
        passphrase = _passphrase(args)
    except (CfmsError, OSError) as err:
        return fail(args, EXIT_USAGE, getattr(err, "message", None) or str(err))

    async def flow(client) -> int:
        upload_bar = progress_bar(args, "upload  ")
        status_bar = progress_bar(args, "restore ")
        started = []

        def on_status(status):
            if not started:
                upload_bar.done()
                started.append(True)
            status_bar.show(status["progress_percent"], status["current_step"])

        start = {"poll_interval_s": args.poll, "on_status": on_status,
                 "passphrase": passphrase, "allow_missing_content": args.allow_missing_content,
                 "accounts": args.accounts, "options": _restore_options(args)}
        if args.task is not None:
            final = await start_import(client, args.task, **start)
        else:
            final = await import_backup(client, archive, key, timeout_seconds=args.timeout,
                                        upload_progress=upload_bar.bytes_progress, **start)
        status_bar.done()
        wanted = "planned" if args.dry_run else STATUS_COMPLETED
        if args.json:
            return Output(final, exit_code=0 if final["status"] == wanted else 1)
        if final["status"] == "planned":
            print(plan_table(final["plan"]))
            print(f"dry run of task {final['backup_task_id']}: nothing was changed; the "
                  f"uploads are kept until {_local_time(final['timeout_time'])} (start it "
                  f"with --task {final['backup_task_id']})")
            return 0
        if final["status"] != STATUS_COMPLETED:
            print(f"import {final['status']}: {final['error_message']}", file=sys.stderr)
            if "allow_missing_content" in (final["error_message"] or ""):
                print("(to do so, run this command again with --allow-missing-content)",
                      file=sys.stderr)
            if final.get("startable"):
                print(f"(the uploads are kept until {_local_time(final['timeout_time'])}: "
                      f"start it again with --task {final['backup_task_id']} and other "
                      "options)", file=sys.stderr)
            return 1
        print(f"import completed: {final['folders_count']} folders, "
              f"{final['documents_count']} documents, {final['files_count']} files "
              f"(task {final['backup_task_id']})")
        for warning in final.get("warnings", []):
            print(f"warning: {warning}")
        return 0

    return _run(args, flow)


def _local_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _include_entry(text: str) -> dict:
    """--include: a /path in the archive, folder:ID, document:ID, or a bare folder ID."""
    if text.startswith("/"):
        return {"path": text}
    for kind in ("folder", "document"):
        if text.startswith(kind + ":"):
            return {f"{kind}_id": text[len(kind) + 1:]}
    return {"folder_id": text}


def _restore_options(args) -> dict:
    options: dict = {"conflict_policy": args.conflict}
    if args.dry_run:
        options["dry_run"] = True
    if args.include:
        options["include"] = [_include_entry(entry) for entry in args.include]
    if args.into:
        options["target_folder_id"] = args.into
    return options


def plan_table(plan: dict) -> str:
    """An import's plan as a readable table: actions by kind, then the first conflicts."""
    kinds = ("folder", "document", "revision", "file", "rule")
    lines = [f"plan (conflict policy {plan['conflict_policy']}):",
             f"  {'action':<10}" + "".join(f"{kind + 's':>11}" for kind in kinds)]
    for action, counts in plan["actions"].items():
        lines.append(f"  {action:<10}" + "".join(f"{counts[kind]:>11}" for kind in kinds))
    lines.append(f"  bytes to write: {plan['bytes_to_write']}; free space needed "
                 f"{plan['free_bytes_needed']}, available {plan['free_bytes_available']}")
    if plan["conflicts_count"]:
        lines.append(f"conflicts ({plan['conflicts_count']}, first {len(plan['conflicts'])}):")
        for c in plan["conflicts"]:
            lines.append(f"  {c['kind']:<9} {c['id']}  {c.get('path', ''):<30} "
                         f"{c['reason']} taken -> {c['action']}"
                         + (f" as {c['new_name']!r}" if c.get("new_name") else ""))
    if plan["refusal"]:
        lines.append(f"a real run would fail: {plan['refusal']}")
    return "\n".join(lines)


def cmd_backup_cancel(args) -> int:
    async def flow(client) -> Output:
        reply = await client.call("cancel_backup_import", {"backup_task_id": args.task})
        return Output(reply, f"{reply['status']}: {reply['message']}")

    return _run(args, flow)


def cmd_backup_export(args) -> int:
    try:
        passphrase = _passphrase(args)
    except (CfmsError, OSError) as err:
        return fail(args, EXIT_USAGE, getattr(err, "message", None) or str(err))

    async def flow(client) -> int:
        bar = progress_bar(args, "download ")
        archive, key, result = await export_backup(client, Path(args.out), args.name,
                                                   args.compression, bar.bytes_progress,
                                                   recipients=tuple(args.recipient or ()),
                                                   passphrase=passphrase,
                                                   parts=tuple(args.part) if args.part else None)
        bar.done()
        meta = result["metadata"]
        if args.json:
            return Output(dict(result, archive=str(archive), key=str(key) if key else None))
        opens = ([f"recipient {r}" for r in result.get("recipients") or ()]
                 + (["the passphrase"] if result.get("passphrase") else []))
        print(f"archive: {archive}\n"
              + (f"key:     {key}\n" if key else f"opens with: {'; '.join(opens)}\n") +
              f"content: {meta['folders_count']} folders, {meta['documents_count']} documents, "
              f"{meta['files_count']} files")
        return 0

    return _run(args, flow)


def cmd_backup_status(args) -> int:
    async def flow(client) -> Output:
        bar = progress_bar(args, "restore ")
        while True:
            status = await client.call("get_backup_import_status",
                                       {"backup_task_id": args.task})
            bar.show(status["progress_percent"], status["current_step"] or "")
            if not args.follow or status["status"] in FINAL_STATUSES:
                break
            await trio.sleep(args.poll)
        bar.done()
        failed = args.follow and status["status"] != STATUS_COMPLETED
        text = (f"{status['status']}: {status['progress_percent']:.0f}% "
                f"{status['current_step'] or ''}".rstrip()
                + f"\n{status['folders_count']} folders, {status['documents_count']} documents, "
                  f"{status['files_count']} files")
        if status["error_message"]:
            text += f"\nerror: {status['error_message']}"
        return Output(status, text, EXIT_REFUSED if failed else 0)

    return _run(args, flow)


def _connection_args(parser) -> None:
    add_connection_args(parser)


def register(sub) -> None:
    client = sub.add_parser("client", help="talk to a running server (docs/CLI.md)")
    commands = client.add_subparsers(dest="client_command", required=True)
    profile.register(commands)
    docs.register(commands)
    admin.register(commands)
    imp = commands.add_parser("backup-import", help="restore a backup on a server")
    _connection_args(imp)
    imp.add_argument("--archive", help=f"the NAME{ARCHIVE_SUFFIX} file to upload")
    imp.add_argument("--task", metavar="TASK_ID",
                     help="start an import the server holds the uploads of (after a dry run, "
                     "or a start refused because of its options) instead of uploading")
    secret = imp.add_mutually_exclusive_group()
    secret.add_argument("--key", help=f"the NAME{KEY_SUFFIX} file")
    secret.add_argument("--identity", help="identity file of a recipient (format 3 backups)")
    imp.add_argument("--passphrase-file", help="file holding the backup's passphrase")
    imp.add_argument("--timeout", type=int, default=3600,
                     help="seconds allowed for the uploads (default 3600)")
    imp.add_argument("--poll", type=float, default=2.0, help="status poll interval in seconds")
    imp.add_argument("--allow-missing-content", action="store_true",
                     help="restore a legacy (1.0) archive that lists files it does not hold: "
                     "everything else is restored and the missing files are reported")
    imp.add_argument("--accounts", choices=ACCOUNTS_POLICIES, default=ACCOUNTS_DEFAULT_POLICY,
                     help="how the archive's users and groups apply: skip_existing (default: "
                     "present ones keep their data), replace, or none")
    imp.add_argument("--dry-run", action="store_true",
                     help="decrypt, verify and plan, change nothing; print the plan")
    imp.add_argument("--conflict", choices=CONFLICT_POLICIES, default=CONFLICT_DEFAULT_POLICY,
                     help="objects that exist already: fail (default), skip, overwrite, "
                     "new_ids (docs/BACKUP_RESTORE.md)")
    imp.add_argument("--include", action="append", metavar="PATH_OR_ID",
                     help="restore only this: /path/in/backup, folder:ID, document:ID or a "
                     "folder ID (repeatable)")
    imp.add_argument("--into", metavar="FOLDER", help="place what is restored under this "
                     "folder (its id)")
    imp.set_defaults(func=cmd_backup_import)
    cancel = commands.add_parser("backup-cancel", help="cancel a backup import")
    _connection_args(cancel)
    cancel.add_argument("task", metavar="TASK", help="the import's backup_task_id")
    cancel.set_defaults(func=cmd_backup_cancel)
    exp = commands.add_parser("backup-export", help="make a backup and download it")
    _connection_args(exp)
    exp.add_argument("--out", required=True, help="folder to write the archive and key into (existing files are "
                     "never replaced)")
    exp.add_argument("--name", help="backup name")
    exp.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    exp.add_argument("--recipient", action="append", help="make the backup for this recipient "
                     "(cfms1...; repeatable); no key file exists then")
    exp.add_argument("--passphrase-file", help="let this passphrase open the backup")
    exp.add_argument("--part", action="append", choices=BACKUP_PARTS,
                     help="include this part (repeatable; default: all; prerequisites added)")
    exp.set_defaults(func=cmd_backup_export)
    status = commands.add_parser("backup-status", help="the state of a backup import")
    _connection_args(status)
    status.add_argument("task", metavar="TASK", help="the import's backup_task_id")
    status.add_argument("--follow", action="store_true", help="wait until it ends "
                        "(exit 1 unless it completed)")
    status.add_argument("--poll", type=float, default=1.0, help="poll interval in seconds")
    status.set_defaults(func=cmd_backup_status)
    schedules.register(commands)
