"""Content storage: where the bytes of documents, partial uploads, restored files and backups
live. One seam with two implementations, chosen by `serve --storage`:

- `LocalContent` (`local.py`, the default): files under `<root>/content/`, fsynced, put in
  place by an atomic rename — exactly the server's behaviour before this seam existed;
- `S3Content` (`s3.py`): objects under `s3://BUCKET/PREFIX` of an S3-compatible service,
  through boto3.

Content is named by a *key*: the path relative to the content folder that File rows store
(`files/ab/<id>`, `restore/files/<id>`, `backups/<name>.cfms.enc`, ...). The local store
resolves it under `<root>/content/`, the S3 store prefixes it. Every method is blocking; the
server runs them in worker threads (`trio.to_thread`, the bulk limiter for long ones). Both
implementations offer the same methods:

- `check()`: at start-up, that the storage is there and usable (raises StorageUnavailable);
- `open_read(key)`: a binary reader with `read(n)` and `seek(offset)` (S3: ranged GETs);
  FileNotFoundError when there is no such content;
- `delete(keys)`: remove content; missing content is fine, other failures are logged;
- `set_aside(keys) -> remove`: take content out of reach at once and return what removes it
  for good, for removals inside a transaction (local: a rename into `tmp/removed`; S3: deleted
  at once); `clear_set_aside()` at start-up removes what a crash left set aside;
- `partial_upload(task_id, final_key, chunk_bytes)`: the resumable receiving end of one upload
  (`PartialContent` below);
- `discard_partial_uploads(task_ids)` / `remove_unclaimed_uploads(claimed_task_ids)`;
- `restored_files(staging_dir, task_id)`: how an import's verified staged files become stored
  content together with its commit (`move_all` inside the transaction: local files are
  renamed, S3 objects uploaded; `take_back` after a failure; `key_of(file_id)` for the File
  rows);
- `remove_interrupted_restores(task_ids, known_restored_ids, others_running=)`: at start-up
  (or when another instance's import was failed), what imports that never committed left
  behind; `others_running`: imports run elsewhere now, whose files must stay;
- `adopt(paths)`: take local files the server wrote under `<root>/content/` (a finished
  export's archive and key file) into the storage (local: nothing to do);
- `local_copy(key, spool_dir)`: a context manager giving a local path holding the content, for
  the readers that need a file (an import reads its uploaded archive sequentially from one;
  S3 downloads it into `spool_dir` first and removes it afterwards).

A `PartialContent` has `existing_bytes()`, `open(keep_bytes, file_size) -> kept`,
`append(plaintext)`, `digest()` (sha256 of what was appended, or None when it is only known
once stored), `commit(final_key) -> sha256 of the stored content`, `close()`, `discard()`.
"""

from __future__ import annotations

import dataclasses
import re

from ..config import Settings
from ..paths import Paths

STORAGE_LOCAL = "local"
S3_URL_PATTERN = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?")


@dataclasses.dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ('' or ending in '/')."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_storage_url(text: str) -> S3Location:
    """`s3://BUCKET/PREFIX` as a location; ValueError saying what is wrong otherwise."""
    match = S3_URL_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"storage {text!r} is not s3://BUCKET/PREFIX (a bucket name is 3 to 63 "
                         "lower-case letters, digits, '.' and '-')")
    prefix = match["prefix"] or ""
    if prefix.startswith("/") or "//" in prefix or any(
            part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"storage {text!r}: the prefix may not hold empty, '.' or '..' parts")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Location(match["bucket"], prefix)


def open_content_storage(settings: Settings, paths: Paths):
    """The content storage `settings` name: local files unless `storage_url` is set."""
    if settings.storage_url is None:
        from .local import LocalContent
        return LocalContent(paths)
    from .s3 import S3Content
    return S3Content(parse_storage_url(settings.storage_url), paths,
                     endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
