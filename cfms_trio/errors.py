"""One exception hierarchy for everything the server reports to a client.

Each class carries the wire code of SPEC §3, so the dispatcher converts an error into a response
in exactly one place. Messages are written for the person reading the client's output: they name
the offending field or object and never include a server path or a stack trace.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets


class CfmsError(Exception):
    """Base of every error that is reported to a client with a code and a message."""

    code = 500

    def __init__(self, message: str, *, data: dict | None = None):
        super().__init__(message)
        self.message = message
        self.data = data or {}


class BadRequest(CfmsError):
    """Malformed message, unknown action, schema violation, or invalid content (400)."""

    code = 400


class Unauthorized(CfmsError):
    """Missing, invalid or expired credentials (401)."""

    code = 401


class Forbidden(CfmsError):
    """Authenticated but not permitted (403)."""

    code = 403


class NotFound(CfmsError):
    """No such object, or one the caller may not see (404)."""

    code = 404


class DeadlinePassed(CfmsError):
    """A deadline attached to the object has passed (408)."""

    code = 408


class Conflict(CfmsError):
    """Duplicate id or name, or an object in the wrong state for the request (409)."""

    code = 409


class TooLarge(CfmsError):
    """A size or count limit was exceeded (413)."""

    code = 413


class InsufficientStorage(CfmsError):
    """The server's disk (or its quota) is full: nothing was stored, and retrying later, once
    space was freed, can succeed (507)."""

    code = 507


class BackupTargetError(CfmsError):
    """A backup target outside the server (an S3 service) refused or could not be reached
    (502); the message says which and why, never a credential."""

    code = 502


class StorageUnavailable(CfmsError):
    """The content storage (an S3 bucket given by `serve --storage`) refused or could not be
    reached (503): nothing was lost, and retrying once it is back can succeed; the message
    names the bucket and the cause, never a credential."""

    code = 503


class ContentMissing(CfmsError):
    """A File row's stored content is not in the content storage (500: the server's data was
    removed or lost outside it). The message names the file and the storage; an administrator
    restores it from a backup."""

    code = 500


class InternalError(CfmsError):
    """Unexpected failure; the message carries only a log reference (500)."""

    code = 500


class ImportAborted(CfmsError):
    """The server is shutting down; an import is abandoned and rolled back."""

    code = 503


class StartupError(Exception):
    """The server cannot start on what it was given (a database of a newer release, an
    unreachable database): `serve` prints the message as one line and exits 1. Never sent to
    a client."""


class SchemaTooNew(StartupError):
    """The database's schema was upgraded by a newer release than this code."""


class ArchiveError(BadRequest):
    """A backup archive or key file is unreadable, tampered with, or breaks the format.

    Raised by the archive readers; the import pipeline turns it into the task's
    ``error_message``.
    """


class ArchiveLimitExceeded(ArchiveError):
    """A backup archive exceeds a configured limit (size, members, extracted bytes, JSON)."""

    code = 413


def internal_error(log: logging.Logger, doing: str, exc: BaseException | None = None
                   ) -> InternalError:
    """Log an unexpected failure with a fresh reference and return the error a client sees:
    "internal error while <doing> (log reference R)", never a stack trace or a path."""
    reference = secrets.token_hex(6)
    log.error("internal error while %s [ref %s]", doing, reference,
              exc_info=exc if exc is not None else True)
    return InternalError(f"internal error while {doing} (log reference {reference})")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_error(log: logging.Logger, exc: OSError, doing: str) -> CfmsError:
    """The error a client sees for a failed disk operation: 507 with the cause when the disk
    or quota is full (the client can retry later), otherwise a 500 with a log reference."""
    if exc.errno in DISK_FULL_ERRNOS:
        message = describe_os_error(exc, doing)
        log.warning("%s", message)
        return InsufficientStorage(message)
    return internal_error(log, doing, exc)


def describe_os_error(exc: OSError, doing: str) -> str:
    """A message for a failed disk operation that names the cause, never a server path."""
    if exc.errno == errno.ENOSPC:
        return f"the server ran out of disk space while {doing}"
    if exc.errno == errno.EDQUOT:
        return f"the server's disk quota was exceeded while {doing}"
    return f"disk error while {doing} ({os.strerror(exc.errno) if exc.errno else 'I/O error'})"
