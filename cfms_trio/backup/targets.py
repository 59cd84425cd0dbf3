"""Where published backups live: the server's backups folder, or an S3-compatible bucket.

A target is described by a small JSON object (`{"type": "local"}` or `{"type": "s3", "bucket",
"prefix", "endpoint"?}`), stored with each schedule and each backup. `open_target` turns it
into an object with three blocking operations: `publish` a finished temporary archive under a
backup's name, `open_archive` to read one back as a stream, `delete` one. S3 goes through
boto3 (credentials and region from the standard AWS environment variables and files, the
endpoint from the target, `serve --s3-endpoint` or `AWS_ENDPOINT_URL`); uploads are multipart
from the temporary file, one part in memory at a time, so an archive is never held whole in
memory and never copied a second time on disk. The server runs all of it in worker threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO

from ..config import MiB
from ..content.s3 import S3_PART_MIN_BYTES, make_s3_client, s3_reason
from ..conventions import ARCHIVE_SUFFIX
from ..errors import BackupTargetError, BadRequest, Conflict
from ..paths import Paths, backup_pair

TARGET_LOCAL = "local"
TARGET_S3 = "s3"
# S3 wants every part but the last to be at least S3_PART_MIN_BYTES; 8 MiB is what most
# tools use.
S3_PART_DEFAULT_BYTES = 8 * MiB
S3_MAX_PARTS = 10_000
READ_BYTES = 1 * MiB
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PREFIX_MAX_CHARS = 512


@dataclasses.dataclass(frozen=True)
class S3Options:
    """What the operator set for S3 (`serve --s3-endpoint/--s3-region`); None: boto3's own
    defaults (the AWS_* environment variables and configuration files)."""

    endpoint_url: str | None = None
    region: str | None = None
    part_bytes: int = S3_PART_DEFAULT_BYTES


def parse_target(value: dict | None) -> dict:
    """A target object from a request, checked and normalised (400 naming the field)."""
    if value is None:
        return {"type": TARGET_LOCAL}
    kind = value.get("type")
    if kind == TARGET_LOCAL:
        if set(value) != {"type"}:
            extra = sorted(set(value) - {"type"})[0]
            raise BadRequest(f"unknown field 'data.target.{extra}' (a local target has only "
                             "'type')")
        return {"type": TARGET_LOCAL}
    if kind != TARGET_S3:
        raise BadRequest("field 'data.target.type' must be 'local' or 's3'")
    allowed = {"type", "bucket", "prefix", "endpoint"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise BadRequest(f"unknown field 'data.target.{unknown[0]}'")
    bucket = value.get("bucket")
    if not isinstance(bucket, str) or not BUCKET_PATTERN.fullmatch(bucket):
        raise BadRequest("field 'data.target.bucket' must be an S3 bucket name (3 to 63 "
                         "lower-case letters, digits, '.' and '-')")
    prefix = value.get("prefix", "")
    if not isinstance(prefix, str) or len(prefix) > PREFIX_MAX_CHARS or prefix.startswith("/"):
        raise BadRequest(f"field 'data.target.prefix' must be a string of at most "
                         f"{PREFIX_MAX_CHARS} characters, not starting with '/'")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    endpoint = value.get("endpoint")
    if endpoint is not None and (not isinstance(endpoint, str)
                                 or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint)):
        raise BadRequest("field 'data.target.endpoint' must be an http:// or https:// URL")
    target = {"type": TARGET_S3, "bucket": bucket, "prefix": prefix}
    if endpoint is not None:
        target["endpoint"] = endpoint
    return target


def describe_target(target: dict) -> str:
    if target["type"] == TARGET_S3:
        return f"s3://{target['bucket']}/{target['prefix']}"
    return "the server's backups folder"


class LocalTarget:
    """The server's own backups folder (`content/backups/`, in the content storage: local
    files, or the bucket of `serve --storage`)."""

    def __init__(self, paths: Paths, content):
        self._paths = paths
        self._content = content

    def location_of(self, name: str) -> str:
        return self._paths.relative(backup_pair(self._paths.backups, name)[0])

    def publish(self, temp_archive: Path, name: str) -> str:
        archive = backup_pair(self._paths.backups, name)[0]
        try:
            os.link(temp_archive, archive)  # never replaces an existing backup
        except FileExistsError:
            raise Conflict(f"a backup named '{name}' already exists") from None
        return self._paths.relative(archive)

    def open_archive(self, location: str) -> BinaryIO:
        return self._content.open_read(location)

    def delete(self, location: str) -> None:
        self._content.delete([location])


class S3Target:
    """One bucket and prefix of an S3-compatible service."""

    def __init__(self, target: dict, options: S3Options):
        self.bucket = target["bucket"]
        self.prefix = target["prefix"]
        self._endpoint = target.get("endpoint") or options.endpoint_url
        self._options = options
        self._client = None

    def _s3(self):
        if self._client is None:
            self._client = make_s3_client(self._endpoint, self._options.region)
        return self._client

    def location_of(self, name: str) -> str:
        return f"{self.prefix}{name}{ARCHIVE_SUFFIX}"

    def _failed(self, doing: str, exc: Exception) -> BackupTargetError:
        return BackupTargetError(f"S3 {doing} s3://{self.bucket}/{self.prefix} failed: "
                                 f"{s3_reason(exc)}")

    def publish(self, temp_archive: Path, name: str) -> str:
        """Upload in parts (never the whole archive in memory), then read the object back and
        compare its sha256 with the file's before answering; a failure leaves no object."""
        key = self.location_of(name)
        try:
            if self._exists(key):
                raise Conflict(f"a backup named '{name}' already exists in "
                               f"s3://{self.bucket}/{self.prefix}")
            expected = self._upload(temp_archive, key)
            with self.open_archive(key) as stored:
                digest = hashlib.sha256()
                while piece := stored.read(READ_BYTES):
                    digest.update(piece)
            if digest.hexdigest() != expected:
                self.delete(key)
                raise BackupTargetError(f"the archive read back from s3://{self.bucket}/{key} "
                                        "differs from the one uploaded; the object was removed")
        except (Conflict, BackupTargetError):
            raise
        except Exception as exc:
            raise self._failed("upload to", exc) from exc
        return key

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError
        try:
            self._s3().head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _upload(self, temp_archive: Path, key: str) -> str:
        """A multipart upload of the file, one part at a time; returns the file's sha256."""
        s3 = self._s3()
        size = temp_archive.stat().st_size
        part_bytes = max(self._options.part_bytes, S3_PART_MIN_BYTES,
                         -(-size // S3_MAX_PARTS))
        upload_id = s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        digest = hashlib.sha256()
        try:
            parts = []
            with open(temp_archive, "rb") as source:
                number = 1
                while True:
                    body = source.read(part_bytes)
                    if not body and parts:
                        break
                    digest.update(body)
                    answer = s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                            PartNumber=number, Body=body)
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                    number += 1
                    if len(body) < part_bytes:
                        break
            s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:
                pass
            raise
        return digest.hexdigest()

    def open_archive(self, location: str) -> BinaryIO:
        try:
            body = self._s3().get_object(Bucket=self.bucket, Key=location)["Body"]
        except Exception as exc:
            if s3_reason(exc).startswith(("NoSuchKey", "404")):
                raise FileNotFoundError(f"s3://{self.bucket}/{location}") from None
            raise self._failed("download from", exc) from exc
        return _S3Reader(body, self)

    def delete(self, location: str) -> None:
        try:
            self._s3().delete_object(Bucket=self.bucket, Key=location)
        except Exception as exc:
            raise self._failed("removal from", exc) from exc


class _S3Reader:
    """A streaming S3 object body as a plain binary file: `read(n)`, errors as
    BackupTargetError, usable in `with`."""

    def __init__(self, body, target: S3Target):
        self._body = body
        self._target = target

    def read(self, size: int = -1) -> bytes:
        try:
            return self._body.read(None if size is None or size < 0 else size)
        except Exception as exc:
            raise self._target._failed("download from", exc) from exc

    def close(self) -> None:
        self._body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_target(target: dict, paths: Paths, options: S3Options,
                content) -> LocalTarget | S3Target:
    """The target `target` describes; a local one lives in `content` (the server's content
    storage)."""
    if target["type"] == TARGET_S3:
        return S3Target(target, options)
    return LocalTarget(paths, content)
