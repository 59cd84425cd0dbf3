"""The wire envelope of SPEC §3: parsing requests and shaping responses and events.

Pure functions with no trio and no database, so every client and test can share them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from .errors import BadRequest, CfmsError

_MISSING = object()

# SQLite stores integers in 64 bits; a larger one makes the driver fail (issue 12 item 13).
STORABLE_INT_MIN = -2**63
STORABLE_INT_MAX = 2**63 - 1


def _unstorable(value) -> str | None:
    """Why one JSON scalar cannot be stored or echoed safely, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "text that is not valid Unicode (a lone surrogate)"
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if not STORABLE_INT_MIN <= value <= STORABLE_INT_MAX:
            return f"an integer outside {STORABLE_INT_MIN}..{STORABLE_INT_MAX}"
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return "a number that is not finite"
    return None


def check_storable(value, field: str) -> None:
    """BadRequest naming the place when `value` (decoded JSON, nested to any depth) holds a
    string that cannot be encoded to UTF-8, an integer outside SQLite's 64-bit range or a
    non-finite number. Every value a client sends passes here before it is used: request data
    (`schema.validate`), the envelope, and the messages inside transfer sequences."""
    pending = [(value, field)]
    while pending:  # iterative: a deeply nested value must not exhaust the stack
        item, where = pending.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                if _unstorable(key):
                    raise BadRequest(f"field '{where}' holds a key that is {_unstorable(key)}")
                pending.append((sub, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            pending.extend((sub, f"{where}[{index}]") for index, sub in enumerate(item))
        elif (problem := _unstorable(item)) is not None:
            raise BadRequest(f"field '{where}' holds {problem}")


@dataclasses.dataclass
class Request:
    action: str
    data: dict
    username: str | None
    token: str | None
    request_id: Any = _MISSING

    @property
    def has_request_id(self) -> bool:
        return self.request_id is not _MISSING


def parse_request(text: str) -> Request:
    """Parse one text message into a Request, or raise BadRequest naming what is wrong.

    When the message is JSON but invalid, the error carries the request_id (if any) so the
    response can still echo it.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest("malformed JSON message") from None
    if not isinstance(obj, dict):
        raise BadRequest("message must be a JSON object")
    request_id = obj.get("request_id", _MISSING)
    partial = Request(action="", data={}, username=None, token=None, request_id=request_id)

    def fail(message: str) -> BadRequest:
        err = BadRequest(message)
        err.request = partial
        return err

    action = obj.get("action")
    if not isinstance(action, str) or not action:
        raise fail("field 'action' must be a non-empty string")
    partial.action = action
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail("field 'data' must be an object")
    partial.data = data
    for field in ("username", "token"):
        value = obj.get(field)
        if value is not None and not isinstance(value, str):
            raise fail(f"field '{field}' must be a string")
    for field in ("action", "username", "token"):
        try:
            check_storable(obj.get(field), field)
        except BadRequest as err:
            raise fail(err.message) from None
    partial.username = obj.get("username")
    partial.token = obj.get("token")
    return partial


def response(code: int, message: str, data: dict | None = None, request: Request | None = None) -> dict:
    """Build a response envelope; echo the request's request_id when it carried one."""
    out = {"code": code, "message": message, "data": data or {}, "timestamp": time.time()}
    if request is not None and request.has_request_id:
        out["request_id"] = request.request_id
    return out


def success(data: dict | None = None, request: Request | None = None) -> dict:
    return response(200, "success", data, request)


def error_response(err: CfmsError, request: Request | None = None) -> dict:
    return response(err.code, err.message, err.data, request)


def event(name: str, data: dict) -> dict:
    """A server-initiated message: it has an action and data but no code."""
    return {"action": name, "data": data}


def encode(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))
