"""`cfms-trio backup ...`: offline export, verification and inspection of backup archives."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ..backup.export import default_backup_name, export_store
from ..backup.format import (
    VERSION_LEGACY,
    BackupContents,
    KeyInfo,
    read_backup_archive,
    summarize_archive,
)
from ..backup.restore import check_contents, read_key_file
from ..client.files import file_sha256
from ..config import ArchiveLimits
from ..conventions import ARCHIVE_SUFFIX, KEY_SUFFIX
from ..errors import CfmsError
from ..storage import Store
from . import keys


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    database = root / "content" / "cfms.db"
    if not database.exists():
        return _fail(f"no cfms-trio store at {root} (missing content/cfms.db)")
    try:
        wrap_for = keys.wrap_targets(args.recipient, args.passphrase_file)
    except (CfmsError, ValueError, OSError) as err:
        return _fail(getattr(err, "message", None) or str(err))
    store = Store(database)
    name = args.name or default_backup_name(time.time())
    try:
        result = export_store(store, root / "content", Path(args.out), name, args.compression,
                              wrap_for=wrap_for)
    except CfmsError as err:
        return _fail(err.message)
    finally:
        store.close()
    meta = result.metadata
    print(f"archive: {result.archive_path}")
    if result.key_path is not None:
        print(f"key:     {result.key_path}")
    for recipient in result.recipients:
        print(f"opens with recipient {recipient}")
    if result.passphrase:
        print("opens with the passphrase")
    print(f"size:    {result.archive_size} bytes, sha256 {result.archive_sha256}")
    print(f"content: {meta['folders_count']} folders, {meta['documents_count']} documents, "
          f"{meta['files_count']} files, {meta['total_file_bytes']} file bytes")
    return 0


def _read_archive(archive: Path, key: Path | None, unlock) -> BackupContents:
    """Read and fully verify an archive into a throwaway staging folder, with every check an
    import would make before touching a store. `key` is a key file (or identity file); `unlock`
    holds --identity and --passphrase-file."""
    limits = ArchiveLimits()
    key_info = read_key_file(key, limits) if key is not None else unlock
    if key_info is None:
        raise CfmsError("give the key file, --identity FILE or --passphrase-file FILE")
    if key is not None and unlock is not None:
        raise CfmsError("give either a key file or --identity/--passphrase-file, not both")
    if (isinstance(key_info, KeyInfo) and key_info.archive_sha256
            and file_sha256(archive) != key_info.archive_sha256):
        raise CfmsError("archive sha256 does not match the one recorded in the key file")
    with tempfile.TemporaryDirectory(prefix="cfms-verify-") as tmp:
        with open(archive, "rb") as f:
            contents = read_backup_archive(f, key_info, Path(tmp) / "files", limits,
                                           archive_size=archive.stat().st_size)
        check_contents(contents)
    return contents


def _load(args: argparse.Namespace) -> tuple[BackupContents | None, int]:
    """The verified contents, or None and the exit code after printing why."""
    try:
        unlock = keys.unlock_from(args.identity, args.passphrase_file)
        key = Path(args.key) if args.key else None
        return _read_archive(Path(args.archive), key, unlock), 0
    except CfmsError as err:
        return None, _fail(err.message)
    except OSError as err:
        return None, _fail(f"{err.strerror}: {err.filename}")


def cmd_verify(args: argparse.Namespace) -> int:
    contents, failed = _load(args)
    if contents is None:
        return failed
    total = sum(f["size"] or 0 for f in contents.files)  # None: no content in the archive
    if contents.format_version == VERSION_LEGACY:
        checked = ("format 1.0 is not authenticated; every file's size and sha256 checked "
                   "where files.json gives them (see the warnings)")
    else:
        checked = "every segment and every file's sha256 verified"
    print(f"OK: format {contents.format_version}, {len(contents.folders)} folders, "
          f"{len(contents.documents)} documents, {len(contents.files)} files, {total} file bytes; "
          f"{checked}")
    for warning in contents.warnings:
        print(f"warning: {warning}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    contents, failed = _load(args)
    if contents is None:
        return failed
    if args.json:
        json.dump({"metadata": contents.metadata, "folders": contents.folders,
                   "documents": contents.documents, "files": contents.files,
                   "warnings": contents.warnings}, sys.stdout, indent=2)
        print()
        return 0
    print(json.dumps(contents.metadata, indent=2, sort_keys=True))
    with open(args.archive, "rb") as f:
        summary = summarize_archive(f)
    if summary.format == 3:
        print("format 3; opens with: " + "; ".join(summary.recipients))
        print(f"payload region: from byte {summary.payload_offset}, "
              f"sha256 {summary.payload_sha256}")
    files = {f["id"]: f for f in contents.files}
    children: dict = {}
    for folder in contents.folders:
        children.setdefault(folder["parent_id"], []).append(folder)
    docs: dict = {}
    for document in contents.documents:
        docs.setdefault(document["folder_id"], []).append(document)

    def show(parent, depth):
        for document in sorted(docs.get(parent, []), key=lambda d: d["title"]):
            served = [files[r["file_id"]]["size"] for r in document["revisions"]
                      if r["file_id"] not in contents.inactive_file_ids]
            current = f"{served[-1]} bytes" if served else "no content"
            print(f"{'  ' * depth}{document['title']}  ({len(document['revisions'])} "
                  f"revisions, {current})")
        for folder in sorted(children.get(parent, []), key=lambda f: f["name"]):
            print(f"{'  ' * depth}{folder['name']}/")
            show(folder["id"], depth + 1)

    print("/")
    show(None, 1)
    for warning in contents.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def register(sub) -> None:
    backup = sub.add_parser("backup", help="offline backup tools")
    commands = backup.add_subparsers(dest="backup_command", required=True)
    export = commands.add_parser("export", help="export a store to an encrypted archive")
    export.add_argument("--root", default=".", help="server root (holds content/cfms.db)")
    export.add_argument("--out", required=True,
                        help=f"folder for NAME{ARCHIVE_SUFFIX} and NAME{KEY_SUFFIX}")
    export.add_argument("--name", help="backup name (default: backup-<time>-<random>)")
    export.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    keys.add_wrap_options(export)
    export.set_defaults(func=cmd_export)
    verify = commands.add_parser("verify", help="check every segment (format 2) and file of an "
                                 "archive, as an import would")
    verify.add_argument("archive")
    verify.add_argument("key", nargs="?", help="key file (format 2 and 1.0) or identity file")
    keys.add_unlock_options(verify)
    verify.set_defaults(func=cmd_verify)
    inspect = commands.add_parser("inspect", help="show an archive's metadata and contents")
    inspect.add_argument("archive")
    inspect.add_argument("key", nargs="?", help="key file (format 2 and 1.0) or identity file")
    keys.add_unlock_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print the listings as JSON")
    inspect.set_defaults(func=cmd_inspect)
    keys.register(commands)
