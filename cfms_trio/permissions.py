"""Permission names and access-rule evaluation (SPEC §4). Pure functions."""

from __future__ import annotations

import json

from .conventions import (
    ACCESS_TYPES,
    RULE_DATA_MAX_BYTES,
    RULE_MATCH_GROUPS_MAX,
    RULE_REQUIRE_NAMES_MAX,
    RULES_PER_ACCESS_TYPE_MAX,
    SYSOP_GROUP,
)
from .errors import BadRequest, TooLarge


def _matches(mode: str, results: list[bool]) -> bool:
    if mode == "any":
        return any(results)
    return all(results)


def _entry_allows(entry: dict, permissions: set[str], groups: set[str]) -> bool:
    """One `match_groups` entry. Only the requirements it states take part: an absent or
    empty `rights`/`groups` must not satisfy an entry whose `match` is "any" by itself (that
    would open an object its author meant to restrict to a group). No requirement: satisfied.
    """
    results = []
    for key, held in (("rights", permissions), ("groups", groups)):
        spec = entry.get(key)
        required = spec.get("require", []) if spec else []
        if required:
            results.append(_matches(spec.get("match", "all"), [r in held for r in required]))
    if not results:
        return True
    return _matches(entry.get("match", "all"), results)


def rule_allows(rule: dict, permissions: set[str], groups: set[str]) -> bool:
    """Evaluate one access rule against the caller's permissions and groups."""
    results = [_entry_allows(entry, permissions, groups) for entry in rule.get("match_groups", [])]
    if not results:
        return True
    return _matches(rule.get("match", "all"), results)


def rules_allow(rules: list[dict], permissions: set[str], groups: set[str]) -> bool:
    """An object's rules for one access type: no rules means open to any authenticated user;
    otherwise every rule must allow."""
    return all(rule_allows(rule, permissions, groups) for rule in rules)


def validate_rule(rule) -> str | None:
    """Return a description of what is wrong with a rule, or None when it is well formed.

    Counts are checked before anything is walked, so a hostile rule costs no more than a
    bounded one to refuse.
    """
    if not isinstance(rule, dict):
        return "a rule must be an object"
    if rule.get("match", "all") not in ("all", "any"):
        return "rule 'match' must be 'all' or 'any'"
    groups = rule.get("match_groups", [])
    if not isinstance(groups, list):
        return "rule 'match_groups' must be a list"
    if len(groups) > RULE_MATCH_GROUPS_MAX:
        return f"rule 'match_groups' has {len(groups)} entries, more than {RULE_MATCH_GROUPS_MAX}"
    extra = set(rule) - {"match", "match_groups"}
    if extra:
        return f"unknown rule field '{sorted(extra)[0]}'"
    for spec in groups:
        if not isinstance(spec, dict):
            return "each entry of 'match_groups' must be an object"
        if set(spec) - {"match", "rights", "groups"}:
            return "unknown field in 'match_groups' entry"
        if spec.get("match", "all") not in ("all", "any"):
            return "'match' must be 'all' or 'any'"
        for key in ("rights", "groups"):
            sub = spec.get(key)
            if sub is None:
                continue
            if not isinstance(sub, dict) or set(sub) - {"match", "require"}:
                return f"'{key}' must be an object with 'match' and 'require'"
            if sub.get("match", "all") not in ("all", "any"):
                return f"'{key}.match' must be 'all' or 'any'"
            req = sub.get("require", [])
            if not isinstance(req, list):
                return f"'{key}.require' must be a list of strings"
            if len(req) > RULE_REQUIRE_NAMES_MAX:
                return (f"'{key}.require' lists {len(req)} names, more than "
                        f"{RULE_REQUIRE_NAMES_MAX}")
            if not all(isinstance(x, str) for x in req):
                return f"'{key}.require' must be a list of strings"
    return None


def rule_data_bytes(rule: dict) -> int:
    """The size of a rule as it is stored: compact JSON, UTF-8."""
    return len(json.dumps(rule, separators=(",", ":")).encode())


def validate_rules(rules, field: str = "data.access_rules") -> None:
    """Check a {access_type: [rule, ...]} mapping or raise naming `field` and the access type:
    BadRequest (400) for a malformed rule, TooLarge (413) past a bound. Nothing is stored
    before this passes, so an oversized request costs only this check."""
    if not isinstance(rules, dict):
        raise BadRequest(f"field '{field}': access rules must be an object keyed by access type")
    for access_type, items in rules.items():
        if access_type not in ACCESS_TYPES:
            raise BadRequest(f"field '{field}': unknown access type '{access_type}'")
        where = f"field '{field}.{access_type}'"
        if not isinstance(items, list):
            raise BadRequest(f"{where}: rules for '{access_type}' must be a list")
        if len(items) > RULES_PER_ACCESS_TYPE_MAX:
            raise TooLarge(f"{where}: {len(items)} rules for '{access_type}', more than the "
                           f"limit of {RULES_PER_ACCESS_TYPE_MAX} per access type")
        for index, rule in enumerate(items):
            rule_where = f"field '{field}.{access_type}[{index}]'"
            problem = validate_rule(rule)
            if problem:
                raise BadRequest(f"{rule_where}: {problem}")
            size = rule_data_bytes(rule)
            if size > RULE_DATA_MAX_BYTES:
                raise TooLarge(f"{rule_where}: the rule takes {size} bytes, more than the "
                               f"limit of {RULE_DATA_MAX_BYTES}")


class Principal:
    """The authenticated caller of a request: who, and what they hold."""

    __slots__ = ("username", "permissions", "groups", "nickname")

    def __init__(self, username: str, permissions: frozenset[str], groups: frozenset[str],
                 nickname: str = ""):
        self.username = username
        self.permissions = permissions
        self.groups = groups
        self.nickname = nickname

    def has(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def is_sysop(self) -> bool:
        """A member of `sysop`: passes every access rule and sees every backup task."""
        return SYSOP_GROUP in self.groups

    def lacks(self, *, permissions=(), groups=()) -> str | None:
        """The first of `permissions` and `groups` this caller does not hold itself, as a
        clause for a message ("you do not hold permission 'x'"), or None when it holds them
        all.

        This is the rule for handing on rights (issue 12): a caller may grant, revoke or take
        over only what it holds itself. A `sysop` member holds everything.
        """
        if self.is_sysop:
            return None
        for permission in sorted(set(permissions) - self.permissions):
            return f"you do not hold permission '{permission}'"
        for group in sorted(set(groups) - self.groups):
            return f"you are not a member of group '{group}'"
        return None
