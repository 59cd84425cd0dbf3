"""`cfms-trio backup ...`: offline export, verification and inspection of backup archives."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..backup.export import default_backup_name, export_store
from ..backup.format import (
    LISTING_KINDS,
    PART_OF_KIND,
    VERSION_LEGACY,
    KeyInfo,
    summarize_archive,
)
from ..backup.restore import checked_archive, read_key_file
from ..client.files import file_sha256
from ..config import ArchiveLimits
from ..conventions import ARCHIVE_SUFFIX, KEY_SUFFIX
from ..errors import CfmsError
from ..storage import Store
from ..storage.backends import parse_database_url, sqlite_at
from . import keys


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    database = root / "content" / "cfms.db"
    if args.database:
        try:
            location = parse_database_url(args.database)
        except ValueError as err:
            return _fail(f"--database: {err}")
    elif not database.exists():
        return _fail(f"no cfms-trio store at {root} (missing content/cfms.db; a store on "
                     "PostgreSQL needs --database)")
    else:
        location = sqlite_at(database)
    try:
        wrap_for = keys.wrap_targets(args.recipient, args.passphrase_file)
    except (CfmsError, ValueError, OSError) as err:
        return _fail(getattr(err, "message", None) or str(err))
    store = Store(location)
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


@contextlib.contextmanager
def _read_archive(archive: Path, key: Path | None, unlock) -> Iterator[tuple]:
    """Read and fully verify an archive into a throwaway staging folder and staging index,
    with every check an import makes before touching a store; yields (contents, index).
    `key` is a key file (or identity file); `unlock` holds --identity and --passphrase-file."""
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
        with open(archive, "rb") as f, checked_archive(
                f, key_info, Path(tmp) / "files", limits,
                archive_size=archive.stat().st_size) as checked:
            yield checked


def _run(args: argparse.Namespace, show) -> int:
    """`show(contents, index)` on the verified archive, or the exit code after saying why."""
    try:
        unlock = keys.unlock_from(args.identity, args.passphrase_file)
        key = Path(args.key) if args.key else None
        with _read_archive(Path(args.archive), key, unlock) as (contents, index):
            return show(contents, index)
    except CfmsError as err:
        return _fail(err.message)
    except OSError as err:
        return _fail(f"{err.strerror}: {err.filename}")


def _parts_line(contents) -> str:
    counts = contents.counts
    described = {
        "accounts": f"accounts ({counts.get('users', 0)} users, {counts.get('groups', 0)} "
                    "groups)",
        "documents": f"documents ({counts.get('folders', 0)} folders, "
                     f"{counts.get('documents', 0)} documents, {counts.get('files', 0)} files, "
                     f"{contents.total_file_bytes} file bytes)",
        "audit": f"audit ({counts.get('audit', 0)} entries)",
    }
    return "parts: " + "; ".join(described[part] for part in contents.parts)


def cmd_verify(args: argparse.Namespace) -> int:
    def show(contents, index) -> int:
        counts = contents.counts
        if contents.format_version == VERSION_LEGACY:
            checked = ("format 1.0 is not authenticated; every file's size and sha256 checked "
                       "where files.json gives them (see the warnings)")
        else:
            checked = "every segment and every file's sha256 verified"
        print(f"OK: format {contents.format_version}, {counts.get('folders', 0)} folders, "
              f"{counts.get('documents', 0)} documents, {counts.get('files', 0)} files, "
              f"{contents.total_file_bytes} file bytes; {checked}")
        print(_parts_line(contents))
        for warning in contents.warnings:
            print(f"warning: {warning}")
        return 0

    return _run(args, show)


def cmd_inspect(args: argparse.Namespace) -> int:
    def show(contents, index) -> int:
        if args.json:
            _print_listings(contents, index)
            return 0
        print(json.dumps(contents.metadata, indent=2, sort_keys=True))
        with open(args.archive, "rb") as f:
            summary = summarize_archive(f)
        if summary.format == 3:
            print("format 3; opens with: " + "; ".join(summary.recipients))
            print(f"payload region: from byte {summary.payload_offset}, "
                  f"sha256 {summary.payload_sha256}")
        if "documents" in contents.parts:
            print("/")
            _show_tree(index, None, 1, contents.inactive_file_ids)
        print(_parts_line(contents))
        for warning in contents.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 0

    return _run(args, show)


def _print_listings(contents, index) -> None:
    """`inspect --json`: one JSON object with the metadata, every listing the archive holds in
    its listing shape and order (users without password hashes), and the warnings. Written one
    entry per line as it is read from the index, so a large archive is never held whole."""
    out = sys.stdout
    out.write('{\n"metadata": ' + json.dumps(contents.metadata))
    for kind in LISTING_KINDS:
        if PART_OF_KIND[kind] not in contents.parts:
            continue
        out.write(f',\n"{kind}": [')
        for number, record in enumerate(index.listing(kind)):
            out.write(("," if number else "") + "\n  " + json.dumps(record))
        out.write("\n]")
    out.write(',\n"warnings": ' + json.dumps(contents.warnings) + "\n}\n")


def _show_tree(index, parent, depth: int, inactive_file_ids: set[str]) -> None:
    """The folder tree; a document shows its revision count and the size of its newest
    revision with content (legacy archives: inactive files have none)."""
    folders, documents = index.children(parent)
    for document_id, title, revisions, size in documents:
        if inactive_file_ids:
            served = [size for file_id, size in index.revision_files(document_id)
                      if file_id not in inactive_file_ids]
            size = served[-1] if served else None
        current = f"{size} bytes" if size is not None else "no content"
        print(f"{'  ' * depth}{title}  ({revisions} revisions, {current})")
    for folder_id, name in folders:
        print(f"{'  ' * depth}{name}/")
        _show_tree(index, folder_id, depth + 1, inactive_file_ids)


def register(sub) -> None:
    backup = sub.add_parser("backup", help="offline backup tools")
    commands = backup.add_subparsers(dest="backup_command", required=True)
    export = commands.add_parser("export", help="export a store to an encrypted archive")
    export.add_argument("--root", default=".", help="server root (holds content/cfms.db)")
    export.add_argument("--database", metavar="URL",
                        help="the server's database when it is not content/cfms.db "
                             "(postgresql://USER@HOST:PORT/DB, as given to serve)")
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
