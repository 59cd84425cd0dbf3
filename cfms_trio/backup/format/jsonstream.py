"""Decoding untrusted JSON strictly, whole (key files, metadata) or streamed (listings).

Listings can be as large as ``ArchiveLimits.json_member_bytes``; building them whole first costs
a multiple of their size before the first entry is checked (a 32 MiB ``[[],[],...]`` cost
1.7 GB). ``JsonArray`` reads a listing from its tar member with ijson's event parser (its C
backend, yajl, where the wheel has one) and hands out one top-level element at a time, so the
caller validates each entry as it arrives and memory is the entries kept plus a constant.

ijson rejects ``NaN``/``Infinity``, invalid UTF-8, control characters and trailing data itself.
What it does not do is done here, on its event stream: duplicate keys, the nesting depth, the
byte count of the member. yajl decodes an unpaired surrogate escape (``"\\ud800"``) into a
wrong character instead of refusing it, so ``_SurrogateScanner`` refuses those in the raw bytes
before the parser sees them. Every failure is an ``ArchiveError`` naming ``what``.
"""

from __future__ import annotations

import io
import re
from typing import Any, BinaryIO, Callable, Iterator

import ijson

from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

PARSE_BUFFER_BYTES = 64 * 1024  # read from the member per parser step
ERROR_DETAIL_CHARS = 200
SHOWN_KEY_CHARS = 100
# Without a depth limit (key files) nesting still stops here; the builder needs no recursion,
# so this only keeps nonsense short.
DEFAULT_DEPTH_LIMIT = 512


def _backend():
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:  # a platform without the compiled backend: same events, slower
        return ijson.get_backend("python")


_BACKEND = _backend()
_JSON_ERRORS = (ijson.JSONError, UnicodeDecodeError, ValueError)

# One match per escape sequence starting at a backslash: an escaped backslash, a valid
# surrogate pair, a lone surrogate, or any other escape (its tail is never a backslash).
_ESCAPE = re.compile(
    rb"\\(?:\\|(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(u[dD][0-9a-fA-F]{3})|)"
)
_LONGEST_ESCAPE_BYTES = 12  # a surrogate pair, \uXXXX\uXXXX
_BARE_CONSTANT = re.compile(r"-?(?:NaN|Infinity)")


class _SurrogateScanner:
    """Refuses escapes of unpaired UTF-16 surrogates in raw JSON bytes, chunk by chunk.

    Backslashes occur only inside strings, where each starts one escape, so scanning escapes
    left to right from any escape boundary is exact. An escape that may continue into the
    next chunk is carried over (at most one escape's worth of bytes).
    """

    def __init__(self, what: str):
        self.what = what
        self.carry = b""

    def feed(self, chunk: bytes, final: bool) -> None:
        data = self.carry + chunk
        self.carry = b""
        if b"\\" not in data:
            return
        safe_end = len(data) if final else len(data) - _LONGEST_ESCAPE_BYTES
        for match in _ESCAPE.finditer(data):
            if match.start() >= safe_end:
                self.carry = data[match.start():]
                return
            if match.group(2) is not None:
                raise ArchiveError(
                    f"{self.what} is not valid JSON: unpaired surrogate escape "
                    f"\\{match.group(2).decode('ascii')}"
                )


class _MemberReader:
    """The bytes of one JSON document, counted against ``size`` and scanned for surrogates.

    A plain object with ``read`` only: ijson prefers ``readinto`` when a file has one.
    """

    def __init__(self, source: BinaryIO, size: int, what: str):
        self.source = source
        self.size = size
        self.what = what
        self.consumed = 0
        self.scanner = _SurrogateScanner(what)

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        want = self.size - self.consumed
        if size is not None and size >= 0:
            want = min(want, size)
        data = self.source.read(want) if want else b""
        self.consumed += len(data)
        if want and not data:
            raise ArchiveError(f"{self.what} is truncated")
        self.scanner.feed(data, final=self.consumed == self.size)
        return data


def _describe(exc: BaseException, what: str) -> ArchiveError:
    """Turn a parser error into the error a user reads."""
    text = str(exc) or type(exc).__name__
    lines = text.splitlines()
    if isinstance(exc, UnicodeDecodeError) or "UTF8" in lines[0] or "utf-8" in lines[0]:
        return ArchiveError(f"{what} is not valid UTF-8")
    if len(lines) >= 3 and "^" in lines[2]:  # yajl: message, the text near the error, a caret
        column = lines[2].index("^")
        near = lines[1][max(column - 1, 0):]
        if constant := _BARE_CONSTANT.match(near.lstrip(",:[ ")):
            return ArchiveError(f"{what} is not valid JSON: {constant.group()} is not allowed")
    elif constant := _BARE_CONSTANT.search(text):  # the python backend names the symbol
        return ArchiveError(f"{what} is not valid JSON: {constant.group()} is not allowed")
    return ArchiveError(f"{what} is not valid JSON: {lines[0][:ERROR_DETAIL_CHARS]}")


class _Builder:
    """Builds one value from parser events, refusing duplicate keys and excess depth."""

    def __init__(self, what: str, depth_limit: int | None, base_depth: int):
        self.what = what
        self.depth_limit = DEFAULT_DEPTH_LIMIT if depth_limit is None else depth_limit
        self.limited = depth_limit is not None
        self.base_depth = base_depth  # depth of the containers the built value sits in

    def _too_deep(self) -> ArchiveError:
        if self.limited:
            return ArchiveLimitExceeded(
                f"{self.what} nests deeper than the limit of {self.depth_limit}"
            )
        return ArchiveError(f"{self.what} is not valid JSON (nested too deeply)")

    def build(self, event: str, value, events: Iterator) -> object:
        """Build the value that starts with ``(event, value)``, pulling the rest from events."""
        if event not in ("start_map", "start_array"):
            return value
        stack: list = []  # (container, pending key) pairs
        keys: list[str | None] = []
        while True:
            if event in ("start_map", "start_array"):
                if self.base_depth + len(stack) + 1 > self.depth_limit:
                    raise self._too_deep()
                stack.append({} if event == "start_map" else [])
                keys.append(None)
                event, value = next(events)
                continue
            if event == "map_key":
                if value in stack[-1]:
                    shown = value if len(value) <= SHOWN_KEY_CHARS else value[:SHOWN_KEY_CHARS]
                    raise ArchiveError(f"{self.what} is not valid JSON: duplicate key {shown!r}")
                keys[-1] = value
                event, value = next(events)
                continue
            if event in ("end_map", "end_array"):
                value = stack.pop()
                keys.pop()
                if not stack:
                    return value
            container = stack[-1]
            if isinstance(container, list):
                container.append(value)
            else:
                container[keys[-1]] = value
            event, value = next(events)


def _events(reader: BinaryIO) -> Iterator:
    return _BACKEND.basic_parse(reader, use_float=True, buf_size=PARSE_BUFFER_BYTES)


def decode_json(data: bytes, what: str, depth_limit: int | None = None):
    """Decode an untrusted UTF-8 JSON document held in memory (key files, small members).

    Duplicate object keys, ``NaN``/``Infinity`` and unpaired surrogates are refused. With
    ``depth_limit``, nesting deeper than it raises ``ArchiveLimitExceeded``; without one, very
    deep nesting is simply invalid JSON.
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"{what} is not valid UTF-8") from None
    reader = _MemberReader(io.BytesIO(data), len(data), what)
    events = _events(reader)
    builder = _Builder(what, depth_limit, base_depth=0)
    try:
        event, value = next(events)
        result = builder.build(event, value, events)
        for _ in events:  # the parser refuses anything after the value
            pass
    except StopIteration:
        raise ArchiveError(f"{what} is not valid JSON: it ends too early") from None
    except _JSON_ERRORS as exc:
        raise _describe(exc, what) from None
    return result


class JsonArray:
    """A listing read from a tar member as a stream of its top-level array's elements.

    Iterate once: each element is built and handed out before the next byte of the following
    one is parsed. The member must hold exactly one JSON array; ``member`` names it in the
    "must be a JSON array" error, ``what`` in the others.
    """

    def __init__(
        self, source: BinaryIO, size: int, member: str, what: str, depth_limit: int | None,
        each: Callable[[Any], Any] | None = None,
    ):
        self.each = each  # applied to every element as it is handed out
        self.member = member
        self.what = what
        self.reader = _MemberReader(source, size, what)
        self.builder = _Builder(what, depth_limit, base_depth=1)
        self.depth_limit = depth_limit

    def __iter__(self) -> Iterator:
        events = _events(self.reader)
        try:
            event, _ = next(events)
            if event != "start_array":
                for _ in events:  # invalid JSON is told first, as when decoded whole
                    pass
                raise ArchiveError(f"{self.member} must be a JSON array")
            if self.depth_limit is not None and self.depth_limit < 1:
                raise self.builder._too_deep()
            for event, value in events:
                if event == "end_array":
                    break
                element = self.builder.build(event, value, events)
                yield element if self.each is None else self.each(element)
            for _ in events:  # the parser refuses anything after the array
                pass
        except StopIteration:
            raise ArchiveError(f"{self.what} is not valid JSON: it ends too early") from None
        except _JSON_ERRORS as exc:
            raise _describe(exc, self.what) from None
