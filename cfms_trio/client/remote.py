"""Remote paths: naming folders and documents by path instead of by id.

Syntax (docs/CLI.md):

- `/` is the root; `/a/b/c` walks folder `a`, folder `b`, then `c`. A path without a leading `/`
  starts at the root too. Empty components (`//`) are ignored; every other component is taken
  literally (there is no `.` or `..`).
- `id:<id>` names a folder or document by its id, and `id:<folder id>/rest` walks on from there.
- The last component is a folder or a document. A folder and a document may share a name
  (the server keeps names unique per kind); such a path is ambiguous and refused, unless it
  ends in `/` (then it is the folder) or the caller says which kind it wants; the error names
  the document's id so it can be given as `id:<id>`.
- Names containing `/` cannot be written as a path; use their id.
"""

from __future__ import annotations

import dataclasses

from .connection import Client, ClientError

ID_PREFIX = "id:"
FOLDER = "folder"
DOCUMENT = "document"
NOT_FOUND = 404


@dataclasses.dataclass(frozen=True)
class Node:
    """A resolved folder, document or the root (kind folder, id None)."""

    kind: str
    id: str | None
    name: str
    path: str
    info: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def is_root(self) -> bool:
        return self.kind == FOLDER and self.id is None


ROOT = Node(FOLDER, None, "", "/")


def join(parent_path: str, name: str) -> str:
    return parent_path.rstrip("/") + "/" + name


class PathNotFound(ClientError):
    """A path names nothing (found by the client while walking it, so its code is 0)."""

    def __init__(self, message: str):
        super().__init__(0, message)


def is_missing(err: ClientError) -> bool:
    """True when `err` says the object does not exist (our walk, or the server's 404)."""
    return isinstance(err, PathNotFound) or err.code == NOT_FOUND


def not_found(message: str) -> ClientError:
    return PathNotFound(message)


async def list_folder(client: Client, folder_id: str | None) -> dict:
    return await client.call("list_directory", {"folder_id": folder_id})


async def node_by_id(client: Client, object_id: str) -> Node:
    """The folder or document with this id (a folder first), with its full path."""
    try:
        info = await client.call("get_directory_info", {"folder_id": object_id})
        return Node(FOLDER, info["id"], info["name"], info["path"], info)
    except ClientError as err:
        if err.code != NOT_FOUND:
            raise
    try:
        info = await client.call("get_document_info", {"document_id": object_id})
    except ClientError as err:
        if err.code != NOT_FOUND:
            raise
        raise not_found(f"no folder or document has the id {object_id!r}") from None
    parent = "/"
    if info["folder_id"] is not None:
        parent = (await client.call("get_directory_info", {"folder_id": info["folder_id"]}))["path"]
    return Node(DOCUMENT, info["document_id"], info["title"], join(parent, info["title"]), info)


def split(path: str) -> tuple[str | None, list[str], bool]:
    """(id to start from or None for the root, the components, whether it ends in '/')."""
    start = None
    if path.startswith(ID_PREFIX):
        start, _, path = path[len(ID_PREFIX):].partition("/")
        if not start:
            raise ClientError(0, f"{ID_PREFIX!r} must be followed by an id")
        trailing = path.endswith("/")
    else:
        trailing = path.endswith("/") and path.strip("/") != ""
    return start, [part for part in path.split("/") if part], trailing


def pick(listing: dict, name: str, parent: Node, want: str | None, path: str) -> Node | None:
    """The entry called `name` in a folder listing, or None; refuses an ambiguous name."""
    folder = next((f for f in listing["folders"] if f["name"] == name), None)
    document = next((d for d in listing["documents"] if d["title"] == name), None)
    full = join(parent.path, name)
    if want == FOLDER:
        document = None
    elif want == DOCUMENT:
        folder = None
    if folder and document:
        raise ClientError(0, f"{path} is both a folder and a document: write {full}/ for the "
                             f"folder, or id:{document['id']} for the document")
    if folder:
        return Node(FOLDER, folder["id"], name, full, folder)
    if document:
        return Node(DOCUMENT, document["id"], name, full, document)
    return None


async def resolve(client: Client, path: str, want: str | None = None) -> Node:
    """The folder or document `path` names (see the module text); 404 when it is missing."""
    node, rest = await _walk_to_parent(client, path)
    if rest is None:
        return _check_kind(node, want, path)
    name, trailing = rest
    found = pick(await list_folder(client, node.id), name, node,
                 FOLDER if trailing else want, path)
    if found is None:
        raise not_found(f"no {_kind_words(FOLDER if trailing else want)} {name!r} in "
                        f"{node.path} that you may read (looking for {path})")
    return found


async def resolve_parent(client: Client, path: str) -> tuple[Node, str | None]:
    """The folder that holds (or would hold) what `path` names, and its last name (None when
    the path itself is the root or an `id:`)."""
    node, rest = await _walk_to_parent(client, path)
    if rest is None:
        return node, None
    return node, rest[0]


async def _walk_to_parent(client: Client, path: str) -> tuple[Node, tuple[str, bool] | None]:
    start, parts, trailing = split(path)
    node = ROOT if start is None else await node_by_id(client, start)
    if not parts:
        return node, None
    for name in parts[:-1]:
        if node.kind != FOLDER:
            raise ClientError(0, f"{node.path} is a document, not a folder (in {path})")
        found = pick(await list_folder(client, node.id), name, node, FOLDER, path)
        if found is None:
            raise not_found(f"no folder {name!r} in {node.path} that you may read (looking "
                            f"for {path})")
        node = found
    if node.kind != FOLDER:
        raise ClientError(0, f"{node.path} is a document, not a folder (in {path})")
    return node, (parts[-1], trailing)


def _check_kind(node: Node, want: str | None, path: str) -> Node:
    if want and node.kind != want:
        raise ClientError(0, f"{path} is a {node.kind}, not a {want}")
    return node


def _kind_words(want: str | None) -> str:
    return want or "folder or document"


async def walk(client: Client, folder: Node):
    """Every folder below `folder` (itself first), depth first in name order, with its listing:
    yields (folder node, listing)."""
    stack = [folder]
    while stack:
        node = stack.pop()
        listing = await list_folder(client, node.id)
        yield node, listing
        stack.extend(reversed([Node(FOLDER, entry["id"], entry["name"],
                                    join(node.path, entry["name"]), entry)
                               for entry in listing["folders"]]))
