"""FileTask rows: the tickets that let one user upload or download one file until they expire."""

from __future__ import annotations

from ..conventions import new_id
from ..errors import Conflict, DeadlinePassed, Forbidden, NotFound


def create_task(m, file_id: str, mode: str, username: str, now: float, expires: float,
                purpose: str = "document", max_size: int | None = None) -> str:
    task_id = new_id()
    m.FileTask.create(id=task_id, file=file_id, mode=mode, user=username, start_time=now,
                      end_time=expires, purpose=purpose, max_size=max_size)
    return task_id


def register_file(m, file_id: str, path: str, size: int, sha256: str, now: float) -> None:
    """A File row for server-made content (an export archive or key), ready to download."""
    m.File.create(id=file_id, path=path, size=size, sha256=sha256, created_time=now, active=True)


def task_dict(task, file) -> dict:
    return {"task_id": task.id, "file_id": file.id, "mode": task.mode, "status": task.status,
            "username": task.__data__["user"],
            "start_time": task.start_time, "end_time": task.end_time, "purpose": task.purpose,
            "max_size": task.max_size, "declared_size": task.declared_size,
            "declared_sha256": task.declared_sha256, "file_path": file.path,
            "file_size": file.size, "file_sha256": file.sha256, "file_active": file.active}


def task_for_transfer(m, task_id: str, username: str, mode: str, now: float) -> dict:
    """The task, if `username` may use it for `mode` now; otherwise the precise refusal."""
    row = (m.FileTask.select(m.FileTask, m.File).join(m.File)
           .where(m.FileTask.id == task_id).first())
    if row is None or row.mode != mode:
        raise NotFound(f"{mode} task '{task_id}' does not exist")
    if row.__data__["user"] != username:
        raise Forbidden(f"task '{task_id}' belongs to another user")
    if row.status == "completed" and mode == "upload":
        raise Conflict(f"upload task '{task_id}' is already completed")
    if row.status == "closed":
        raise Conflict(f"task '{task_id}' is closed")
    if row.end_time <= now:
        raise DeadlinePassed(f"task '{task_id}' expired")
    return task_dict(row, row.file)


def record_declared(m, task_id: str, size: int, sha256: str) -> None:
    m.FileTask.update(declared_size=size, declared_sha256=sha256).where(
        m.FileTask.id == task_id).execute()


def complete_upload(m, task_id: str, file_id: str, size: int, sha256: str) -> None:
    updated = (m.FileTask.update(status="completed")
               .where((m.FileTask.id == task_id) & (m.FileTask.status == "open")).execute())
    if not updated:
        raise Conflict(f"upload task '{task_id}' is no longer open")
    m.File.update(size=size, sha256=sha256, active=True).where(m.File.id == file_id).execute()


def open_upload_task_ids(m, now: float) -> set[str]:
    """Upload tasks that may still receive bytes (open and not expired)."""
    return {t.id for t in m.FileTask.select(m.FileTask.id).where(
        (m.FileTask.mode == "upload") & (m.FileTask.status == "open")
        & (m.FileTask.end_time > now))}


def task_ids_of(m, username: str) -> list[str]:
    """Every file task (upload or download) `username` holds."""
    return [t.id for t in m.FileTask.select(m.FileTask.id).where(m.FileTask.user == username)]


def close_expired_tasks(m, now: float) -> int:
    """Mark every open task past its expiry closed; returns how many."""
    return (m.FileTask.update(status="closed")
            .where((m.FileTask.status == "open") & (m.FileTask.end_time <= now)).execute())
