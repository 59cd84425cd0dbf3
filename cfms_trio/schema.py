"""Declarative validation of request data.

Each action declares its fields once in the routing table; `validate` checks a request's data
against them and answers BadRequest naming the offending field. Unknown fields are rejected so a
typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .conventions import ID_PATTERN
from .errors import BadRequest
from .protocol import check_storable

_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of an action's data object."""

    kind: type | tuple[type, ...]
    required: bool = True
    default: Any = _NO_DEFAULT
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    min_len: int | None = None
    choices: tuple | None = None
    pattern: re.Pattern | None = None


def optional(kind, default=None, **kw) -> Field:
    return Field(kind, required=False, default=default, **kw)


def object_id(required: bool = True, nullable: bool = False) -> Field:
    return Field(str, required=required, default=None, nullable=nullable, pattern=ID_PATTERN)


def name_field(max_len: int = 255) -> Field:
    return Field(str, min_len=1, max_len=max_len)


def _type_ok(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _type_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def validate(data: dict, schema: dict[str, Field]) -> dict:
    """Return a new dict holding every schema field (defaults filled in) or raise BadRequest."""
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise BadRequest(f"unknown field 'data.{unknown[0]}'")
    out = {}
    for name, spec in schema.items():
        if name not in data or (data[name] is None and not spec.nullable and not spec.required):
            if spec.required:
                raise BadRequest(f"missing field 'data.{name}'")
            out[name] = None if spec.default is _NO_DEFAULT else spec.default
            continue
        value = data[name]
        check_storable(value, f"data.{name}")
        if value is None:
            if spec.nullable:
                out[name] = None
                continue
            raise BadRequest(f"field 'data.{name}' must be {_type_name(spec.kind)}")
        if not _type_ok(value, spec.kind):
            raise BadRequest(f"field 'data.{name}' must be {_type_name(spec.kind)}")
        if spec.min is not None and value < spec.min:
            raise BadRequest(f"field 'data.{name}' must be at least {spec.min}")
        if spec.max is not None and value > spec.max:
            raise BadRequest(f"field 'data.{name}' must be at most {spec.max}")
        if spec.max_len is not None and len(value) > spec.max_len:
            raise BadRequest(f"field 'data.{name}' is longer than {spec.max_len}")
        if spec.min_len is not None and len(value) < spec.min_len:
            raise BadRequest(f"field 'data.{name}' must not be empty")
        if spec.choices is not None and value not in spec.choices:
            allowed = ", ".join(repr(c) for c in spec.choices)
            raise BadRequest(f"field 'data.{name}' must be one of {allowed}")
        if spec.pattern is not None and not spec.pattern.fullmatch(value):
            raise BadRequest(f"field 'data.{name}' has an invalid format")
        out[name] = value
    return out
