"""`cfms-trio client backup-schedule add|list|rm`, `backup-list`, `backup-verify`,
`backup-prune`: the server's own backups, as docs/CLI.md describes."""

from __future__ import annotations

from pathlib import Path

from .common import (
    EXIT_REFUSED, EXIT_USAGE, Output, add_connection_args, fail, human_size, human_time, run,
    table,
)
from .keys import read_passphrase_file

KEEP_FLAGS = ("last", "daily", "weekly", "monthly")


def _target(args) -> dict:
    if not args.s3_bucket:
        if args.s3_prefix or args.s3_endpoint:
            raise ValueError("--s3-prefix and --s3-endpoint need --s3-bucket")
        return {"type": "local"}
    target = {"type": "s3", "bucket": args.s3_bucket, "prefix": args.s3_prefix or ""}
    if args.s3_endpoint:
        target["endpoint"] = args.s3_endpoint
    return target


def _where(target: dict) -> str:
    if target["type"] == "s3":
        return f"s3://{target['bucket']}/{target['prefix']}"
    return "local"


def cmd_schedule_add(args) -> int:
    try:
        target = _target(args)
    except ValueError as err:
        return fail(args, EXIT_USAGE, str(err))
    keep = {field: getattr(args, f"keep_{field}") for field in KEEP_FLAGS
            if getattr(args, f"keep_{field}") is not None}
    data = {"name": args.name, "interval_seconds": args.interval,
            "recipients": args.recipient, "compression": args.compression, "target": target}
    if keep:
        data["keep"] = keep
    if args.part:
        data["parts"] = args.part

    async def flow(client) -> Output:
        schedule = await client.call("create_backup_schedule", data)
        kept = ", ".join(f"{k} {v}" for k, v in (schedule["keep"] or {}).items()) or "all"
        return Output(schedule, f"added schedule {schedule['name']}: every "
                                f"{schedule['interval_seconds']} s to {_where(target)}, "
                                f"keeping {kept}; first run now")

    return run(args, flow)


def cmd_schedule_list(args) -> int:
    async def flow(client) -> Output:
        schedules = (await client.call("list_backup_schedules"))["schedules"]
        rows = [["SCHEDULE", "EVERY", "TARGET", "KEEP", "NEXT RUN", "LAST SUCCESS",
                 "LAST ERROR"]]
        for s in schedules:
            keep = ",".join(f"{k}={v}" for k, v in (s["keep"] or {}).items()) or "all"
            error = "-"
            if s["last_error"] and (s["last_success_time"] or 0) <= (s["last_error_time"] or 0):
                error = s["last_error"]
            rows.append([s["name"], f"{s['interval_seconds']}s", _where(s["target"]), keep,
                         human_time(s["next_run_time"]), human_time(s["last_success_time"]),
                         error])
        return Output({"schedules": schedules}, table(rows))

    return run(args, flow)


def cmd_schedule_rm(args) -> int:
    async def flow(client) -> Output:
        for name in args.names:
            await client.call("delete_backup_schedule", {"name": name})
        return Output({"removed": args.names},
                      "\n".join(f"removed schedule {n} (its backups are kept)"
                                for n in args.names))

    return run(args, flow)


def cmd_backup_list(args) -> int:
    async def flow(client) -> Output:
        data = {"schedule": args.schedule} if args.schedule else {}
        listed = (await client.call("list_backups", data))["backups"]
        rows = [["BACKUP", "SCHEDULE", "CREATED", "SIZE", "TARGET", "VERIFIED", "RESULT"]]
        for b in listed:
            result = b["verify_result"] or "-"
            if b["verify_result"] == "ok":
                result = f"ok ({b['verify_level']})"
            elif b["last_error"]:
                result = f"FAILED: {b['last_error']}"
            rows.append([b["name"], b["schedule"] or "-", human_time(b["created_time"]),
                         human_size(b["size"]), _where(b["target"]),
                         human_time(b["verified_time"]), result])
        return Output({"backups": listed}, table(rows))

    return run(args, flow)


def cmd_backup_verify(args) -> int:
    data = {"name": args.name, "deep": args.deep}
    try:
        if args.identity:
            data["identity"] = Path(args.identity).read_text()
        if args.passphrase_file:
            data["passphrase"] = read_passphrase_file(args.passphrase_file)
    except (OSError, UnicodeDecodeError) as err:
        return fail(args, EXIT_USAGE, f"cannot read {args.identity or args.passphrase_file}: "
                                      f"{getattr(err, 'strerror', None) or err}")

    async def flow(client) -> Output:
        report = await client.call("verify_backup", data)
        report.pop("backup", None)
        if report["result"] == "ok":
            lines = [f"OK: backup {report['name']} ({report['level']} check)"]
        else:
            lines = [f"FAILED: backup {report['name']}: {report['error']}"]
        lines += [f"checked: {item}" for item in report["checked"]]
        lines += [f"not checked: {item}" for item in report["not_checked"]]
        return Output(report, "\n".join(lines), 0 if report["result"] == "ok" else EXIT_REFUSED)

    return run(args, flow)


def cmd_backup_prune(args) -> int:
    async def flow(client) -> Output:
        data = {"dry_run": args.dry_run}
        if args.schedule:
            data["schedule"] = args.schedule
        result = await client.call("prune_backups", data)
        verb = "would prune" if args.dry_run else "pruned"
        lines = [f"{verb} {name}" for name in result["pruned"]] or [f"{verb} nothing"]
        lines += [f"error: {e}" for e in result["errors"]]
        return Output(result, "\n".join(lines), EXIT_REFUSED if result["errors"] else 0)

    return run(args, flow)


def register(commands) -> None:
    schedule = commands.add_parser("backup-schedule", help="backups the server makes by itself")
    actions = schedule.add_subparsers(dest="schedule_command", required=True)
    add = actions.add_parser("add", help="add a schedule (its first run starts at once)")
    add_connection_args(add)
    add.add_argument("name", metavar="NAME")
    add.add_argument("--interval", type=int, required=True, metavar="SECONDS",
                     help="seconds between two backups (at least 1)")
    add.add_argument("--recipient", action="append", required=True,
                     help="make every backup for this recipient (cfms1...; repeatable)")
    for field in KEEP_FLAGS:
        add.add_argument(f"--keep-{field}", type=int, metavar="N",
                         help=f"retention: keep the {field} N verified backups"
                         if field == "last" else
                         f"retention: keep the newest backup of each of the last N "
                         f"{ {'daily': 'days', 'weekly': 'weeks', 'monthly': 'months'}[field]}")
    add.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    add.add_argument("--part", action="append", help="a part to back up (repeatable; "
                     "default every part)")
    add.add_argument("--s3-bucket", help="store the backups in this S3 bucket (default: the "
                     "server's backups folder)")
    add.add_argument("--s3-prefix", help="key prefix inside the bucket")
    add.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (default: "
                     "the server's --s3-endpoint, else $AWS_ENDPOINT_URL on the server)")
    add.set_defaults(func=cmd_schedule_add)
    listing = actions.add_parser("list", help="the schedules and how their last runs went")
    add_connection_args(listing)
    listing.set_defaults(func=cmd_schedule_list)
    remove = actions.add_parser("rm", help="remove schedules (their backups are kept)")
    add_connection_args(remove)
    remove.add_argument("names", nargs="+", metavar="NAME")
    remove.set_defaults(func=cmd_schedule_rm)

    backups = commands.add_parser("backup-list", help="every backup the server knows")
    add_connection_args(backups)
    backups.add_argument("--schedule", help="only this schedule's backups")
    backups.set_defaults(func=cmd_backup_list)
    verify = commands.add_parser("backup-verify", help="check a stored backup where it lives "
                                 "(exit 1 if it fails)")
    add_connection_args(verify)
    verify.add_argument("name", metavar="NAME")
    verify.add_argument("--deep", action="store_true", help="also restore it into a throw-away "
                        "database on the server (needs --identity for recipient backups)")
    verify.add_argument("--identity", metavar="F", help="identity file of a recipient (sent "
                        "to the server over TLS, used in memory only)")
    verify.add_argument("--passphrase-file", metavar="F", help="the backup's passphrase")
    verify.set_defaults(func=cmd_backup_verify)
    prune = commands.add_parser("backup-prune", help="apply the schedules' retention policies")
    add_connection_args(prune)
    prune.add_argument("--dry-run", action="store_true", help="only say what would be pruned")
    prune.add_argument("--schedule", help="only this schedule")
    prune.set_defaults(func=cmd_backup_prune)
