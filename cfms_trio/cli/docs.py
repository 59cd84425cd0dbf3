"""`cfms-trio client ls|mkdir|put|get|mv|rm|revisions|rules`: documents and folders by path.

Paths are resolved by `client.remote` (docs/CLI.md): `/` is the root, `id:<id>` names an object
by id, a trailing `/` picks the folder when a folder and a document share a name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from ..client import ClientError
from ..client.remote import (
    DOCUMENT, FOLDER, ROOT, Node, is_missing, join, list_folder, resolve, resolve_parent, split,
    walk,
)
from ..client.sync import get, put
from .common import (
    EXIT_USAGE, Output, add_connection_args, fail, human_size, human_time, progress_bar, run,
    table,
)


def _entries(listing: dict, folder: Node) -> list[dict]:
    """A listing as one list of entries, folders first."""
    out = [{"kind": FOLDER, "name": f["name"], "id": f["id"], "path": join(folder.path, f["name"]),
            "created_time": f["created_time"], "size": None, "last_modified": None}
           for f in listing["folders"]]
    out += [{"kind": DOCUMENT, "name": d["title"], "id": d["id"],
             "path": join(folder.path, d["title"]), "created_time": d["created_time"],
             "size": d["size"], "last_modified": d["last_modified"]}
            for d in listing["documents"]]
    return out


def _line(entry: dict, long: bool, indent: str = "") -> str | list[str]:
    name = entry["name"] + ("/" if entry["kind"] == FOLDER else "")
    if not long:
        return indent + name
    # The kind column reads as `ls -l` does: `d` a folder (a directory), `-` a document.
    return ["d" if entry["kind"] == FOLDER else "-", human_size(entry["size"]),
            human_time(entry["last_modified"] or entry["created_time"]), entry["id"],
            indent + name]


def cmd_ls(args) -> int:
    async def flow(client) -> Output:
        node = await resolve(client, args.path)
        if node.kind == DOCUMENT:
            info = node.info if "size" in node.info else None
            if info is None:
                listing = await list_folder(client, node.info.get("folder_id"))
                info = next(d for d in listing["documents"] if d["id"] == node.id)
            entry = {"kind": DOCUMENT, "name": node.name, "id": node.id, "path": node.path,
                     "created_time": info["created_time"], "size": info["size"],
                     "last_modified": info["last_modified"]}
            line = _line(entry, args.long)
            return Output({"path": node.path, "entries": [entry]},
                          table([line]) if args.long else line)
        if not args.tree:
            entries = _entries(await list_folder(client, node.id), node)
            lines = [_line(e, args.long) for e in entries]
            return Output({"path": node.path, "id": node.id, "entries": entries},
                          table(lines) if args.long else "\n".join(lines))
        flat, lines = [], []
        depth_of = {node.path: 0}
        async for folder, listing in walk(client, node):
            depth = depth_of[folder.path]
            entries = _entries(listing, folder)
            for entry in entries:
                entry["depth"] = depth
                flat.append(entry)
                if entry["kind"] == FOLDER:
                    depth_of[entry["path"]] = depth + 1
        # walk yields each folder's listing before its children's: order the lines as a tree
        children: dict[str, list[dict]] = {}
        for entry in flat:
            children.setdefault(entry["path"].rsplit("/", 1)[0] or "/", []).append(entry)

        def emit(path: str, depth: int) -> None:
            for entry in children.get(path, []):
                lines.append(_line(entry, args.long, "  " * depth))
                if entry["kind"] == FOLDER:
                    emit(entry["path"], depth + 1)

        emit(node.path.rstrip("/") or "/", 0)
        text = table(lines) if args.long else "\n".join(lines)
        return Output({"path": node.path, "id": node.id, "entries": flat},
                      f"{node.path}\n{text}" if text else node.path)

    return run(args, flow)


async def _mkdir(client, path: str, parents: bool) -> tuple[Node, bool]:
    """The folder at `path`, made now (True) or already there with -p (False)."""
    if parents:
        parent = ROOT
        start, parts, _ = split(path)
        if start is not None:
            parent = await resolve(client, f"id:{start}", want=FOLDER)
        made = False
        for name in parts:
            listing = await list_folder(client, parent.id)
            existing = next((f for f in listing["folders"] if f["name"] == name), None)
            if existing:
                parent = Node(FOLDER, existing["id"], name, join(parent.path, name), existing)
                made = False
                continue
            info = await client.call("create_directory", {"name": name, "parent_id": parent.id})
            parent = Node(FOLDER, info["id"], name, join(parent.path, name), info)
            made = True
        return parent, made
    parent, name = await resolve_parent(client, path)
    if name is None:
        raise ClientError(0, f"{path} already exists")
    info = await client.call("create_directory", {"name": name, "parent_id": parent.id})
    return Node(FOLDER, info["id"], name, join(parent.path, name), info), True


def cmd_mkdir(args) -> int:
    async def flow(client) -> Output:
        results = []
        for path in args.paths:
            node, made = await _mkdir(client, path, args.parents)
            results.append({"path": node.path, "id": node.id, "created": made})
        return Output({"folders": results},
                      "\n".join(f"{'made' if r['created'] else 'exists'} {r['path']}"
                                for r in results))

    return run(args, flow)


def _reporter(args, outcomes: list[dict]):
    def report(outcome: dict) -> None:
        outcomes.append(outcome)
        if sys.stderr.isatty() and not args.json:  # a running account above the progress bar
            target = outcome.get("local") if outcome["action"] == "downloaded" else outcome["remote"]
            sys.stderr.write(f"\r{outcome['action']:10} {target}".ljust(80) + "\n")
    return report


def _summary(outcomes: list[dict], skipped: list[str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome["action"]] = counts.get(outcome["action"], 0) + 1
    total = sum(o.get("size", 0) or 0 for o in outcomes if o["action"] != "mkdir")
    labels = {"mkdir": "folders made"}
    parts = [f"{n} {labels.get(action, action)}" for action, n in sorted(counts.items())] \
        or ["nothing to do"]
    text = ", ".join(parts) + f" ({human_size(total)})"
    for path in skipped:
        text += f"\nskipped {path}"
    return text


def cmd_put(args) -> int:
    sources = [Path(p) for p in args.local]
    for source in sources:
        if not source.exists():
            return fail(args, EXIT_USAGE, f"{source}: no such file or folder")

    async def flow(client) -> Output:
        bar = progress_bar(args, "upload ")
        outcomes: list[dict] = []
        skipped = await put(client, sources, args.remote, progress=bar.bytes_progress,
                            report=_reporter(args, outcomes))
        bar.done()
        return Output({"results": outcomes, "skipped": [str(p) for p in skipped]},
                      _summary(outcomes, [str(p) for p in skipped]))

    return run(args, flow)


def cmd_get(args) -> int:
    async def flow(client) -> Output:
        bar = progress_bar(args, "download ")
        outcomes: list[dict] = []
        skipped = await get(client, args.remote, Path(args.local) if args.local else None,
                            revision=args.revision, force=args.force,
                            progress=bar.bytes_progress, report=_reporter(args, outcomes))
        bar.done()
        return Output({"results": outcomes, "skipped": skipped},
                      _summary(outcomes, [f"{p} (no content yet)" for p in skipped]))

    return run(args, flow)


def cmd_mv(args) -> int:
    async def flow(client) -> Output:
        source = await resolve(client, args.source)
        if source.is_root:
            raise ClientError(0, "the root cannot be moved")
        try:
            destination: Node | None = await resolve(client, args.destination, want=FOLDER)
        except ClientError as err:
            if not is_missing(err):
                raise
            destination = None
        if destination is not None:
            parent, name = destination, source.name
        else:
            parent, name = await resolve_parent(client, args.destination)
            if name is None:
                raise ClientError(0, f"{args.destination} is not a folder")
        kind, key = (("directory", "folder_id") if source.kind == FOLDER
                     else ("document", "document_id"))
        old_parent = (source.info.get("parent_id") if source.kind == FOLDER
                      else source.info.get("folder_id"))
        if name != source.name:
            field = "name" if source.kind == FOLDER else "title"
            await client.call(f"rename_{kind}", {key: source.id, field: name})
        if parent.id != old_parent:
            move_field = "parent_id" if source.kind == FOLDER else "folder_id"
            try:
                await client.call(f"move_{kind}", {key: source.id, move_field: parent.id})
            except ClientError:
                if name != source.name:  # put the old name back: all or nothing
                    field = "name" if source.kind == FOLDER else "title"
                    await client.call(f"rename_{kind}", {key: source.id, field: source.name})
                raise
        path = join(parent.path, name)
        return Output({"from": source.path, "to": path, "id": source.id, "kind": source.kind},
                      f"moved {source.path} -> {path}")

    return run(args, flow)


def cmd_rm(args) -> int:
    async def flow(client) -> Output:
        nodes = [await resolve(client, path) for path in args.paths]
        for node in nodes:
            if node.is_root:
                raise ClientError(0, "the root cannot be removed")
            if node.kind == FOLDER and not args.recursive:
                raise ClientError(0, f"{node.path} is a folder; rm -r removes it with "
                                     "everything in it")
        removed = []
        for node in nodes:
            if node.kind == FOLDER:
                await client.call("delete_directory", {"folder_id": node.id})
            else:
                await client.call("delete_document", {"document_id": node.id})
            removed.append({"path": node.path, "id": node.id, "kind": node.kind})
        return Output({"removed": removed}, "\n".join(f"removed {r['path']}" for r in removed))

    return run(args, flow)


def cmd_revisions(args) -> int:
    async def flow(client) -> Output:
        node = await resolve(client, args.path, want=DOCUMENT)
        data = await client.call("list_revisions", {"document_id": node.id})
        current = next((r["id"] for r in reversed(data["revisions"]) if r["active"]), None)
        rows = [[("* " if r["id"] == current else "  ") + r["id"], human_time(r["created_time"]),
                 human_size(r["size"]), (r["sha256"] or "")[:16] if r["active"]
                 else "(no content)"]
                for r in data["revisions"]]
        return Output({"path": node.path, "document_id": node.id, "current_revision_id": current,
                       "revisions": data["revisions"]}, table(rows))

    return run(args, flow)


def _rules_call(node: Node, setting: bool) -> tuple[str, dict]:
    if node.is_root:
        raise ClientError(0, "the root has no access rules")
    if node.kind == FOLDER:
        return ("set_directory_rules" if setting else "get_directory_access_rules",
                {"folder_id": node.id})
    return ("set_document_rules" if setting else "get_document_access_rules",
            {"document_id": node.id})


def cmd_rules_show(args) -> int:
    async def flow(client) -> Output:
        node = await resolve(client, args.path)
        action, data = _rules_call(node, False)
        rules = (await client.call(action, data))["access_rules"]
        return Output({"path": node.path, "id": node.id, "access_rules": rules},
                      json.dumps(rules, indent=2, sort_keys=True))

    return run(args, flow)


def _read_rules(source: str) -> dict:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as err:
        raise ClientError(0, f"cannot read the rules: {err.strerror}: {source}") from None
    try:
        rules = json.loads(text)
    except ValueError as err:
        raise ClientError(0, f"the rules in {source} are not JSON: {err}") from None
    if not isinstance(rules, dict):
        raise ClientError(0, f"the rules in {source} must be a JSON object such as "
                             '{"read": [...]}')
    return rules


def cmd_rules_set(args) -> int:
    async def flow(client) -> Output:
        rules = await trio.to_thread.run_sync(_read_rules, args.rules)
        node = await resolve(client, args.path)
        action, data = _rules_call(node, True)
        saved = (await client.call(action, dict(data, access_rules=rules)))["access_rules"]
        return Output({"path": node.path, "id": node.id, "access_rules": saved},
                      f"rules of {node.path} set ({', '.join(sorted(saved)) or 'none: open to every user'})")

    return run(args, flow)


def register(commands) -> None:
    def command(name: str, func, help_text: str):
        parser = commands.add_parser(name, help=help_text)
        add_connection_args(parser)
        parser.set_defaults(func=func)
        return parser

    ls = command("ls", cmd_ls, "list a folder (or show a document)")
    ls.add_argument("path", nargs="?", default="/")
    ls.add_argument("-l", "--long", action="store_true", help="kind, size, time and id")
    ls.add_argument("--tree", action="store_true", help="everything below, as a tree")
    mkdir = command("mkdir", cmd_mkdir, "make folders")
    mkdir.add_argument("paths", nargs="+", metavar="PATH")
    mkdir.add_argument("-p", "--parents", action="store_true",
                       help="make missing parents; an existing folder is fine")
    put_ = command("put", cmd_put, "upload files and folders (recursively)")
    put_.add_argument("local", nargs="+", metavar="LOCAL")
    put_.add_argument("remote", metavar="REMOTE")
    get_ = command("get", cmd_get, "download a document or a folder (recursively)")
    get_.add_argument("remote", metavar="REMOTE")
    get_.add_argument("local", nargs="?", metavar="LOCAL")
    get_.add_argument("--revision", metavar="ID", help="that revision of the document")
    get_.add_argument("--force", action="store_true", help="replace existing local files")
    mv = command("mv", cmd_mv, "move or rename a folder or document")
    mv.add_argument("source", metavar="SOURCE")
    mv.add_argument("destination", metavar="DEST")
    rm = command("rm", cmd_rm, "remove documents (and folders with -r)")
    rm.add_argument("paths", nargs="+", metavar="PATH")
    rm.add_argument("-r", "--recursive", action="store_true", help="remove folders and all "
                    "they hold")
    revisions = command("revisions", cmd_revisions, "list a document's revisions "
                        "(* marks the current one)")
    revisions.add_argument("path", metavar="PATH")
    rules = commands.add_parser("rules", help="show or set access rules")
    rule_commands = rules.add_subparsers(dest="rules_command", required=True)
    show = rule_commands.add_parser("show", help="print the rules of a folder or document")
    add_connection_args(show)
    show.add_argument("path", metavar="PATH")
    show.set_defaults(func=cmd_rules_show)
    set_ = rule_commands.add_parser("set", help="replace the rules (from a JSON file, '-' for "
                                    "stdin; {} removes them)")
    add_connection_args(set_)
    set_.add_argument("path", metavar="PATH")
    set_.add_argument("rules", metavar="RULES_JSON_FILE")
    set_.set_defaults(func=cmd_rules_set)
