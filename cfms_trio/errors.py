"""One exception hierarchy for everything the server reports to a client.

Each class carries the wire code of SPEC §3, so the dispatcher converts an error into a response
in exactly one place. Messages are written for the person reading the client's output: they name
the offending field or object and never include a server path or a stack trace.
"""


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


class InternalError(CfmsError):
    """Unexpected failure; the message carries only a log reference (500)."""

    code = 500


class ArchiveError(BadRequest):
    """A backup archive or key file is unreadable, tampered with, or breaks the format.

    Raised by the archive readers; the import pipeline turns it into the task's
    ``error_message``.
    """


class ArchiveLimitExceeded(ArchiveError):
    """A backup archive exceeds a configured limit (size, members, extracted bytes, JSON)."""

    code = 413
