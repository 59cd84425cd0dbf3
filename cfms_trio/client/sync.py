"""Copying between local files and the server: `put` (files and folders, recursively) and `get`.

`put` works like `cp -r`: into an existing folder each source keeps its name; a missing
destination is created as the copy of the one source. An existing document gets a new revision,
unless its current content already has the same sha256 (then nothing is sent), so a second
`put` of the same tree is cheap. A document created for a file whose upload then fails is
deleted again.

`get` refuses, before writing anything, names from the server that cannot be local file names
and local files that already exist (unless `force`: then each file is replaced atomically once
its download is complete). Documents that have no content yet are skipped and reported.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Callable

import trio

from .connection import Client, ClientError, Progress
from .files import file_sha256, unlink_if_present
from .remote import (
    DOCUMENT, FOLDER, Node, is_missing, join, list_folder, resolve, resolve_parent, walk,
)

Report = Callable[[dict], None]  # called with each outcome as it happens


@dataclasses.dataclass
class LocalTree:
    """What one local source holds: folders (relative parts) and files (parts, path, size)."""

    source: Path
    is_folder: bool
    folders: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    files: list[tuple[tuple[str, ...], Path, int]] = dataclasses.field(default_factory=list)
    skipped: list[Path] = dataclasses.field(default_factory=list)


def scan_local(source: Path) -> LocalTree:
    """The folders and regular files under `source` (links to files are followed, links to
    folders and special files are skipped), in name order."""
    if not source.is_dir():
        return LocalTree(source, False, files=[((), source, source.stat().st_size)])
    tree = LocalTree(source, True)
    for folder, dirs, files in os.walk(source, followlinks=False):
        here = Path(folder)
        parts = here.relative_to(source).parts
        dirs.sort()
        for name in list(dirs):
            if (here / name).is_symlink():
                dirs.remove(name)
                tree.skipped.append(here / name)
        tree.folders.extend(parts + (name,) for name in dirs)
        for name in sorted(files):
            path = here / name
            if path.is_file():
                tree.files.append((parts + (name,), path, path.stat().st_size))
            else:
                tree.skipped.append(path)
    return tree


class _Uploader:
    """Carries out a put: folder listings cached, progress counted over all files."""

    def __init__(self, client: Client, total_bytes: int, progress: Progress | None,
                 report: Report | None):
        self.client = client
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.progress = progress
        self.report = report or (lambda outcome: None)
        self.listings: dict[str | None, dict] = {}

    async def listing(self, folder: Node) -> dict:
        if folder.id not in self.listings:
            self.listings[folder.id] = await list_folder(self.client, folder.id)
        return self.listings[folder.id]

    async def folder(self, parent: Node, name: str) -> Node:
        """The folder `name` in `parent`, created when missing."""
        listing = await self.listing(parent)
        existing = next((f for f in listing["folders"] if f["name"] == name), None)
        if existing:
            return Node(FOLDER, existing["id"], name, join(parent.path, name), existing)
        made = await self.client.call("create_directory", {"name": name, "parent_id": parent.id})
        listing["folders"].append(made)
        self.listings[made["id"]] = {"folders": [], "documents": []}
        node = Node(FOLDER, made["id"], name, join(parent.path, name), made)
        self.report({"action": "mkdir", "remote": node.path, "id": node.id})
        return node

    def _advance(self, done: int, total: int) -> None:
        if self.progress:
            self.progress(self.done_bytes + done, self.total_bytes)

    async def _send(self, task_id: str, path: Path) -> dict:
        result = await self.client.upload_file(task_id, path, progress=self._advance)
        return result

    async def file(self, parent: Node, name: str, path: Path, size: int,
                   document: Node | None = None) -> None:
        """Upload `path` as the document `name` in `parent` (or as a new revision of
        `document`)."""
        remote = join(parent.path, name) if document is None else document.path
        if document is None:
            listing = await self.listing(parent)
            entry = next((d for d in listing["documents"] if d["title"] == name), None)
            if entry:
                document = Node(DOCUMENT, entry["id"], name, remote, entry)
        if document is not None:
            info = await self.client.call("get_document_info", {"document_id": document.id})
            current = info["current_revision"]
            if current and current["size"] == size and current["sha256"] == (
                    await trio.to_thread.run_sync(file_sha256, path)):
                action, result = "unchanged", {"size": size, "sha256": current["sha256"]}
            else:
                task = await self.client.call("upload_document", {"document_id": document.id})
                result = await self._send(task["task_id"], path)
                action = "revised"
            document_id = document.id
        else:
            task = await self.client.call("create_document", {"title": name,
                                                              "folder_id": parent.id})
            document_id = task["document_id"]
            try:
                result = await self._send(task["task_id"], path)
            except BaseException:
                with trio.move_on_after(10) as scope:
                    scope.shield = True
                    try:
                        await self.client.call("delete_document", {"document_id": document_id})
                    except Exception:  # the connection may be what failed
                        pass
                raise
            listing["documents"].append({"id": document_id, "title": name})
            action = "created"
        self.done_bytes += size
        self._advance(0, 0)
        self.report({"action": action, "local": str(path), "remote": remote, "id": document_id,
                     "size": result["size"], "sha256": result["sha256"]})


async def put(client: Client, sources: list[Path], destination: str,
              progress: Progress | None = None, report: Report | None = None) -> list[Path]:
    """Upload files and folders to `destination` (see the module text); returns the local
    entries that were skipped (links to folders, special files)."""
    trees = [await trio.to_thread.run_sync(scan_local, source) for source in sources]
    try:
        target: Node | None = await resolve(client, destination)
    except ClientError as err:
        if not is_missing(err):
            raise
        target = None
    placements: list[tuple[Node, str, LocalTree]] = []
    revise: Node | None = None
    if target is not None and target.kind == FOLDER:
        placements = [(target, tree.source.name, tree) for tree in trees]
    else:
        if len(trees) != 1:
            raise ClientError(0, f"{destination} is not a folder; several sources need a "
                                 "folder to go into")
        if target is not None:
            if trees[0].is_folder:
                raise ClientError(0, f"{destination} is a document; a folder cannot replace it")
            revise = target
            parent = None
        else:
            parent, name = await resolve_parent(client, destination)
            placements = [(parent, name, trees[0])]
    total = sum(size for tree in trees for _, _, size in tree.files)
    uploader = _Uploader(client, total, progress, report)
    uploader._advance(0, 0)
    if revise is not None:
        _, path, size = trees[0].files[0]
        await uploader.file(None, revise.name, path, size, document=revise)
    for parent, name, tree in placements:
        if not tree.is_folder:
            _, path, size = tree.files[0]
            await uploader.file(parent, name, path, size)
            continue
        top = await uploader.folder(parent, name)
        nodes = {(): top}
        for parts in tree.folders:
            nodes[parts] = await uploader.folder(nodes[parts[:-1]], parts[-1])
        for parts, path, size in tree.files:
            await uploader.file(nodes[parts[:-1]], parts[-1], path, size)
    return [path for tree in trees for path in tree.skipped]


# -- get ------------------------------------------------------------------------------------

def local_name(name: str, where: str) -> str:
    """A server name used as a local file name, refused when it is not one plain name."""
    if name in ("", ".", "..") or "/" in name or "\0" in name or os.sep in name:
        raise ClientError(0, f"the name {name!r} in {where} cannot be a local file name; "
                             "nothing was written (get it by id into a named file: "
                             "get id:ID FILE)")
    return name


@dataclasses.dataclass
class Download:
    document: Node
    target: Path
    size: int


async def plan_get(client: Client, remote: str, local: Path | None,
                   revision: str | None = None) -> tuple[list[Path], list[Download], list[str]]:
    """(local folders to make, downloads, remote documents skipped for having no content)."""
    node = await resolve(client, remote)
    if node.kind == DOCUMENT:
        if local is None:
            target = Path(local_name(node.name, node.path))
        elif await trio.to_thread.run_sync(local.is_dir):
            target = local / local_name(node.name, node.path)
        else:
            target = local
        size = node.info.get("size") or 0
        return [], [Download(node, target, size)], []
    if revision is not None:
        raise ClientError(0, f"{remote} is a folder; --revision needs a document")
    if local is None:
        if node.is_root:
            raise ClientError(0, "name a local folder to download the root into")
        top = Path(local_name(node.name, node.path))
    elif await trio.to_thread.run_sync(local.is_dir):
        top = local if node.is_root else local / local_name(node.name, node.path)
    else:
        top = local
    folders: list[Path] = []
    downloads: list[Download] = []
    skipped: list[str] = []
    places = {node.path: top}
    async for folder, listing in walk(client, node):
        here = places[folder.path]
        folders.append(here)
        for entry in listing["folders"]:
            places[join(folder.path, entry["name"])] = here / local_name(entry["name"],
                                                                         folder.path)
        for entry in listing["documents"]:
            path = join(folder.path, entry["title"])
            if entry["size"] is None:
                skipped.append(path)
                continue
            downloads.append(Download(Node(DOCUMENT, entry["id"], entry["title"], path, entry),
                                      here / local_name(entry["title"], folder.path),
                                      entry["size"]))
    return folders, downloads, skipped


def _conflicts(folders: list[Path], downloads: list[Download], force: bool) -> str | None:
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            return f"{folder} exists and is not a folder"
    for item in downloads:
        if item.target.is_dir():
            return f"{item.target} is a folder"
        if item.target.exists() and not force:
            return f"{item.target} already exists; not overwriting it (--force replaces it)"
    return None


async def get(client: Client, remote: str, local: Path | None, *, revision: str | None = None,
              force: bool = False, progress: Progress | None = None,
              report: Report | None = None) -> list[str]:
    """Download a document or a folder tree (see the module text); returns the remote paths
    of documents skipped for having no content."""
    folders, downloads, skipped = await plan_get(client, remote, local, revision)
    problem = await trio.to_thread.run_sync(_conflicts, folders, downloads, force)
    if problem:
        raise ClientError(0, problem)
    total = sum(item.size for item in downloads)
    done = 0

    def advance(part: int, _total: int) -> None:
        if progress:
            progress(done + part, total)

    advance(0, 0)
    for folder in folders:
        await trio.to_thread.run_sync(lambda: folder.mkdir(parents=True, exist_ok=True))
    for item in downloads:
        request = {"document_id": item.document.id}
        if revision is not None:
            request["revision_id"] = revision
        task = await client.call("get_document", request)
        if force:
            partial = item.target.with_name(f".{item.target.name}.{secrets.token_hex(4)}.part")
            try:
                result = await client.download_file(task["task_id"], partial, progress=advance,
                                                    exclusive=True)
                await trio.to_thread.run_sync(os.replace, partial, item.target)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(unlink_if_present, partial)
        else:
            result = await client.download_file(task["task_id"], item.target, progress=advance,
                                                exclusive=True)
        done += task["file_size"]
        advance(0, 0)
        if report:
            report({"action": "downloaded", "remote": item.document.path,
                    "local": str(item.target), "id": item.document.id,
                    "revision_id": task["revision_id"], "size": result["size"],
                    "sha256": result["sha256"]})
    return skipped
