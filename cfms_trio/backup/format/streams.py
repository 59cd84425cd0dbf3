"""Byte-stream wrappers of the archive writer and reader: hashing, threads, limits, checks.

Writing: ``HashingWriter`` (size and sha256 in the same pass), ``WriteBehind`` (writes on a
second thread), ``VerifyingSource`` (a file must match its recorded size and sha256). Reading:
``CountingSource`` (archive size limit, progress), ``TarSource`` (extracted bytes limit),
``ReadAhead`` (reads on a second thread). All blocking; the server runs them in worker threads.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from typing import BinaryIO, Callable

from cfms_trio.errors import ArchiveLimitExceeded

COPY_BYTES = 1024 * 1024  # file contents are streamed in pieces of this size
WRITE_BEHIND_PIECES = 4  # sealed segments waiting between the exporting and the writing thread
READ_AHEAD_PIECES = 4  # decrypted pieces of COPY_BYTES waiting for the extracting thread
PROGRESS_STEP_BYTES = 1024 * 1024  # report progress at most once per this many archive bytes


# A file written in bulk asks the kernel to start writing it to disk every this many bytes, so
# the fsync (or syncfs) that makes it durable finds little left to write.
WRITEBACK_START_BYTES = 8 * 1024 * 1024


def release_pages(fd: int, offset: int, length: int) -> None:
    """Tell the kernel a range of ``fd`` is not needed in memory (POSIX_FADV_DONTNEED): on
    Linux its dirty pages start being written to disk, without waiting, and its clean pages
    (already written, or read) leave the page cache for reuse. Just after writing a range,
    that only starts its writeback; behind a reader, it drops what was read."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def read_up_to(source: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file (tolerates short reads)."""
    buf = bytearray()
    while len(buf) < size:
        piece = source.read(size - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def read_some_into(source: BinaryIO, view: memoryview) -> int:
    """One read of up to ``len(view)`` bytes from ``source`` into ``view``: its ``readinto``
    when it has one (the bytes are copied once), else ``read`` and a copy. Returns how many
    were read, 0 at end of file."""
    readinto = getattr(source, "readinto", None)
    if readinto is not None:
        return readinto(view) or 0
    piece = source.read(len(view)) or b""
    view[:len(piece)] = piece
    return len(piece)


def read_into(source: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``source``; fewer bytes only at end of file. Returns how many were
    read."""
    filled = 0
    while filled < len(view):
        count = read_some_into(source, view[filled:])
        if not count:
            break
        filled += count
    return filled


def drain(stream) -> None:
    """Read a stream to its end, so trailing authentication and padding checks run."""
    while stream.read(COPY_BYTES):
        pass


# --------------------------------------------------------------------------------------------
# Writing


class HashingWriter(io.RawIOBase):
    """Writable wrapper that passes bytes on to ``out`` while counting and hashing them.

    Lets the exporter learn the archive's size and sha256 in the same pass that writes it.
    ``out`` is never closed.
    """

    def __init__(self, out: BinaryIO):
        super().__init__()
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._out.write(data)  # as given: a WriteBehind takes bytes without a copy
        self._hash.update(view)
        self.size += len(view)
        return len(view)

    def hexdigest(self) -> str:
        """sha256 of everything written so far, as lowercase hex."""
        return self._hash.hexdigest()


class DropBehindWriter(io.RawIOBase):
    """Writable wrapper of a file written once from ``offset`` to its end (an archive, a
    transfer): every
    ``WRITEBACK_START_BYTES`` it starts writing the new range to disk, and drops the ranges
    before it, written by then, from the page cache.

    Keeping the final fsync short is one half. The other: on the VM these figures come from,
    filling fresh page-cache pages cost about 3 ms per MiB, while pages given back this way
    are reused at memory speed (a 1 GiB download: 3.4 s of kernel time down to 0.7 s). What
    is written this way is read again rarely, and then from disk. With ``keep_cached`` (a
    file about to be read back whole) only the writeback is started. ``out`` (a raw or
    buffered file) is never closed.
    """

    def __init__(self, out: BinaryIO, offset: int = 0, *, keep_cached: bool = False):
        super().__init__()
        self._out = out
        self._keep_cached = keep_cached  # only start the writeback
        self._first = offset  # where in the file the writes begin
        self._written = offset
        self._started = offset  # writeback started for [offset, _started)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        count = self._out.write(data)
        self._written += count
        if self._written - self._started >= WRITEBACK_START_BYTES:
            self._out.flush()
            fd = self._out.fileno()
            if not self._keep_cached:
                release_pages(fd, self._first, self._started - self._first)  # written by now
            release_pages(fd, self._started, self._written - self._started)  # starts writing
            self._started = self._written
        return count


class DropBehindReader(io.RawIOBase):
    """Readable wrapper of a file read once from start to end (an archive being imported or
    checked): every ``WRITEBACK_START_BYTES`` it drops the range read so far from the page
    cache. Spread over the read, that costs little; left to the end, removing the file (an
    import's uploaded archive, inside the restore's transaction) paid for every cached page
    at once, 80 ms for 300 MB on the VM these figures come from. ``source`` is never closed.
    """

    def __init__(self, source: BinaryIO):
        super().__init__()
        self._source = source
        self._fd = source.fileno()
        self._read = 0
        self._released = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._source.readinto(buffer) or 0
        self._read += count
        if self._read - self._released >= WRITEBACK_START_BYTES or (not count and self._read):
            release_pages(self._fd, self._released, self._read - self._released)
            self._released = self._read
        return count


_END = object()  # ends a HelperThread's queue


class HelperThread:
    """Calls ``handle(item)`` on a helper thread for every item ``put``, in order, with at most
    ``depth`` items waiting in between (so memory stays bounded by a few pieces).

    The first failure of ``handle`` is raised by the next ``put`` or by ``join``; the items
    after it are dropped (still taken from the queue, so no ``put`` blocks forever). Items wait
    in the queue until handled: only immutable ones may be put.
    """

    def __init__(self, handle: Callable[[object], None], depth: int, name: str):
        self._handle = handle
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._joined = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self._error is None:
                try:
                    self._handle(item)
                except BaseException as exc:  # handed to the putting thread
                    self._error = exc

    def put(self, item) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def join(self) -> None:
        """Wait until every item put was handled, then raise the first failure if any."""
        if not self._joined:
            self._joined = True
            self._queue.put(_END)
            self._thread.join()
        if self._error is not None:
            raise self._error


class WriteBehind(io.RawIOBase):
    """Writable that passes each write on to ``out`` from a helper thread.

    An export in one thread would hash and write every sealed segment between reading,
    verifying and sealing the next; with this the two halves overlap on two cores (hashlib,
    AES-GCM and file writes all release the GIL). At most ``WRITE_BEHIND_PIECES`` writes wait
    in between, so memory stays bounded by a few segments. A failure of ``out`` is raised by
    the next ``write`` or by ``close``, which waits until everything queued was written.
    ``out`` itself is never closed.
    """

    def __init__(self, out: BinaryIO):
        super().__init__()
        self._helper = HelperThread(out.write, WRITE_BEHIND_PIECES, "write-behind")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed WriteBehind")
        # The queue keeps a reference until the helper thread is done with it: only
        # immutable bytes may wait there.
        data = data if type(data) is bytes else bytes(data)
        self._helper.put(data)
        return len(data)

    def close(self) -> None:
        """Wait for every queued write, then raise the first failure if there was one."""
        if not self.closed:
            super().close()
            self._helper.join()


class VerifyingSource:
    """Reads one file's content for the tar writer and checks it against its files.json entry.

    tarfile copies exactly the declared size and would silently drop extra bytes or fail with a
    vague message on missing ones; this says which file changed under the exporter.
    """

    def __init__(self, source: BinaryIO, entry: dict):
        self._source = source
        self._entry = entry
        self._remaining = entry["size"]
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._remaining
        size = min(size, self._remaining)
        data = self._source.read(size)
        if len(data) < size:  # a short read: gather the rest, or find the file shorter
            buf = bytearray(data)
            while len(buf) < size:
                piece = self._source.read(size - len(buf))
                if not piece:
                    raise ValueError(
                        f"file {self._entry['id']!r} is shorter than its recorded size")
                buf += piece
            data = bytes(buf)
        self._remaining -= len(data)
        self._hash.update(data)
        return data

    def finish(self) -> None:
        """Confirm the file ended exactly at its size and matched its sha256."""
        if self._remaining or self._source.read(1):
            raise ValueError(f"file {self._entry['id']!r} is longer than its recorded size")
        if self._hash.hexdigest() != self._entry["sha256"]:
            raise ValueError(f"file {self._entry['id']!r} does not match its recorded sha256")


# --------------------------------------------------------------------------------------------
# Reading


class CallbackFailed(Exception):
    """Carries an exception raised by the caller's progress callback through the parsers, so
    the boundary re-raises it unchanged instead of blaming the archive."""


class CountingSource(io.RawIOBase):
    """The encrypted archive as read: enforces the archive size limit and reports progress."""

    def __init__(
        self,
        source: BinaryIO,
        limit_bytes: int,
        progress: Callable[[int, int], None] | None,
        total_bytes: int,
    ):
        super().__init__()
        self._source = source
        self._limit_bytes = limit_bytes
        self._progress = progress
        self._total_bytes = total_bytes
        self._reported = 0
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = read_some_into(self._source, memoryview(buffer).cast("B"))
        self.consumed += count
        if self.consumed > self._limit_bytes:
            raise ArchiveLimitExceeded(
                f"archive is larger than the limit of {self._limit_bytes} bytes"
            )
        at_end = count == 0
        if self.consumed - self._reported >= PROGRESS_STEP_BYTES or (
            at_end and self.consumed != self._reported
        ):
            self.report()
        return count

    def report(self) -> None:
        """Report the bytes consumed so far now (also called when a listing starts, so a
        failure in it is not blamed on an earlier step)."""
        if self._progress is None:
            return
        self._reported = self.consumed
        try:
            self._progress(self.consumed, self._total_bytes)
        except Exception as exc:
            raise CallbackFailed() from exc


class TarSource:
    """The decrypted (and decompressed) tar stream, as tarfile's plain read mode ("r:") reads
    it: ``read``, ``tell``, and ``seek`` forward only. Enforces the extracted bytes limit.

    Counting here, after decompression, is what defeats a compression bomb. tarfile's stream
    mode ("r|") would re-block everything into 10 KiB reads and copy each byte several times;
    here a member's content is handed out by ``pieces`` as views of the pieces ``source``
    produced (``ReadAhead``'s, of ``COPY_BYTES``), without a copy.
    """

    def __init__(self, source, limit_bytes: int):
        self._source = source
        self._limit_bytes = limit_bytes
        self._view = memoryview(b"")
        self._position = 0  # bytes handed out (read or skipped)
        self.produced = 0  # bytes taken from source

    def _fill(self) -> bool:
        """Take the next piece from ``source``; False at its end."""
        piece = self._source.read(COPY_BYTES)
        if not piece:
            return False
        self.produced += len(piece)
        if self.produced > self._limit_bytes:
            raise ArchiveLimitExceeded(
                f"archive expands to more than the limit of {self._limit_bytes} bytes"
            )
        self._view = memoryview(piece)
        return True

    def pieces(self, size: int):
        """Yield the next ``size`` bytes (fewer at the end of the stream) as views that are
        valid until the next call on this source."""
        while size > 0:
            if not self._view and not self._fill():
                return
            piece = self._view[:size]
            self._view = self._view[len(piece):]
            self._position += len(piece)
            size -= len(piece)
            yield piece

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise io.UnsupportedOperation("TarSource reads only a given number of bytes")
        if len(self._view) >= size:  # the common case: a header, a small listing
            data = bytes(self._view[:size])
            self._view = self._view[size:]
            self._position += size
            return data
        return b"".join(bytes(piece) for piece in self.pieces(size))

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or position < self._position:
            raise io.UnsupportedOperation("the tar stream can only be read forward")
        for _ in self.pieces(position - self._position):
            pass
        return self._position


class ReadAhead(io.RawIOBase):
    """Readable that reads ``source`` on a helper thread, ahead of its reader.

    Extracting in one thread takes turns between decrypting (and decompressing) the archive and
    hashing and writing the files; with this the two halves overlap on two cores (AES-GCM,
    zstd, hashlib and file I/O all release the GIL). The helper queues up to
    ``READ_AHEAD_PIECES`` pieces of ``COPY_BYTES``. Whatever ``source`` raises is raised by the
    read that reaches that point of the stream, so every error surfaces where it always did.
    ``close`` stops the helper and waits for it; ``source`` itself is never closed.
    """

    def __init__(self, source):
        super().__init__()
        self._source = source
        self._queue: queue.Queue = queue.Queue(READ_AHEAD_PIECES)
        self._stop = threading.Event()
        self._piece = b""
        self._pos = 0
        self._eof = False
        self._error: BaseException | None = None  # what ended the stream, once reached
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                piece = self._source.read(COPY_BYTES)
            except BaseException as exc:  # handed to the reading thread, in stream order
                self._queue.put(exc)
                return
            self._queue.put(piece)
            if not piece:
                return

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        while self._pos >= len(self._piece):
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            item = self._queue.get()  # the helper ends every stream with b"" or an error
            if isinstance(item, BaseException):
                self._error = item
            elif not item:
                self._eof = True
            else:
                self._piece, self._pos = item, 0
        if self._pos == 0 and size >= len(self._piece):
            self._pos = len(self._piece)
            return self._piece  # the whole piece, without a copy
        data = self._piece[self._pos:self._pos + size]
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            while self._thread.is_alive():  # unblock a helper waiting for room
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
            super().close()
