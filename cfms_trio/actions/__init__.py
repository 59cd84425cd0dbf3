"""The routing table: every action, its handler, schema and permission, top to bottom."""

from __future__ import annotations

from ..dispatch import Route
from ..schema import Field, name_field, object_id, optional
from ..conventions import ACCOUNTS_DEFAULT_POLICY, ACCOUNTS_POLICIES, BACKUP_PARTS, NAME_MAX_CHARS
from . import (
    accounts, backup_export, backup_import, backup_schedules, documents, session, transfer,
)

USERNAME = Field(str, min_len=1, max_len=accounts.USERNAME_MAX)
PASSWORD = Field(str, min_len=1, max_len=accounts.PASSWORD_MAX)
NAME_LIST = optional(list, default=[], max_len=1000)
FOLDER = object_id()
PARENT = object_id(required=False, nullable=True)  # null or absent: the root
DOCUMENT = object_id()
RULES = optional(dict, default={})
OBJECT_NAME = name_field(NAME_MAX_CHARS)

ROUTES: list[Route] = [
    # sessions and events
    Route("server_info", session.server_info, anonymous=True),
    Route("login", session.login, {"username": USERNAME, "password": PASSWORD},
          anonymous=True, audited=True),
    Route("refresh_token", session.refresh_token),
    Route("logout", session.logout, audited=True),
    Route("register_listener", session.register_listener),
    # users
    Route("list_users", accounts.list_users, permission="list_users"),
    Route("get_user_info", accounts.get_user_info, {"username": optional(str, max_len=64)}),
    Route("create_user", accounts.create_user,
          {"username": USERNAME, "password": PASSWORD,
           "nickname": optional(str, max_len=255), "groups": NAME_LIST,
           "permissions": NAME_LIST},
          permission="create_user", audited=True),
    Route("delete_user", accounts.delete_user, {"username": USERNAME},
          permission="delete_user", audited=True),
    Route("set_passwd", accounts.set_passwd,
          {"username": optional(str, max_len=64), "old_password": optional(str, max_len=1024),
           "new_password": PASSWORD},
          audited=True),
    # groups
    Route("list_groups", accounts.list_groups, permission="list_groups"),
    Route("create_group", accounts.create_group,
          {"name": name_field(64), "permissions": NAME_LIST},
          permission="create_group", audited=True),
    Route("delete_group", accounts.delete_group, {"name": name_field(64)},
          permission="delete_group", audited=True),
    Route("change_user_groups", accounts.change_user_groups,
          {"username": USERNAME, "groups": Field(list, max_len=1000)},
          permission="change_user_groups", audited=True),
    Route("set_group_permissions", accounts.set_group_permissions,
          {"name": name_field(64), "permissions": Field(list, max_len=1000)},
          permission="set_group_permissions", audited=True),
    # audit
    Route("view_audit_logs", accounts.view_audit_logs,
          {"offset": optional(int, default=0, min=0), "limit": optional(int, default=100, min=1, max=1000),
           "username": optional(str, max_len=64), "action": optional(str, max_len=64)},
          permission="view_audit_logs"),
    # folders
    Route("create_directory", documents.create_directory,
          {"name": OBJECT_NAME, "parent_id": PARENT, "access_rules": RULES},
          permission="create_directory", audited=True),
    Route("list_directory", documents.list_directory, {"folder_id": PARENT}),
    Route("get_directory_info", documents.get_directory_info, {"folder_id": FOLDER}),
    Route("rename_directory", documents.rename_directory,
          {"folder_id": FOLDER, "name": OBJECT_NAME},
          permission="rename_directory", audited=True),
    Route("move_directory", documents.move_directory,
          {"folder_id": FOLDER, "parent_id": PARENT}, permission="move", audited=True),
    Route("delete_directory", documents.delete_directory, {"folder_id": FOLDER},
          permission="delete_directory", audited=True),
    Route("get_directory_access_rules", documents.get_directory_access_rules,
          {"folder_id": FOLDER}, permission="view_access_rules"),
    Route("set_directory_rules", documents.set_directory_rules,
          {"folder_id": FOLDER, "access_rules": Field(dict)},
          permission="set_access_rules", audited=True),
    # documents
    Route("create_document", documents.create_document,
          {"title": OBJECT_NAME, "folder_id": PARENT, "access_rules": RULES},
          permission="create_document", audited=True),
    Route("upload_document", documents.upload_document, {"document_id": DOCUMENT},
          audited=True),
    Route("get_document", documents.get_document,
          {"document_id": DOCUMENT, "revision_id": object_id(required=False, nullable=True)}),
    Route("get_document_info", documents.get_document_info, {"document_id": DOCUMENT}),
    Route("list_revisions", documents.list_revisions, {"document_id": DOCUMENT}),
    Route("rename_document", documents.rename_document,
          {"document_id": DOCUMENT, "title": OBJECT_NAME},
          permission="rename_document", audited=True),
    Route("move_document", documents.move_document,
          {"document_id": DOCUMENT, "folder_id": PARENT}, permission="move", audited=True),
    Route("delete_document", documents.delete_document, {"document_id": DOCUMENT},
          permission="delete_document", audited=True),
    Route("get_document_access_rules", documents.get_document_access_rules,
          {"document_id": DOCUMENT}, permission="view_access_rules"),
    Route("set_document_rules", documents.set_document_rules,
          {"document_id": DOCUMENT, "access_rules": Field(dict)},
          permission="set_access_rules", audited=True),
    # file transfer
    Route("upload_file", transfer.upload_file, {"task_id": object_id()}, audited=True),
    Route("download_file", transfer.download_file,
          {"task_id": object_id(), "offset": optional(int, default=0, min=0)}),
    # backups
    Route("generate_backup", backup_export.generate_backup,
          {"backup_name": optional(str, max_len=100),
           "compression": optional(str, default="zstd", choices=("zstd", "none")),
           "recipients": optional(list, max_len=backup_export.MAX_RECIPIENTS),
           "passphrase": optional(str, min_len=1, max_len=backup_export.PASSPHRASE_MAX_CHARS),
           "parts": optional(list, max_len=len(BACKUP_PARTS))},
          permission="export_backup", audited=True),
    Route("initiate_backup_import", backup_import.initiate_backup_import,
          {"timeout_seconds": optional(int, default=3600, min=1, max=86400)},
          permission="import_backup", audited=True),
    Route("start_backup_import", backup_import.start_backup_import,
          {"backup_task_id": object_id(),
           "passphrase": optional(str, min_len=1,
                                  max_len=backup_export.PASSPHRASE_MAX_CHARS),
           "allow_missing_content": optional(bool, default=False),
           "accounts": optional(str, default=ACCOUNTS_DEFAULT_POLICY, choices=ACCOUNTS_POLICIES)},
          permission="import_backup", audited=True),
    Route("get_backup_import_status", backup_import.get_backup_import_status,
          {"backup_task_id": object_id()}, permission="import_backup"),
    # backup schedules and the catalogue of backups
    Route("create_backup_schedule", backup_schedules.create_backup_schedule,
          {"name": Field(str, min_len=1, max_len=backup_schedules.SCHEDULE_NAME_MAX_CHARS),
           "interval_seconds": Field(int, min=1,
                                     max=backup_schedules.INTERVAL_MAX_SECONDS),
           "recipients": Field(list, max_len=backup_schedules.MAX_RECIPIENTS),
           "parts": optional(list, max_len=32),
           "compression": optional(str, default="zstd", choices=("zstd", "none")),
           "target": optional(dict), "keep": optional(dict)},
          permission="export_backup", audited=True),
    Route("list_backup_schedules", backup_schedules.list_backup_schedules,
          permission="export_backup"),
    Route("delete_backup_schedule", backup_schedules.delete_backup_schedule,
          {"name": Field(str, min_len=1, max_len=backup_schedules.SCHEDULE_NAME_MAX_CHARS)},
          permission="export_backup", audited=True),
    Route("list_backups", backup_schedules.list_backups,
          {"schedule": optional(str, max_len=backup_schedules.SCHEDULE_NAME_MAX_CHARS)},
          permission="export_backup"),
    Route("verify_backup", backup_schedules.verify_backup,
          {"name": Field(str, min_len=1, max_len=100), "deep": optional(bool, default=False),
           "identity": optional(str, min_len=1, max_len=64 * 1024),
           "passphrase": optional(str, min_len=1,
                                  max_len=backup_export.PASSPHRASE_MAX_CHARS)},
          permission="export_backup", audited=True),
    Route("prune_backups", backup_schedules.prune_backups,
          {"dry_run": optional(bool, default=False),
           "schedule": optional(str, max_len=backup_schedules.SCHEDULE_NAME_MAX_CHARS)},
          permission="export_backup", audited=True),
]
