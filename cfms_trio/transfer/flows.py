"""The server's side of the transfer message sequences of SPEC §6.

Each flow owns the connection for the duration of one request: requests on a connection are
answered in order, so nothing else reads from it meanwhile. Memory stays bounded by one chunk
in flight; disk and crypto work run in worker threads.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

import trio

from ..conventions import SHA256_HEX_PATTERN
from ..deadlines import trio_deadline
from ..errors import BadRequest, ContentMissing, DeadlinePassed, TooLarge, disk_error
from ..protocol import event
from ..storage import transfers
from .crypto import TAG_BYTES, ChunkTagError, chunk_count, new_session
from .files import PartialUpload, SealedReader
from .pipeline import send_ahead

if TYPE_CHECKING:
    from ..dispatch import Context

log = logging.getLogger(__name__)
# Chunks a download reads and seals ahead of the one being sent.
DOWNLOAD_READ_AHEAD_CHUNKS = 2


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _announcement(ctx: "Context", max_size: int) -> tuple[int, str]:
    """Receive and check the client's {file_size, sha256}."""
    message = await ctx.conn.receive_json()
    if message.get("action") != "transfer_file":
        raise BadRequest("expected a 'transfer_file' message with file_size and sha256")
    data = message.get("data")
    if not isinstance(data, dict):
        raise BadRequest("field 'data' must be an object")
    size, sha256 = data.get("file_size"), data.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest("field 'data.file_size' must be a non-negative integer")
    if size > max_size:
        raise TooLarge(f"file of {size} bytes is larger than the limit of {max_size} bytes")
    if not isinstance(sha256, str) or not SHA256_HEX_PATTERN.fullmatch(sha256):
        raise BadRequest("field 'data.sha256' must be 64 hex digits")
    return size, sha256.lower()


async def receive_upload(ctx: "Context", task: dict) -> dict:
    """Run the upload sequence for `task` and return the final response's data."""
    app = ctx.app
    chunk_size = app.settings.limits.transfer_chunk_bytes
    max_size = min(task["max_size"] or app.settings.limits.upload_bytes,
                   app.settings.limits.upload_bytes)
    partial = PartialUpload(app.content.partial_upload(task["task_id"], task["file_path"],
                                                       chunk_size))
    async with app.transfers.claim(task["task_id"]) as active:
        active.scope.deadline = trio_deadline(task["end_time"])
        with active.scope:
            return await _upload(ctx, task, partial, chunk_size, max_size)
        # The task is dead (expired or aborted): nothing it received can ever be resumed.
        await _discard(app, partial, task)
        if active.abort_reason:
            raise DeadlinePassed(active.abort_reason)
        raise DeadlinePassed(f"upload task '{task['task_id']}' expired during the upload")


async def _upload(ctx: "Context", task: dict, partial: PartialUpload, chunk_size: int,
                  max_size: int) -> dict:
    app, conn = ctx.app, ctx.conn
    await conn.send_json(event("transfer_file", {
        "task_id": task["task_id"], "chunk_size": chunk_size, "max_size": max_size}))
    file_size, sha256 = await _announcement(ctx, max_size)

    same_upload = task["declared_size"] == file_size and task["declared_sha256"] == sha256
    if not same_upload:
        await app.store.write(transfers.record_declared, task["task_id"], file_size, sha256)
    existing = await trio.to_thread.run_sync(partial.existing_bytes) if same_upload else 0
    resumable = min(existing, file_size) // chunk_size * chunk_size
    committed = False
    try:
        offset = await trio.to_thread.run_sync(partial.open, resumable, file_size,
                                               limiter=app.io_limiter)
        key, prefix = new_session()
        await conn.send_json(event("ready", {"key": _b64(key), "nonce_prefix": _b64(prefix),
                                             "chunk_size": chunk_size, "offset": offset}))
        for index in range(offset // chunk_size, chunk_count(file_size, chunk_size)):
            message = await conn.receive()
            if isinstance(message, str):
                raise BadRequest(f"expected binary chunk {index}, got a text message")
            expected = min(chunk_size, file_size - index * chunk_size) + TAG_BYTES
            if len(message) != expected:
                await _discard(app, partial, task)
                raise BadRequest(f"chunk {index} has {len(message)} bytes, expected {expected}")
            try:
                await trio.to_thread.run_sync(partial.write_sealed, key, prefix, index, message,
                                              limiter=app.io_limiter)
            except ChunkTagError as err:
                await _discard(app, partial, task)
                raise BadRequest(f"{err}; the upload was discarded") from None
        digest = partial.digest()  # None: known only once stored (a resumed S3 upload)
        if digest is not None and digest != sha256:
            await _discard(app, partial, task)
            raise BadRequest("sha256 of the received file does not match; the upload was discarded")
        final = task["file_path"]
        # Verified content is put in place and recorded as one step that a deadline passing
        # right now cannot split, so no file is left on disk without its row.
        with trio.CancelScope(shield=True):
            digest = await trio.to_thread.run_sync(partial.commit, final,
                                                   limiter=app.io_limiter)
            committed = True
            try:
                if digest != sha256:
                    raise BadRequest("sha256 of the received file does not match; the upload "
                                     "was discarded")
                await app.store.write(transfers.complete_upload, task["task_id"],
                                      task["file_id"], file_size, sha256)
            except BaseException as exc:
                # e.g. the document was deleted meanwhile: its content must not linger.
                await trio.to_thread.run_sync(app.content.delete, [final])
                if isinstance(exc, BadRequest):
                    await _discard(app, partial, task)
                raise
    except OSError as exc:
        # A full disk (or any failed write): what was received cannot be resumed reliably, and
        # keeping it would only hold the space that is missing. Remove it now, answer 507/500.
        await _discard(app, partial, task)
        raise disk_error(log, exc, "storing the upload") from None
    finally:
        if not committed:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.close)
    log.info("upload %s complete: %d bytes", task["task_id"], file_size)
    return {"file_id": task["file_id"], "size": file_size, "sha256": sha256}


async def _discard(app, partial: PartialUpload, task: dict) -> None:
    """Remove the partial file first, then forget the declared size: when the disk is full the
    database write may fail too, and the file must be gone all the same (a resumed upload of
    a missing file starts from 0 whatever was declared)."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(partial.discard)
        try:
            await app.store.write(transfers.record_declared, task["task_id"], None, None)
        except Exception:
            log.warning("could not reset the declared upload of task %s", task["task_id"],
                        exc_info=True)


async def send_download(ctx: "Context", task: dict, offset: int) -> dict:
    """Run the download sequence for `task` from byte `offset`."""
    app, conn = ctx.app, ctx.conn
    if not task["file_active"] or task["file_sha256"] is None:
        raise BadRequest(f"file '{task['file_id']}' has no content to download yet")
    chunk_size = app.settings.limits.transfer_chunk_bytes
    size = task["file_size"]
    if offset % chunk_size or offset > size:
        raise BadRequest(f"field 'data.offset' must be a multiple of {chunk_size} "
                         f"not beyond the file size {size}")
    key, prefix = new_session()
    try:
        source = await trio.to_thread.run_sync(app.content.open_read, task["file_path"],
                                               limiter=app.io_limiter)
    except FileNotFoundError:
        # The server's fault, not the client's: 500, saying what is lost and where.
        log.error("download task %s: the content of file %s (%s) is missing from %s",
                  task["task_id"], task["file_id"], task["file_path"], app.content.description)
        raise ContentMissing(f"the content of file '{task['file_id']}' is missing from the "
                             f"server's storage ({app.content.description}); an administrator "
                             "can restore it from a backup") from None
    reader = SealedReader(source, chunk_size, key, prefix)
    try:
        with trio.CancelScope(deadline=trio_deadline(task["end_time"])) as scope:
            await conn.send_json(event("transfer_file", {
                "task_id": task["task_id"], "file_size": size, "sha256": task["file_sha256"],
                "chunk_size": chunk_size, "key": _b64(key), "nonce_prefix": _b64(prefix),
                "offset": offset}))
            message = await conn.receive_json()
            if message.get("action") != "ready":
                raise BadRequest("expected a 'ready' message")
            first = offset // chunk_size
            await trio.to_thread.run_sync(reader.seek_chunk, first)

            async def send(index: int, sealed: bytes) -> bool:
                await conn.send_bytes(sealed)
                return False

            await send_ahead(range(first, chunk_count(size, chunk_size)), reader.read_sealed,
                             send, depth=DOWNLOAD_READ_AHEAD_CHUNKS, limiter=app.io_limiter)
        if scope.cancelled_caught:
            raise DeadlinePassed(f"download task '{task['task_id']}' expired during the download")
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(reader.close)
    return {"file_id": task["file_id"], "size": size, "sha256": task["file_sha256"]}
