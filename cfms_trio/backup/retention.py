"""Retention policies of backup schedules: which backups to keep, which to prune (pure).

A policy `{last?, daily?, weekly?, monthly?}` keeps, among a schedule's *verified* backups
(latest verification ok), the `last` newest, plus the newest of each of the `daily` most recent
days (UTC) that have one, of the `weekly` most recent ISO weeks and of the `monthly` most recent
months. The newest verified backup is always kept. What is pruned: every other backup of the
schedule made before that newest verified one, including those whose verification failed (they
cannot restore, and a newer verified one exists). Nothing newer than the newest verified backup
is ever pruned, and a schedule with no verified backup prunes nothing.
"""

from __future__ import annotations

import time

from ..errors import BadRequest
from ..storage.backups import VERIFY_OK

KEEP_FIELDS = ("last", "daily", "weekly", "monthly")
KEEP_MAX = 100_000


def parse_keep(value: dict | None) -> dict | None:
    """A retention policy from a request, checked (400 naming the field); None keeps all."""
    if value is None:
        return None
    unknown = sorted(set(value) - set(KEEP_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field 'data.keep.{unknown[0]}' (a policy has "
                         f"{', '.join(KEEP_FIELDS)})")
    keep = {}
    for field in KEEP_FIELDS:
        count = value.get(field)
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= KEEP_MAX:
            raise BadRequest(f"field 'data.keep.{field}' must be an integer from 0 to "
                             f"{KEEP_MAX}")
        keep[field] = count
    if not any(keep.values()):
        raise BadRequest("field 'data.keep' must keep at least one backup (e.g. "
                         "{\"last\": 7}); leave it out to keep every backup")
    return keep


def _buckets(created_time: float) -> dict[str, tuple]:
    moment = time.gmtime(created_time)
    iso = time.strftime("%G-%V", moment)
    return {"daily": (moment.tm_year, moment.tm_yday), "weekly": (iso,),
            "monthly": (moment.tm_year, moment.tm_mon)}


def plan_pruning(backups: list[dict], keep: dict | None) -> tuple[list[dict], list[dict]]:
    """Split one schedule's backups into (kept, pruned), each newest first."""
    ordered = sorted(backups, key=lambda b: (b["created_time"], b["name"]), reverse=True)
    verified = [b for b in ordered if b["verify_result"] == VERIFY_OK]
    if keep is None or not verified:
        return ordered, []
    chosen = {verified[0]["name"]}
    chosen.update(b["name"] for b in verified[:keep.get("last", 0)])
    for period in ("daily", "weekly", "monthly"):
        wanted = keep.get(period, 0)
        seen: list[tuple] = []
        for backup in verified:
            if len(seen) >= wanted:
                break
            bucket = _buckets(backup["created_time"])[period]
            if bucket not in seen:
                seen.append(bucket)
                chosen.add(backup["name"])
    newest = verified[0]
    newest_key = (newest["created_time"], newest["name"])
    pruned = [b for b in ordered if b["name"] not in chosen
              and (b["created_time"], b["name"]) < newest_key]
    gone = {b["name"] for b in pruned}
    return [b for b in ordered if b["name"] not in gone], pruned
