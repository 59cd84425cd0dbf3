"""Schema versions: every start brings the database to the version this code knows.

The `schema_version` table holds one row, the version of the schema the database has. A new
database is created at `LATEST_VERSION` directly from the models. An older one has each later
migration applied in order; a database made before schema versions existed (it has tables
but no `schema_version`) counts as version 0. The whole upgrade is one transaction, taken
under the schema lock (see `backends.lock_schema`), so it lands entirely or not at all, and
two instances starting together upgrade once. Every migration is idempotent (it adds what is
missing), because a database older than a table's creation gets that table, already in its
latest shape, from the first migration. A database newer than this code is refused: running
on it could lose what the newer release wrote.

To change the schema: change the models (so new databases get it), then append a Migration
that brings an existing database there.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from typing import Callable

import peewee as pw
from playhouse.migrate import SchemaMigrator, migrate

from ..errors import SchemaTooNew
from . import backends

log = logging.getLogger(__name__)

VERSION_TABLE = "schema_version"


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[pw.Database, types.SimpleNamespace], None]


def _add_column_if_missing(database: pw.Database, model, field_name: str) -> None:
    field = model._meta.fields[field_name]
    table = model._meta.table_name
    if field.column_name not in {column.name for column in database.get_columns(table)}:
        migrate(SchemaMigrator.from_database(database).add_column(table, field.column_name,
                                                                   field))


def _baseline(database: pw.Database, m: types.SimpleNamespace) -> None:
    """The schema of the releases before schema versions: tables added over time (schedules,
    the backup catalogue) are created where missing, and BackupTask.warnings (issue 11)
    added to databases made before it."""
    database.create_tables(m.all, safe=True)
    _add_column_if_missing(database, m.BackupTask, "warnings")


def _revision_history_index(database: pw.Database, m: types.SimpleNamespace) -> None:
    """Revisions are read in a document's order (history, latest revision, export): one index
    on (document, seq) serves them all."""
    database.execute_sql(
        f'CREATE INDEX IF NOT EXISTS "{m.REVISION_HISTORY_INDEX}" '
        f'ON "{m.Revision._meta.table_name}" ("{m.Revision.document.column_name}", '
        f'"{m.Revision.seq.column_name}")')


def _restore_plans(database: pw.Database, m: types.SimpleNamespace) -> None:
    """Restores into a live server (issue 14): an import's plan is kept with its task."""
    _add_column_if_missing(database, m.BackupTask, "plan")


def _instance_leases(database: pw.Database, m: types.SimpleNamespace) -> None:
    """Several instances on one database (issue 16): leases on backup and transfer tasks, and
    the table of events too large for a notification."""
    for model in (m.BackupTask, m.FileTask):
        _add_column_if_missing(database, model, "lease_owner")
        _add_column_if_missing(database, model, "lease_expires_time")
    database.create_tables([m.ClusterEvent], safe=True)


MIGRATIONS = (
    Migration(1, "baseline: missing tables and BackupTask.warnings", _baseline),
    Migration(2, "index on revision (document_id, seq)", _revision_history_index),
    Migration(3, "BackupTask.plan", _restore_plans),
    Migration(4, "task leases of several instances, the cluster event table", _instance_leases),
)
LATEST_VERSION = MIGRATIONS[-1].version


def _version_model(database: pw.Database):
    class SchemaVersion(pw.Model):
        version = pw.IntegerField()

        class Meta:
            table_name = VERSION_TABLE
            primary_key = False

    SchemaVersion._meta.set_database(database)
    return SchemaVersion


def current_version(database: pw.Database, m: types.SimpleNamespace) -> int | None:
    """The database's schema version; 0 for one made before versions, None when empty."""
    tables = set(database.get_tables())
    if VERSION_TABLE in tables:
        row = _version_model(database).select().first()
        return 0 if row is None else row.version
    return 0 if m.User._meta.table_name in tables else None


def upgrade(database: pw.Database, m: types.SimpleNamespace, where: str) -> int:
    """Bring the database to LATEST_VERSION (blocking, one transaction); return the version it
    had (None: it was empty). Raises SchemaTooNew for a database of a newer release."""
    version_model = _version_model(database)
    with backends.write_transaction(database):
        backends.lock_schema(database)
        found = current_version(database, m)
        if found is not None and found > LATEST_VERSION:
            raise SchemaTooNew(
                f"the {where} has schema version {found}, newer than this cfms-trio knows "
                f"(up to {LATEST_VERSION}): it was upgraded by a newer release. Run that "
                "release (or newer), or restore a backup into a new database")
        if found == LATEST_VERSION:
            return found
        if found is None:
            log.info("creating the schema (version %d) in the %s", LATEST_VERSION, where)
            database.create_tables([*m.all, version_model])
        else:
            database.create_tables([version_model], safe=True)
            for migration in MIGRATIONS:
                if migration.version > found:
                    log.info("schema migration %d (%s) in the %s", migration.version,
                             migration.description, where)
                    migration.apply(database, m)
        version_model.delete().execute()
        version_model.insert(version=LATEST_VERSION).execute()
    if found is not None:
        log.info("the %s is now at schema version %d (was %d)", where, LATEST_VERSION, found)
    return found
