"""peewee models, built per database.

`build_models(database)` returns a fresh set of model classes bound to that database, so several
server instances (two servers in one test process, say) never share class-level state. Code
outside `cfms_trio.storage` never touches these classes: it calls storage functions. A change
here needs its migration in `migrations.py` (a database made by an earlier release gets it there).
"""

from __future__ import annotations

import types

import peewee as pw

from . import backends

ALL_MODEL_NAMES = (
    "User", "Group", "UserGroup", "Token", "AuditLog", "Folder", "Document", "File",
    "Revision", "AccessRule", "FileTask", "BackupTask", "BackupSchedule", "Backup",
    "ClusterEvent",
)

# Named so the migration that adds it to older databases (storage/migrations.py) names the same.
REVISION_HISTORY_INDEX = "revision_document_id_seq"


def build_models(database: pw.Database) -> types.SimpleNamespace:
    """Define every table of the store on `database`; return them as a namespace."""

    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    Base._meta.set_database(database)

    class User(Base):
        username = pw.CharField(primary_key=True, max_length=64)
        password_hash = pw.CharField()
        nickname = pw.CharField(default="")
        permissions = pw.TextField(default="[]")  # JSON list granted directly to the user
        created_time = pw.FloatField()
        passwd_last_modified = pw.FloatField()

    class Group(Base):
        name = pw.CharField(primary_key=True, max_length=64)
        permissions = pw.TextField(default="[]")  # JSON list
        created_time = pw.FloatField()

    class UserGroup(Base):
        user = pw.ForeignKeyField(User, on_delete="CASCADE", column_name="username")
        group = pw.ForeignKeyField(Group, on_delete="CASCADE", column_name="group_name")

        class Meta:
            primary_key = pw.CompositeKey("user", "group")

    class Token(Base):
        token_hash = pw.CharField(primary_key=True)
        user = pw.ForeignKeyField(User, on_delete="CASCADE", column_name="username")
        created_time = pw.FloatField()
        expires_time = pw.FloatField(index=True)

    class AuditLog(Base):
        id = pw.AutoField()
        time = pw.FloatField(index=True)
        username = pw.CharField(null=True)
        action = pw.CharField()
        target = pw.CharField(null=True)
        result = pw.IntegerField()
        address = pw.CharField(null=True)

    class Folder(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        name = pw.CharField()
        parent = pw.ForeignKeyField("self", null=True, column_name="parent_id",
                                    on_delete="RESTRICT", backref="children")
        created_time = pw.FloatField()

    class Document(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        title = pw.CharField()
        folder = pw.ForeignKeyField(Folder, null=True, column_name="folder_id",
                                    on_delete="RESTRICT", backref="documents")
        created_time = pw.FloatField()

    class File(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        sha256 = pw.CharField(null=True)
        size = pw.BigIntegerField(null=True)
        path = pw.CharField()  # relative to the content folder, never absolute
        created_time = pw.FloatField()
        active = pw.BooleanField(default=False)

    class Revision(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        document = pw.ForeignKeyField(Document, column_name="document_id",
                                      on_delete="CASCADE", backref="revisions")
        file = pw.ForeignKeyField(File, column_name="file_id", on_delete="RESTRICT")
        created_time = pw.FloatField()
        seq = pw.IntegerField()  # position in the document's history, oldest first

        class Meta:
            indexes = ((("document", "seq"), False),)

    class AccessRule(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        object_type = pw.CharField()  # "folder" | "document"
        object_id = pw.CharField(max_length=64)
        access_type = pw.CharField()  # read | write | move | manage
        rule_data = pw.TextField()  # JSON
        seq = pw.IntegerField(default=0)

        class Meta:
            indexes = ((("object_type", "object_id"), False),)

    class FileTask(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        file = pw.ForeignKeyField(File, column_name="file_id", on_delete="CASCADE")
        mode = pw.CharField()  # upload | download
        status = pw.CharField(default="open")  # open | completed | closed
        user = pw.ForeignKeyField(User, column_name="username", on_delete="CASCADE")
        start_time = pw.FloatField()
        end_time = pw.FloatField()  # expiry
        purpose = pw.CharField(default="document")  # document | backup_archive | backup_key | export
        max_size = pw.BigIntegerField(null=True)
        # What the client announced for the upload in progress, so an interrupted upload of
        # the same content can resume at the verified bytes kept on disk.
        declared_size = pw.BigIntegerField(null=True)
        declared_sha256 = pw.CharField(null=True)
        # The instance running a transfer of this task now, until when (issue 16; migration 4).
        lease_owner = pw.CharField(null=True)
        lease_expires_time = pw.FloatField(null=True)

    class BackupTask(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        username = pw.CharField()
        operation = pw.CharField()  # export | import
        status = pw.CharField()
        current_step = pw.CharField(default="")
        progress_percent = pw.IntegerField(default=0)
        archive_file_id = pw.CharField(null=True)
        key_file_id = pw.CharField(null=True)
        documents_count = pw.IntegerField(default=0)
        folders_count = pw.IntegerField(default=0)
        files_count = pw.IntegerField(default=0)
        created_time = pw.FloatField()
        started_time = pw.FloatField(null=True)
        completed_time = pw.FloatField(null=True)
        timeout_time = pw.FloatField(null=True)
        error_message = pw.TextField(null=True)
        backup_name = pw.CharField(null=True)
        # JSON list of strings: what an import had to change (added by issue 11; older
        # databases get it from migration 1).
        warnings = pw.TextField(default="[]")
        # JSON object: an import's plan (restore planner), once made (added by issue 14;
        # older databases get it from migration 3).
        plan = pw.TextField(null=True)
        # The instance running (or timing out) this task, until when (issue 16; migration 4).
        lease_owner = pw.CharField(null=True)
        lease_expires_time = pw.FloatField(null=True)

    class BackupSchedule(Base):
        """A backup the server makes by itself every `interval_seconds` (issue 18)."""

        name = pw.CharField(primary_key=True, max_length=64)
        created_by = pw.CharField()
        created_time = pw.FloatField()
        interval_seconds = pw.IntegerField()
        recipients = pw.TextField()  # JSON list of recipient strings
        parts = pw.TextField(null=True)  # JSON list, null: every part
        compression = pw.CharField()
        target = pw.TextField()  # JSON object: {"type": "local"} or {"type": "s3", ...}
        keep = pw.TextField(null=True)  # JSON retention policy, null: keep everything
        next_run_time = pw.FloatField()
        last_run_time = pw.FloatField(null=True)
        last_success_time = pw.FloatField(null=True)
        last_backup = pw.CharField(null=True)
        last_error = pw.TextField(null=True)
        last_error_time = pw.FloatField(null=True)
        runs_count = pw.IntegerField(default=0)
        failures_count = pw.IntegerField(default=0)

    class Backup(Base):
        """A published backup archive, made by hand (`generate_backup`) or by a schedule, and
        what its latest verification found."""

        name = pw.CharField(primary_key=True, max_length=100)
        schedule = pw.CharField(null=True)
        created_time = pw.FloatField()
        size = pw.BigIntegerField()
        sha256 = pw.CharField()
        format = pw.IntegerField()  # 2: with a key file, 3: recipients and/or a passphrase
        recipients = pw.TextField(default="[]")  # JSON list of recipient strings
        target = pw.TextField()  # JSON object, as in BackupSchedule
        location = pw.CharField()  # local: path relative to the content folder; s3: object key
        key_location = pw.CharField(null=True)  # local format 2 only: the key file
        verified_time = pw.FloatField(null=True)
        verify_result = pw.CharField(null=True)  # ok | failed
        verify_level = pw.CharField(null=True)  # self-check | archive | full | deep
        verify_detail = pw.TextField(null=True)

        class Meta:
            indexes = ((("schedule", "created_time"), False),)

    class ClusterEvent(Base):
        """An event too large for a PostgreSQL NOTIFY payload: the notification carries its id
        and every instance reads it here (issue 16; migration 4). Rows older than a few
        minutes are removed as new ones are written."""

        id = pw.BigAutoField()
        payload = pw.TextField()
        created_time = pw.FloatField(index=True)

    defined = locals()
    ns = types.SimpleNamespace(**{name: defined[name] for name in ALL_MODEL_NAMES})
    ns.db = database
    ns.all = [getattr(ns, name) for name in ALL_MODEL_NAMES]
    ns.REVISION_HISTORY_INDEX = REVISION_HISTORY_INDEX
    if backends.is_postgresql(database):
        backends.columns_as_on_sqlite(ns.all)
    return ns
