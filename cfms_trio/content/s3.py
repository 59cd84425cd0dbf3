"""Content in an S3-compatible bucket (`serve --storage s3://BUCKET/PREFIX`; see `content`).

Object keys are the prefix followed by the key a File row stores. What differs from local files:

- partial uploads are S3 multipart uploads of the final key; a small JSON object
  `tmp/uploads/<task_id>.part` records the upload id and part size, and S3 itself records the
  parts, so an upload resumes after a reconnect (on any server that reaches the bucket). Parts
  are whole transfer chunks (at least 5 MiB, the S3 minimum for all but the last); one part is
  buffered in memory at a time. The sha256 of an upload that resumed is computed by reading the
  stored object back (a hash cannot be resumed from parts S3 will not return);
- restored files are uploaded, before the commit, to `restore/files/<task_id>/<file_id>`, the
  key their File rows then name: S3 has no rename, so nothing moves with the commit. A failed
  import deletes them; one interrupted by a crash is failed at the next start, which deletes
  everything under its task's prefix;
- an export's archive and key file are written locally (the self-check reads them back there),
  then uploaded and removed locally (`adopt`);
- an import's uploaded archive is downloaded into its staging area to be read (`local_copy`).

Every failure of the service becomes StorageUnavailable (503) naming the bucket and the cause.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..config import MiB
from ..errors import Conflict, ImportAborted, StorageUnavailable
from ..paths import PART_SUFFIX, Paths

log = logging.getLogger(__name__)

S3_PART_MIN_BYTES = 5 * MiB
PART_TARGET_BYTES = 8 * MiB  # a part is the fewest whole chunks reaching this
S3_MAX_PARTS = 10_000
READ_BYTES = 1 * MiB
DELETE_BATCH_KEYS = 1000  # DeleteObjects takes at most this many
RESTORE_UPLOAD_THREADS = 8  # parallel PUTs of one import's restored files
UPLOADS_FOLDER = "tmp/uploads/"
RESTORED_FOLDER = "restore/files/"
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def make_s3_client(endpoint_url: str | None, region: str | None):
    """A boto3 S3 client; credentials (and a missing endpoint or region) come from the standard
    AWS_* environment variables and configuration files."""
    import boto3  # imported on first use: a server without S3 never loads it
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region)


def s3_reason(exc: BaseException) -> str:
    """The service's error code and message, or the exception's text (never credentials)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return str(exc) or type(exc).__name__


def _is_missing(exc: BaseException) -> bool:
    return s3_reason(exc).split(":")[0] in _MISSING


def part_bytes_for(file_size: int, chunk_bytes: int) -> int:
    """Whole chunks per part: at least PART_TARGET_BYTES, and few enough parts for S3."""
    chunks = max(-(-PART_TARGET_BYTES // chunk_bytes), -(-S3_PART_MIN_BYTES // chunk_bytes),
                 -(-file_size // ((S3_MAX_PARTS - 1) * chunk_bytes)))
    return chunks * chunk_bytes


def _nothing() -> None:
    """What is left to do after `S3Content.set_aside`."""


class S3Content:
    """Content as objects of one bucket under one prefix (`location`: a `content.S3Location`)."""

    def __init__(self, location, paths: Paths, *, endpoint_url: str | None = None,
                 region: str | None = None):
        self.location = location
        self.bucket = location.bucket
        self.description = location.url
        # An import downloads its uploaded archive into staging first (`local_copy`).
        self.reads_uploads_in_place = False
        self._paths = paths
        self._endpoint_url = endpoint_url
        self._region = region
        self._client = None
        self._client_lock = threading.Lock()
        self.export_reader = self.open_read  # what an export reads stored content with

    # -- plumbing -----------------------------------------------------------------------------

    def s3(self):
        with self._client_lock:
            if self._client is None:
                self._client = make_s3_client(self._endpoint_url, self._region)
            return self._client

    def object_key(self, key: str) -> str:
        """The object key of a stored key, refusing any that is not a plain relative path."""
        if not key or key.startswith("/") or any(part in ("", ".", "..")
                                                 for part in key.split("/")):
            raise ValueError(f"stored path is not a plain relative path: {key!r}")
        return self.location.prefix + key

    def failed(self, doing: str, exc: BaseException) -> StorageUnavailable:
        return StorageUnavailable(f"S3 storage {self.description}: {doing} failed: "
                                  f"{s3_reason(exc)}")

    def call(self, doing: str, operation: str, **kwargs):
        """One S3 operation; FileNotFoundError for a missing object or upload, every other
        failure as StorageUnavailable."""
        try:
            return getattr(self.s3(), operation)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(errno.ENOENT, "no such object in the bucket",
                                        f"s3://{self.bucket}/{kwargs.get('Key', '')}") from None
            raise self.failed(doing, exc) from exc

    def keys_under(self, folder: str) -> Iterator[str]:
        """Every stored key under `folder` (a key prefix ending in '/')."""
        token = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.call("listing", "list_objects_v2",
                             Prefix=self.object_key(folder.rstrip("/")) + "/", **extra)
            for item in page.get("Contents", ()):
                yield item["Key"][len(self.location.prefix):]
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    # -- the content storage ------------------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and these credentials may use it."""
        try:
            self.s3().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            reason = s3_reason(exc)
            if reason.startswith(("404", "NoSuchBucket")):
                reason = "no such bucket"
            elif reason.startswith(("403", "AccessDenied")):
                reason = "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            raise StorageUnavailable(f"S3 storage {self.description} is not usable: "
                                     f"{reason}") from None

    def open_read(self, key: str) -> S3Reader:
        head = self.call("reading", "head_object", Key=self.object_key(key))
        return S3Reader(self, self.object_key(key), head["ContentLength"])

    def delete(self, keys: Iterable[str]) -> None:
        """Remove objects; failures are logged, not raised (like removing local files)."""
        batch = [self.object_key(key) for key in keys]
        for start in range(0, len(batch), DELETE_BATCH_KEYS):
            objects = [{"Key": key} for key in batch[start:start + DELETE_BATCH_KEYS]]
            try:
                answer = self.call("removal", "delete_objects",
                                   Delete={"Objects": objects, "Quiet": True})
            except StorageUnavailable:
                log.exception("could not remove %d objects from %s", len(objects),
                              self.description)
                continue
            for error in answer.get("Errors", ()):
                log.error("could not remove %s from %s: %s", error.get("Key"), self.bucket,
                          error.get("Message"))

    def set_aside(self, keys: Iterable[str]) -> Callable[[], None]:
        """Objects are removed at once (no large local file to free): nothing is left to do."""
        self.delete(keys)
        return _nothing

    def clear_set_aside(self) -> int:
        return 0

    def partial_upload(self, task_id: str, final_key: str, chunk_bytes: int) -> S3Partial:
        return S3Partial(self, task_id, final_key, chunk_bytes)

    def discard_partial_uploads(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            S3Partial(self, task_id, "", 1).discard()

    def remove_unclaimed_uploads(self, claimed_task_ids: set[str]) -> int:
        removed = 0
        for key in list(self.keys_under(UPLOADS_FOLDER)):
            task_id = key[len(UPLOADS_FOLDER):].removesuffix(PART_SUFFIX)
            if key.endswith(PART_SUFFIX) and task_id not in claimed_task_ids:
                S3Partial(self, task_id, "", 1).discard()
                removed += 1
        return removed

    def restored_files(self, staging_dir: Path, task_id: str) -> S3RestoredFiles:
        return S3RestoredFiles(self, staging_dir, task_id)

    def remove_interrupted_restores(self, task_ids: Iterable[str],
                                    known_restored_ids: set[str], *,
                                    others_running: bool = False) -> int:
        """Everything under the restore prefix of imports that never committed (each import
        has a prefix of its own, so imports running elsewhere are never touched)."""
        removed = 0
        for task_id in task_ids:
            keys = list(self.keys_under(f"{RESTORED_FOLDER}{task_id}/"))
            self.delete(keys)
            removed += len(keys)
        return removed

    def put_file(self, path: Path, key: str) -> None:
        """Upload a local file (in parts when large, one part in memory at a time)."""
        from boto3.s3.transfer import TransferConfig
        config = TransferConfig(multipart_threshold=PART_TARGET_BYTES,
                                multipart_chunksize=PART_TARGET_BYTES, use_threads=False)
        try:
            self.s3().upload_file(str(path), self.bucket, self.object_key(key), Config=config)
        except Exception as exc:
            raise self.failed("upload", exc) from exc

    def adopt(self, paths: Iterable[Path]) -> None:
        """Upload files the server wrote under the content folder, then remove them locally;
        an object already there is never replaced (Conflict)."""
        paths = list(paths)
        try:
            for path in paths:
                key = self._paths.relative(path)
                try:
                    self.call("checking", "head_object", Key=self.object_key(key))
                except FileNotFoundError:
                    pass
                else:
                    raise Conflict(f"{key} already exists in {self.description}")
                self.put_file(path, key)
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_copy(self, key: str, spool_dir: Path) -> Iterator[Path]:
        spool_dir.mkdir(parents=True, exist_ok=True)
        target = spool_dir / key.rsplit("/", 1)[-1]
        try:
            try:
                self.s3().download_file(self.bucket, self.object_key(key), str(target))
            except Exception as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(errno.ENOENT, "no such object in the bucket",
                                            f"{self.description}{key}") from None
                raise self.failed("download", exc) from exc
            yield target
        finally:
            target.unlink(missing_ok=True)


class S3Reader:
    """An object as a binary file: `read(n)` streams a ranged GET from the current offset,
    `seek(offset)` starts a new one on the next read."""

    def __init__(self, content: S3Content, object_key: str, size: int):
        self._content = content
        self._key = object_key
        self.size = size
        self._offset = 0
        self._body = None

    def seek(self, offset: int) -> int:
        self._drop_body()
        self._offset = offset
        return offset

    def tell(self) -> int:
        return self._offset

    def read(self, size: int = -1) -> bytes:
        if self._offset >= self.size or size == 0:
            return b""
        if self._body is None:
            answer = self._content.call("reading", "get_object", Key=self._key,
                                        Range=f"bytes={self._offset}-")
            self._body = answer["Body"]
        wanted = self.size - self._offset if size is None or size < 0 else size
        pieces, got = [], 0
        try:
            while got < wanted:
                piece = self._body.read(min(wanted - got, READ_BYTES))
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
        except Exception as exc:
            self._drop_body()
            raise self._content.failed("reading", exc) from exc
        self._offset += got
        return b"".join(pieces)

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class S3Partial:
    """One upload's multipart upload, resumable from the parts S3 holds for it."""

    def __init__(self, content: S3Content, task_id: str, final_key: str, chunk_bytes: int):
        self._content = content
        self._marker = content.object_key(f"{UPLOADS_FOLDER}{task_id}{PART_SUFFIX}")
        self._final_key = final_key
        self._chunk_bytes = chunk_bytes
        self._record: dict | None = None  # {"key", "upload_id", "part_bytes", "file_size"}
        self._parts: list[dict] = []
        self._buffer = bytearray()
        self._hasher = hashlib.sha256()
        self._resumed = False
        self.size = 0

    def _load(self) -> dict | None:
        try:
            body = self._content.call("reading the upload record", "get_object",
                                      Key=self._marker)["Body"].read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(body)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _stored_parts(self, record: dict) -> list[dict]:
        """The consecutive whole parts (from 1) S3 holds for the upload."""
        parts, marker = [], 0
        while True:
            try:
                page = self._content.call("listing upload parts", "list_parts",
                                          Key=self._content.object_key(record["key"]),
                                          UploadId=record["upload_id"],
                                          PartNumberMarker=marker)
            except FileNotFoundError:
                return []
            parts += page.get("Parts", ())
            if not page.get("IsTruncated"):
                break
            marker = page["NextPartNumberMarker"]
        whole = []
        for number, part in enumerate(sorted(parts, key=lambda p: p["PartNumber"]), start=1):
            if part["PartNumber"] != number or part["Size"] != record["part_bytes"]:
                break
            whole.append({"PartNumber": number, "ETag": part["ETag"]})
        return whole

    def existing_bytes(self) -> int:
        record = self._load()
        if record is None or record.get("key") != self._final_key:
            return 0
        return len(self._stored_parts(record)) * record["part_bytes"]

    def open(self, keep_bytes: int, file_size: int) -> int:
        record = self._load()
        if (record is not None and keep_bytes > 0 and record.get("key") == self._final_key
                and record.get("file_size") == file_size):
            parts = self._stored_parts(record)
            self._parts = parts[:keep_bytes // record["part_bytes"]]
            self._record = record
        else:
            if record is not None:
                self._abort(record)
            key = self._content.object_key(self._final_key)
            upload_id = self._content.call("starting an upload", "create_multipart_upload",
                                           Key=key)["UploadId"]
            self._record = {"key": self._final_key, "upload_id": upload_id,
                            "part_bytes": part_bytes_for(file_size, self._chunk_bytes),
                            "file_size": file_size}
            self._content.call("recording the upload", "put_object", Key=self._marker,
                               Body=json.dumps(self._record).encode())
            self._parts = []
        self.size = len(self._parts) * self._record["part_bytes"]
        self._resumed = self.size > 0
        return self.size

    def append(self, plaintext: bytes) -> None:
        self._buffer += plaintext
        self._hasher.update(plaintext)
        self.size += len(plaintext)
        if len(self._buffer) >= self._record["part_bytes"]:
            self._send_part()

    def _send_part(self) -> None:
        number = len(self._parts) + 1
        answer = self._content.call("uploading", "upload_part",
                                    Key=self._content.object_key(self._record["key"]),
                                    UploadId=self._record["upload_id"], PartNumber=number,
                                    Body=bytes(self._buffer))
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self._buffer.clear()

    def digest(self) -> str | None:
        return None if self._resumed else self._hasher.hexdigest()

    def commit(self, final_key: str) -> str:
        """Complete the object at `final_key`; return the sha256 of what is stored there."""
        key = self._content.object_key(final_key)
        if not self._parts and not self._buffer:
            self._abort(self._record)
            self._content.call("storing", "put_object", Key=key, Body=b"")
        else:
            if self._buffer:
                self._send_part()
            self._content.call("completing the upload", "complete_multipart_upload", Key=key,
                               UploadId=self._record["upload_id"],
                               MultipartUpload={"Parts": self._parts})
        self._content.call("removing the upload record", "delete_object", Key=self._marker)
        if not self._resumed:
            return self._hasher.hexdigest()
        digest = hashlib.sha256()
        with self._content.open_read(final_key) as stored:
            while piece := stored.read(READ_BYTES):
                digest.update(piece)
        return digest.hexdigest()

    def close(self) -> None:
        self._buffer.clear()  # what was not sent as a part is received again on resume

    def _abort(self, record: dict) -> None:
        try:
            self._content.call("aborting an upload", "abort_multipart_upload",
                               Key=self._content.object_key(record["key"]),
                               UploadId=record["upload_id"])
        except FileNotFoundError:
            pass

    def discard(self) -> None:
        """Abort the multipart upload and forget its record."""
        self._buffer.clear()
        record = self._record or self._load()
        if record is not None:
            self._abort(record)
        self._content.call("removing the upload record", "delete_object", Key=self._marker)


class S3RestoredFiles:
    """Uploads an import's staged files, before its commit, to the keys its File rows name."""

    def __init__(self, content: S3Content, staging_dir: Path, task_id: str):
        self._content = content
        self._staging_dir = staging_dir
        self._task_id = task_id
        self.stored: list[str] = []
        self._lock = threading.Lock()

    def key_of(self, file_id: str) -> str:
        return f"{RESTORED_FOLDER}{self._task_id}/{file_id}"

    def move_all(self, files: Iterable[list[tuple]], total: int, absent: set[str], report,
                 abort: threading.Event) -> None:
        """Upload the staged files of the batches `files` ((archive id, id here, ...) rows, of
        `total` in all; not the `absent` ones) to the keys the rows name, in a few parallel
        streams. This runs inside the commit's transaction (the plan, made there, decides which
        files are written and under which ids); `take_back` removes them if it fails."""
        total, done = max(1, total), 0

        def upload(archive_id: str, file_id: str) -> None:
            if abort.is_set():
                raise ImportAborted("the server shut down during the import")
            key = self.key_of(file_id)
            with self._lock:
                self.stored.append(key)
            self._content.put_file(self._staging_dir / archive_id, key)

        with concurrent.futures.ThreadPoolExecutor(RESTORE_UPLOAD_THREADS) as pool:
            for batch in files:
                report("Importing files", done / total, objects_done=done)
                wanted = [(archive_id, file_id) for archive_id, file_id, *_ in batch
                          if archive_id not in absent]
                for future in [pool.submit(upload, *pair) for pair in wanted]:
                    future.result()
                done += len(batch)
        report("Importing files", 1.0, objects_done=done)

    def take_back(self) -> None:
        """Remove what this import uploaded (everything under its task's prefix)."""
        keys = set(self.stored)
        try:
            keys |= set(self._content.keys_under(f"{RESTORED_FOLDER}{self._task_id}/"))
        except StorageUnavailable:
            log.exception("could not list the restored objects of import %s", self._task_id)
        self._content.delete(sorted(keys))
        self.stored.clear()
