"""Strict, streamed decoding of untrusted JSON (backup listings and key files).

A listing is checked entry by entry as it is parsed: a bad first entry is refused after reading
about one parser buffer, whatever follows. The strictness json.loads had with our hooks
(duplicate keys, NaN/Infinity, depth) holds for streamed listings too, and unpaired surrogate
escapes, which the C parser would turn into wrong characters, are refused.
"""

from __future__ import annotations

import io
import json

import pytest

from cfms_trio.backup.format import jsonstream, listings
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

FOLDER = {"id": "f1", "name": "a", "parent_id": None, "created_time": 1.0, "access_rules": []}
FOLDER_JSON = json.dumps(FOLDER).encode()


class CountingSource(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.consumed = 0

    def read(self, size=-1):
        data = super().read(size)
        self.consumed += len(data)
        return data


def parse_folders(entries, legacy: bool) -> list[dict]:
    """A folders listing entry by entry, as the reader parses it."""
    return [listings.parse_folder(entry, index, legacy) for index, entry in enumerate(entries)]


def streamed(data: bytes, depth_limit: int | None = 16) -> tuple[jsonstream.JsonArray,
                                                                  CountingSource]:
    source = CountingSource(data)
    return jsonstream.JsonArray(source, len(data), "folders.json", "archive member folders.json",
                                depth_limit), source


def parse(data: bytes, depth_limit: int | None = 16) -> list[dict]:
    return parse_folders(streamed(data, depth_limit)[0], legacy=False)


def test_a_streamed_listing_parses_like_a_whole_one():
    data = json.dumps([FOLDER, dict(FOLDER, id="f2", name="😀 \\ \"q\"")]).encode()
    assert parse(data) == parse_folders(json.loads(data), legacy=False)


def test_a_bad_first_entry_is_refused_after_reading_one_buffer():
    data = b"[" + b"[]," * (32 * 2**20 // 3) + b"[]]"
    entries, source = streamed(data)
    with pytest.raises(ArchiveError, match="folders.json: entry 0 must be a JSON object"):
        parse_folders(entries, legacy=False)
    assert source.consumed <= 2 * jsonstream.PARSE_BUFFER_BYTES


@pytest.mark.parametrize("data, message", [
    (b'[{"id": "f1", "id": "f2"}]', "not valid JSON: duplicate key 'id'"),
    (b'[{"id": "f1", "created_time": NaN}]', "NaN is not allowed"),
    (b'[{"id": "f1", "created_time": -Infinity}]', "Infinity is not allowed"),
    (b"[" + FOLDER_JSON + b"] []", "archive member folders.json is not valid JSON"),
    (b"[" + FOLDER_JSON, "archive member folders.json is not valid JSON"),
    (b'[{"name": "\xff"}]', "archive member folders.json is not valid UTF-8"),
    (b'{"id": "f1"}', "folders.json must be a JSON array"),
    (b'{"id": ', "archive member folders.json is not valid JSON"),
    (b'[{"name": "\\ud800"}]', "unpaired surrogate escape \\ud800"),
    (b'[{"name": "x\\udc00"}]', "unpaired surrogate escape \\udc00"),
    (b'[{"name": "\\ud800\\ud800"}]', "unpaired surrogate escape \\ud800"),
])
def test_what_json_loads_with_our_checks_refused_is_refused(data, message):
    with pytest.raises(ArchiveError, match=message.replace("\\", "\\\\")):
        parse(data)


def test_escaped_backslashes_are_not_escapes():
    data = json.dumps([dict(FOLDER, name="\\ud800 and \\\\\\\\ud800")]).encode()
    assert parse(data)[0]["name"] == "\\ud800 and \\\\\\\\ud800"


@pytest.mark.parametrize("offset", range(0, 14))
def test_escapes_across_parser_buffers_are_seen_whole(offset):
    """A surrogate pair or a lone surrogate split at every position across two reads."""
    pad = "x" * (jsonstream.PARSE_BUFFER_BYTES - len('[{"id": "f1", "name": "') - offset)
    good = json.dumps([dict(FOLDER, name=pad + "\U0001F600" + "\\")]).encode()
    assert parse(good)[0]["name"] == pad + "\U0001F600" + "\\"
    bad = good.replace(b"\\ude00", b"\\u0041", 1)
    with pytest.raises(ArchiveError, match="unpaired surrogate escape"):
        parse(bad)


def test_depth_is_limited_while_streaming():
    deep = b"[" + b"[" * 20 + b"]" * 20 + b"]"
    with pytest.raises(ArchiveLimitExceeded, match="nests deeper than the limit of 16"):
        parse(deep)
    bomb = b"[" * 1_000_000 + b"]" * 1_000_000
    with pytest.raises(ArchiveLimitExceeded, match="nests deeper than the limit of 16"):
        parse(bomb)


def test_a_member_shorter_than_its_header_says_is_truncated():
    data = json.dumps([FOLDER]).encode()
    entries = jsonstream.JsonArray(io.BytesIO(data), len(data) + 10, "folders.json",
                                   "archive member folders.json", 16)
    with pytest.raises(ArchiveError, match="folders.json is truncated"):
        list(entries)


def test_decode_json_whole_documents():
    assert jsonstream.decode_json(b'{"a": [1, 2.5, null, true, "s"]}', "key file") == {
        "a": [1, 2.5, None, True, "s"]}
    with pytest.raises(ArchiveError, match="key file is not valid JSON: duplicate key 'a'"):
        jsonstream.decode_json(b'{"a": 1, "a": 2}', "key file")
    with pytest.raises(ArchiveError, match="key file is not valid JSON"):
        jsonstream.decode_json(b"[" * 10_000, "key file")
