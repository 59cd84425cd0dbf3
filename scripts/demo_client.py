#!/usr/bin/env python3
"""Demo of the complete backup import flow against a running cfms-trio server.

It does what BACKUP_IMPORT_FEATURE.md describes, step by step, printing each step:

  1. log in to the target server;
  2. optionally (--export-from URL) log in to a source server, generate a backup there and
     download its archive and key;
  3. initiate_backup_import on the target;
  4. upload the archive and the key with upload_file (chunked AES-GCM transfer);
  5. start_backup_import;
  6. follow progress with a progress bar, by polling get_backup_import_status every
     --poll seconds (default 2) or, with --listen, by waiting for the
     backup_import_completed event;
  7. print the final counts (exit 0 on success, 1 otherwise).

Examples (run from the repo after scripts/serve has created .venv):

  .venv/bin/python scripts/demo_client.py --server wss://127.0.0.1:5104 \\
      --cafile content/tls/cert.pem --archive b.cfms.enc --key b.key

  .venv/bin/python scripts/demo_client.py --server wss://target:5104 --insecure \\
      --export-from wss://source:5104 --source-password-file src.pw

Passwords come from --password-file, $CFMS_PASSWORD, or a prompt.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from cfms_trio.client import ClientError, ProgressBar, export_backup, open_client  # noqa: E402
from cfms_trio.conventions import FINAL_STATUSES  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="target server, e.g. wss://host:5104")
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password-file", help="file holding the target password")
    parser.add_argument("--cafile", help="certificate to trust for the target (and source)")
    parser.add_argument("--insecure", action="store_true", help="skip certificate checks")
    parser.add_argument("--archive", help="backup archive (NAME.cfms.enc) to import")
    parser.add_argument("--key", help="key file (NAME.key) of the archive")
    parser.add_argument("--export-from", metavar="URL", help="make the backup on this server first")
    parser.add_argument("--source-username", default="admin")
    parser.add_argument("--source-password-file", help="file holding the source password")
    parser.add_argument("--source-cafile", help="certificate to trust for the source")
    parser.add_argument("--timeout", type=int, default=1800, help="upload deadline in seconds")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between status polls")
    parser.add_argument("--listen", action="store_true",
                        help="wait for the backup_import_completed event instead of polling")
    args = parser.parse_args()
    if not args.export_from and not (args.archive and args.key):
        parser.error("give --archive and --key, or --export-from")
    return args


def read_password(path: str | None, who: str) -> str:
    if path:
        return Path(path).read_text().strip()
    return os.environ.get("CFMS_PASSWORD") or getpass.getpass(f"password for {who}: ")


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


async def fetch_from_source(args, out_dir: Path) -> tuple[Path, Path]:
    password = read_password(args.source_password_file, f"{args.source_username} on source")
    async with open_client(args.export_from, cafile=args.source_cafile or args.cafile,
                           insecure=args.insecure, check_certificate_first=True) as source:
        step(f"logging in to source {args.export_from}")
        await source.login(args.source_username, password)
        step("generating a backup on the source and downloading it")
        bar = ProgressBar(sys.stderr, "download ")
        archive, key, result = await export_backup(source, out_dir, progress=bar.bytes_progress)
        bar.done()
        meta = result["metadata"]
        print(f"    {meta['folders_count']} folders, {meta['documents_count']} documents, "
              f"{meta['files_count']} files")
        return archive, key


async def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="cfms-demo-") as tmp:
        if args.export_from:
            archive, key = await fetch_from_source(args, Path(tmp))
        else:
            archive, key = Path(args.archive), Path(args.key)
        password = read_password(args.password_file, args.username)
        async with open_client(args.server, cafile=args.cafile, insecure=args.insecure,
                               check_certificate_first=True) as client:
            step(f"logging in to {args.server} as {args.username}")
            await client.login(args.username, password)
            if args.listen:
                await client.listen()
            step("initiate_backup_import")
            init = await client.call("initiate_backup_import",
                                     {"timeout_seconds": args.timeout})
            task_id = init["backup_task_id"]
            print(f"    backup task {task_id}, uploads due within {init['timeout']} s")
            step(f"uploading archive {archive.name}")
            bar = ProgressBar(sys.stderr, "upload ")
            await client.upload_file(init["archive_task_id"], archive, progress=bar.bytes_progress)
            bar.done()
            step(f"uploading key {key.name}")
            await client.upload_file(init["key_task_id"], key)
            step("start_backup_import")
            started = await client.call("start_backup_import", {"backup_task_id": task_id})
            print(f"    {started['message']}")
            bar = ProgressBar(sys.stderr, "restore ")
            if args.listen:
                step("waiting for the backup_import_completed event")
                while True:
                    event = await client.next_event("backup_import_completed")
                    if event["data"]["backup_task_id"] == task_id:
                        break
            while True:
                status = await client.call("get_backup_import_status",
                                           {"backup_task_id": task_id})
                bar.show(status["progress_percent"], status["current_step"])
                if status["status"] in FINAL_STATUSES:
                    break
                await trio.sleep(args.poll)
            bar.done()
    if status["status"] != "completed":
        print(f"import {status['status']}: {status['error_message']}", file=sys.stderr)
        return 1
    print(f"import completed: {status['folders_count']} folders, "
          f"{status['documents_count']} documents, {status['files_count']} files")
    return 0


def main() -> int:
    args = parse_args()
    try:
        return trio.run(run, args)
    except ClientError as err:
        print(f"error: {err.message} (code {err.code})", file=sys.stderr)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
