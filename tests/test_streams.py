"""The byte-path helpers of issue 15 (backup/format/streams.py, segments.py): a sealing thread
reports a failing disk where the exporter can see it and never hangs it, and the forward-only
tar source refuses to go back."""

from __future__ import annotations

import io
import os

import pytest
import trio

from cfms_trio.backup.format.segments import SegmentReader, SegmentWriter
from cfms_trio.backup.format import streams
from cfms_trio.backup.format.streams import DropBehindReader, DropBehindWriter, TarSource


class FailingAfter(io.RawIOBase):
    """A disk that fills up after `limit` bytes."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(self.data) + len(data) > self.limit:
            raise OSError(28, "No space left on device")
        self.data += data
        return len(data)


def test_segments_sealed_behind_read_back_as_the_same_plaintext():
    key = os.urandom(32)
    out = io.BytesIO()
    plaintext = os.urandom(5 * 65536 + 123)
    writer = SegmentWriter(out, key, chunk_log2=16, seal_behind=True)
    for start in range(0, len(plaintext), 10_000):
        writer.write(plaintext[start:start + 10_000])
    writer.close()
    reader = SegmentReader(io.BytesIO(out.getvalue()), key)
    assert reader.read() == plaintext and reader.finished


def test_a_write_failing_on_the_sealing_thread_is_raised_to_the_writer_and_abort_returns():
    writer = SegmentWriter(FailingAfter(3 * 65536), os.urandom(32), chunk_log2=16,
                           seal_behind=True)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(64):
            writer.write(os.urandom(65536))
        writer.close()
    writer.abort()  # returns: the helper thread has ended


def test_drop_behind_writer_writes_every_byte_in_order(tmp_path):
    data = os.urandom(20 * 1024 * 1024 + 7)
    path = tmp_path / "out"
    with open(path, "wb") as f:
        f.write(b"head")
        writer = DropBehindWriter(f, offset=4)
        for start in range(0, len(data), 1024 * 1024):
            writer.write(data[start:start + 1024 * 1024])
    assert path.read_bytes() == b"head" + data


def test_the_tar_source_reads_forward_only_and_counts_what_it_produced():
    source = TarSource(io.BytesIO(bytes(range(256)) * 8192), limit_bytes=10**9)
    assert source.read(10) == bytes(range(10))
    assert source.seek(1000) == 1000 and source.tell() == 1000
    assert bytes(b"".join(bytes(p) for p in source.pieces(5))) == bytes(
        (1000 + i) % 256 for i in range(5))
    with pytest.raises(io.UnsupportedOperation):
        source.seek(10)


async def test_send_ahead_stopping_early_with_a_full_channel_ends_quietly():
    """A consumer that stops while the producer waits on a full channel ends the pipeline
    without an error (the producer is cancelled, not left to fail on a closed channel)."""
    from cfms_trio.transfer.pipeline import send_ahead

    consumed = []

    async def consume(index: int, item: int) -> bool:
        consumed.append(item)
        await trio.sleep(0.2)  # the producer fills the channel and waits in send meanwhile
        return True

    with trio.fail_after(10):
        await send_ahead(range(10), lambda index: index * 2, consume, depth=1)
    assert consumed == [0]


async def test_send_ahead_consumer_error_comes_out_as_itself():
    from cfms_trio.transfer.pipeline import send_ahead

    async def consume(index: int, item: int) -> bool:
        await trio.sleep(0.2)
        raise ValueError(f"refused {index}")

    with trio.fail_after(10), pytest.raises(ValueError, match="refused 0"):
        await send_ahead(range(10), lambda index: index, consume, depth=1)


def test_drop_behind_reader_reads_every_byte_and_releases_what_it_read(tmp_path, monkeypatch):
    data = os.urandom(20 * 1024 * 1024 + 7)
    path = tmp_path / "archive"
    path.write_bytes(data)
    released: list[tuple[int, int]] = []
    monkeypatch.setattr(streams, "release_pages",
                        lambda fd, offset, length: released.append((offset, length)))
    with open(path, "rb", buffering=0) as f:
        reader = DropBehindReader(f)
        read = bytearray()
        while piece := reader.read(1024 * 1024 - 3):  # pieces that straddle the steps
            read += piece
    assert bytes(read) == data
    # Consecutive ranges from the start, each at least a step long but the last, covering all.
    assert released[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(released, released[1:]))
    assert sum(n for _, n in released) == len(data)
    assert all(n >= streams.WRITEBACK_START_BYTES for _, n in released[:-1])


def test_segment_reader_hands_out_whole_segments_and_any_smaller_pieces():
    key = os.urandom(32)
    out = io.BytesIO()
    plaintext = os.urandom(3 * 65536 + 5)
    writer = SegmentWriter(out, key, chunk_log2=16)
    writer.write(plaintext)
    writer.close()
    whole = SegmentReader(io.BytesIO(out.getvalue()), key)
    assert [len(whole.read(1 << 20)) for _ in range(5)] == [65536, 65536, 65536, 5, 0]
    pieces = SegmentReader(io.BytesIO(out.getvalue()), key)
    read = bytearray()
    while piece := pieces.read(10_000):
        read += piece
    assert bytes(read) == plaintext and pieces.finished
