"""`cfms-trio client` for everyday work (issue 19): profiles, documents by path,
administration and backups, each command against a running server, errors included."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from cfms_trio.client import ClientError

from cli_support import Cli
from helpers import ADMIN_PASSWORD, USER_PASSWORD, make_user


@pytest.fixture
def cafile(tls_ca, tmp_path) -> Path:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def cli(server, cafile, tmp_path) -> Cli:
    return Cli(tmp_path / "config", cafile, server.url)


@pytest.fixture
async def admin_cli(cli) -> Cli:
    await cli.login()
    return cli


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"report.txt": b"quarterly numbers\n", "notes/todo.md": b"- backups\n",
             "notes/deep/big.bin": bytes(range(256)) * 1200, "notes/empty.txt": b""}
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / "nothing-here").mkdir()
    return files


# -- profiles ----------------------------------------------------------------------------------

async def test_login_saves_a_private_profile_that_later_commands_use(cli, server, tmp_path):
    done = await cli.login()
    assert f"logged in as admin on {server.url}" in done.out
    path = cli.config_dir / "profiles.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.config_dir.stat().st_mode) == 0o700
    profile = cli.profiles()["default"]
    assert profile["server"] == server.url and profile["username"] == "admin"
    assert profile["cafile"] == str(cli.cafile) and profile["token"]
    assert ADMIN_PASSWORD not in path.read_text()

    info = await cli("info", "--json")  # no flags: the profile says where and who
    assert info.code == 0, info
    assert info.json()["user"]["username"] == "admin"
    assert info.json()["server"]["name"] == "cfms-trio"
    listed = (await cli("profiles", "--json")).json()
    assert listed["profiles"]["default"]["session"] == "fresh"

    out = await cli("logout")
    assert out.code == 0 and "logged out admin" in out.out
    assert cli.profiles()["default"]["token"] is None
    async with server.connect() as client:  # the server ended the session too
        client.username, client.token = "admin", profile["token"]
        with pytest.raises(ClientError) as refused:
            await client.call("list_users")
        assert refused.value.code == 401
    after = await cli("ls")
    assert after.code == 1
    assert "was ended (logout); log in again: cfms-trio client login" in after.err
    relogin = await cli("login", "--password-file", str(_write(tmp_path / "pw", ADMIN_PASSWORD)))
    assert relogin.code == 0, relogin  # server and certificate come from the profile
    assert (await cli("ls")).code == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_the_default_config_folder_is_under_xdg_config_home(server, cafile, tmp_path):
    home = tmp_path / "xdg"
    cli = Cli(None, cafile, server.url)
    env = {"XDG_CONFIG_HOME": str(home), "CFMS_CONFIG_DIR": None}
    done = await cli("login", "--server", server.url, "--cafile", str(cafile),
                     env=dict(env, CFMS_PASSWORD=ADMIN_PASSWORD))
    assert done.code == 0, done
    assert (home / "cfms-trio" / "profiles.json").is_file()
    assert (await cli("ls", env=env)).code == 0
    elsewhere = await cli("ls", env={"CFMS_CONFIG_DIR": str(tmp_path / "other")})
    assert elsewhere.code == 2 and "log in first" in elsewhere.err


async def test_a_token_past_half_its_life_is_refreshed(admin_cli, server):
    profiles = json.loads((admin_cli.config_dir / "profiles.json").read_text())
    old = profiles["profiles"]["default"]
    old_token = old["token"]
    old["token_obtained_time"] = time.time() - 100_000  # as if logged in long ago
    (admin_cli.config_dir / "profiles.json").write_text(json.dumps(profiles))
    done = await admin_cli("ls")
    assert done.code == 0, done
    new = admin_cli.profiles()["default"]
    assert new["token"] != old_token and new["token_obtained_time"] > time.time() - 60
    async with server.connect() as client:
        client.username, client.token = "admin", old_token
        with pytest.raises(ClientError) as refused:
            await client.call("list_users")
        assert refused.value.code == 401


async def test_an_expired_token_needs_a_password_or_a_new_login(admin_cli):
    profiles = json.loads((admin_cli.config_dir / "profiles.json").read_text())
    profiles["profiles"]["default"]["token_expires_time"] = time.time() - 1
    (admin_cli.config_dir / "profiles.json").write_text(json.dumps(profiles))
    dead = await admin_cli("ls", "--json")
    assert dead.code == 1
    assert dead.err == ("error: the session of admin on " + admin_cli.url + " has expired; "
                        "log in again: cfms-trio client login\n")
    assert dead.json()["error"]["exit"] == 1
    again = await admin_cli("ls", env={"CFMS_PASSWORD": ADMIN_PASSWORD})
    assert again.code == 0, again
    assert admin_cli.profiles()["default"]["token_expires_time"] > time.time()


# -- documents by path ------------------------------------------------------------------------

async def test_put_ls_get_round_trip_a_folder(admin_cli, tmp_path):
    src = tmp_path / "project"
    files = make_tree(src)
    done = await admin_cli("put", str(src), "/")
    assert done.code == 0, done
    assert done.out == "4 created, 4 folders made (300.0K)\n"
    again = await admin_cli("put", str(src), "/", "--json")
    assert {r["action"] for r in again.json()["results"]} == {"unchanged"}

    top = await admin_cli("ls")
    assert top.out == "project/\n"
    listing = await admin_cli("ls", "/project/notes")
    assert listing.out.splitlines() == ["deep/", "empty.txt", "todo.md"]
    long = await admin_cli("ls", "-l", "/project/notes")
    assert [line.split()[0] for line in long.out.splitlines()] == ["d", "-", "-"]
    assert "10B" in long.out  # todo.md
    tree = await admin_cli("ls", "--tree", "/project")
    assert tree.out.splitlines() == ["/project", "notes/", "  deep/", "    big.bin",
                                     "  empty.txt", "  todo.md", "nothing-here/", "report.txt"]
    as_json = (await admin_cli("ls", "--json", "/project")).json()
    assert [e["name"] for e in as_json["entries"]] == ["notes", "nothing-here", "report.txt"]

    out = tmp_path / "copy"
    got = await admin_cli("get", "/project", str(out))
    assert got.code == 0, got
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} \
        == files
    assert (out / "nothing-here").is_dir()

    refused = await admin_cli("get", "/project/report.txt", str(out))
    assert refused.code == 1
    assert refused.err == (f"error: {out / 'report.txt'} already exists; not overwriting it "
                           "(--force replaces it)\n")
    (out / "report.txt").write_bytes(b"local edit")
    forced = await admin_cli("get", "--force", "/project/report.txt", str(out))
    assert forced.code == 0 and (out / "report.txt").read_bytes() == files["report.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["notes", "nothing-here", "report.txt"]


async def test_revisions_and_get_by_revision(admin_cli, tmp_path):
    first, second = tmp_path / "v1.txt", tmp_path / "v2.txt"
    first.write_bytes(b"first version")
    second.write_bytes(b"second, longer version")
    assert (await admin_cli("put", str(first), "/doc.txt")).code == 0
    assert (await admin_cli("put", str(second), "/doc.txt")).out.startswith("1 revised")
    revs = (await admin_cli("revisions", "/doc.txt", "--json")).json()
    assert [r["size"] for r in revs["revisions"]] == [13, 22]
    assert revs["current_revision_id"] == revs["revisions"][1]["id"]
    text = await admin_cli("revisions", "/doc.txt")
    assert text.out.splitlines()[1].startswith("* " + revs["revisions"][1]["id"])
    old = tmp_path / "old.txt"
    got = await admin_cli("get", "/doc.txt", str(old), "--revision", revs["revisions"][0]["id"])
    assert got.code == 0, got
    assert old.read_bytes() == b"first version"
    bad = await admin_cli("get", "/doc.txt", str(tmp_path / "x"), "--revision", "0" * 32)
    assert bad.code == 1 and "(code 404)" in bad.err
    assert not (tmp_path / "x").exists()


async def test_mkdir_mv_rm(admin_cli):
    assert (await admin_cli("mkdir", "/a")).out == "made /a\n"
    clash = await admin_cli("mkdir", "/a")
    assert clash.code == 1 and "already exists" in clash.err and "(code 409)" in clash.err
    missing_parent = await admin_cli("mkdir", "/x/y")
    assert missing_parent.code == 1
    assert missing_parent.err.startswith("error: no folder 'x' in / that you may read")
    deep = await admin_cli("mkdir", "-p", "/a/b/c", "--json")
    assert [f["created"] for f in deep.json()["folders"]] == [True]
    assert (await admin_cli("mkdir", "-p", "/a/b/c")).out == "exists /a/b/c\n"

    assert (await admin_cli("mv", "/a/b", "/")).out == "moved /a/b -> /b\n"
    assert (await admin_cli("mv", "/b", "/a/renamed")).out == "moved /b -> /a/renamed\n"
    assert (await admin_cli("ls", "--tree", "/a")).out == "/a\nrenamed/\n  c/\n"
    loop = await admin_cli("mv", "/a", "/a/renamed/c")
    assert loop.code == 1 and "descendants" in loop.err

    folder_rm = await admin_cli("rm", "/a")
    assert folder_rm.code == 1 and "rm -r" in folder_rm.err
    assert (await admin_cli("rm", "-r", "/a")).out == "removed /a\n"
    assert (await admin_cli("ls")).out == ""
    root = await admin_cli("rm", "-r", "/")
    assert root.code == 1 and "root" in root.err


async def test_a_folder_and_a_document_of_one_name(admin_cli, admin, tmp_path):
    (tmp_path / "f").write_bytes(b"the document")
    assert (await admin_cli("mkdir", "/same")).code == 0
    assert (await admin_cli("put", str(tmp_path / "f"), "/same/inside")).code == 0
    made = await admin.call("create_document", {"title": "same"})
    await admin.upload_file(made["task_id"], tmp_path / "f")
    ambiguous = await admin_cli("get", "/same", str(tmp_path / "out"))
    assert ambiguous.code == 1
    assert ambiguous.err == ("error: /same is both a folder and a document: write /same/ for "
                             f"the folder, or id:{made['document_id']} for the document\n")
    by_id = await admin_cli("get", f"id:{made['document_id']}", str(tmp_path / "doc"))
    assert by_id.code == 0 and (tmp_path / "doc").read_bytes() == b"the document"
    folder = await admin_cli("get", "/same/", str(tmp_path / "dir"))
    assert folder.code == 0 and (tmp_path / "dir" / "inside").read_bytes() == b"the document"
    listing = await admin_cli("ls", f"id:{made['document_id']}", "--json")
    assert listing.json()["entries"][0]["path"] == "/same"
    unknown = await admin_cli("ls", "id:" + "0" * 32)
    assert unknown.code == 1 and "no folder or document has the id" in unknown.err


async def test_get_refuses_server_names_that_are_not_file_names(admin_cli, admin, tmp_path):
    await admin.call("create_directory", {"name": "box"})
    box = (await admin.call("list_directory", {}))["folders"][0]["id"]
    (tmp_path / "f").write_bytes(b"x")
    for title in ("..", "a/b"):
        made = await admin.call("create_document", {"title": title, "folder_id": box})
        await admin.upload_file(made["task_id"], tmp_path / "f")
    out = tmp_path / "out"
    done = await admin_cli("get", "/box", str(out))
    assert done.code == 1
    assert "cannot be a local file name; nothing was written" in done.err
    assert not out.exists()


async def test_rules_show_and_set(admin_cli, tmp_path):
    await admin_cli("mkdir", "/secret")
    rules = {"read": [{"match_groups": [{"groups": {"require": ["sysop"]}}]}]}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    done = await admin_cli("rules", "set", "/secret", str(tmp_path / "rules.json"))
    assert done.code == 0 and done.out == "rules of /secret set (read)\n"
    shown = await admin_cli("rules", "show", "/secret", "--json")
    assert shown.json()["access_rules"] == rules
    (tmp_path / "bad.json").write_text('{"read": [{"match": "some"}]}')
    bad = await admin_cli("rules", "set", "/secret", str(tmp_path / "bad.json"))
    assert bad.code == 1 and "field 'data.access_rules.read[0]'" in bad.err
    assert "(code 400)" in bad.err
    cleared = await admin_cli("rules", "set", "/secret", "-", stdin="{}")
    assert cleared.out == "rules of /secret set (none: open to every user)\n"


# -- errors --------------------------------------------------------------------------------------

async def test_errors_and_exit_codes(admin_cli, admin, server, tmp_path):
    missing = await admin_cli("get", "/no/such/file")
    assert missing.code == 1
    assert missing.err == ("error: no folder 'no' in / that you may read (looking for "
                           "/no/such/file)\n")
    missing_json = await admin_cli("ls", "/nope", "--json")
    assert missing_json.code == 1 and "nope" in missing_json.json()["error"]["message"]

    usage = await admin_cli("ls", "--no-such-flag")
    assert usage.code == 2
    no_source = await admin_cli("put", str(tmp_path / "absent"), "/")
    assert no_source.code == 2 and no_source.err.startswith("error: ")

    untrusted = await admin_cli("ls", "--cafile", str(_self_signed_elsewhere(tmp_path)))
    assert untrusted.code == 3
    assert "is not trusted" in untrusted.err and "Traceback" not in untrusted.err
    nobody = await admin_cli("ls", "--server", "wss://127.0.0.1:1", "--json",
                             env={"CFMS_PASSWORD": "x"})
    assert nobody.code == 3 and nobody.err.startswith("error: cannot talk to wss://127.0.0.1:1")
    assert nobody.json()["error"]["exit"] == 3
    no_server = await Cli(tmp_path / "empty-config", admin_cli.cafile, server.url)("ls")
    assert no_server.code == 2 and "log in first" in no_server.err

    await make_user(admin, "bob")
    await admin_cli.login("bob", USER_PASSWORD, "--profile", "bob")
    forbidden = await admin_cli("users", "list", "--profile", "bob")
    assert forbidden.code == 1
    assert forbidden.err == "error: permission 'list_users' required (code 403)\n"
    await admin_cli("mkdir", "/admins-only")
    (tmp_path / "rules.json").write_text(json.dumps(
        {"write": [{"match_groups": [{"groups": {"require": ["sysop"]}}]}]}))
    await admin_cli("rules", "set", "/admins-only", str(tmp_path / "rules.json"))
    (tmp_path / "f").write_bytes(b"x")
    no_write = await admin_cli("put", str(tmp_path / "f"), "/admins-only/", "--profile", "bob")
    assert no_write.code == 1
    assert "no write access to folder" in no_write.err and "(code 403)" in no_write.err


def _self_signed_elsewhere(tmp_path: Path) -> Path:
    import trustme

    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


# -- administration --------------------------------------------------------------------------

async def test_users_groups_members_audit(admin_cli, tmp_path):
    add = await admin_cli("users", "add", "carol", "--group", "user", "--nickname", "Carol",
                          env={"CFMS_NEW_PASSWORD": "carol-password-1"})
    assert add.code == 0 and add.out == "added user carol (groups: user)\n"
    short = await admin_cli("users", "add", "dave", env={"CFMS_NEW_PASSWORD": "short"})
    assert short.code == 1 and "(code 400)" in short.err
    no_password = await admin_cli("users", "add", "erin")
    assert no_password.code == 2 and "--new-password-file" in no_password.err
    users = (await admin_cli("users", "list", "--json")).json()["users"]
    assert [u["username"] for u in users] == ["admin", "carol"]
    assert "carol  Carol" in (await admin_cli("users", "list")).out

    assert (await admin_cli("groups", "add", "auditors", "--permission",
                            "view_audit_logs")).code == 0
    changed = await admin_cli("groups", "set-permissions", "auditors", "view_audit_logs",
                              "list_users", "--json")
    assert changed.json()["permissions"] == ["list_users", "view_audit_logs"]
    unknown = await admin_cli("groups", "set-permissions", "auditors", "fly")
    assert unknown.code == 1 and "(code 400)" in unknown.err
    members = await admin_cli("members", "set", "carol", "user", "auditors")
    assert members.out == "carol is in: auditors, user\n"
    groups = (await admin_cli("groups", "list", "--json")).json()["groups"]
    assert {g["name"]: g["members"] for g in groups}["auditors"] == ["carol"]

    (tmp_path / "new").write_text("carol-password-2")
    passwd = await admin_cli("users", "passwd", "carol", "--new-password-file",
                             str(tmp_path / "new"))
    assert passwd.code == 0, passwd
    await admin_cli.login("carol", "carol-password-2", "--profile", "carol")
    audit = await admin_cli("audit", "--profile", "carol", "--user", "admin", "--action",
                            "set_passwd", "--json")
    assert audit.code == 0, audit
    assert [(e["action"], e["target"], e["result"]) for e in audit.json()["entries"]] == [
        ("set_passwd", "carol", 200)]
    text = await admin_cli("audit", "--limit", "2")
    assert text.out.splitlines()[0].split() == ["TIME", "USER", "ACTION", "RESULT", "TARGET",
                                               "ADDRESS"]
    assert len(text.out.splitlines()) == 4 and "of" in text.out.splitlines()[-1]

    own = await admin_cli("users", "passwd", "--new-password-file", str(tmp_path / "new"))
    assert own.code == 0 and "logged in again" in own.out
    assert (await admin_cli("ls")).code == 0  # the profile holds the new session

    assert (await admin_cli("users", "rm", "carol")).out == "removed user carol\n"
    assert (await admin_cli("groups", "rm", "auditors")).code == 0
    sysop = await admin_cli("groups", "rm", "sysop")
    assert sysop.code == 1 and "(code 409)" in sysop.err


# -- backups ---------------------------------------------------------------------------------

async def test_backup_export_import_status_from_profiles(admin_cli, start_server, tmp_path):
    src = tmp_path / "project"
    files = make_tree(src)
    await admin_cli("put", str(src), "/")
    exported = await admin_cli("backup-export", "--out", str(tmp_path / "bk"), "--name", "b1",
                               "--json")
    assert exported.code == 0, exported
    result = exported.json()
    assert result["metadata"]["documents_count"] == len(files)

    other = await start_server("second")
    second = Cli(admin_cli.config_dir, admin_cli.cafile, other.url)
    await second.login("admin", ADMIN_PASSWORD, "--profile", "b")
    imported = await second("backup-import", "--profile", "b", "--archive", result["archive"],
                            "--key", result["key"], "--poll", "0.05")
    assert imported.code == 0, imported
    assert "import completed: 4 folders, 4 documents, 4 files" in imported.out
    task = imported.out.rsplit("(task ", 1)[1].split(")")[0]
    status = await second("backup-status", task, "--follow", "--profile", "b", "--json")
    assert status.code == 0 and status.json()["status"] == "completed"
    text = await second("backup-status", task, "--profile", "b")
    assert text.out.startswith("completed: 100%")
    unknown = await second("backup-status", "f" * 32, "--profile", "b")
    assert unknown.code == 1 and "(code 404)" in unknown.err

    out = tmp_path / "restored"
    assert (await second("get", "/project", str(out), "--profile", "b")).code == 0
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} \
        == files

    # The same archive again: a dry run plans it (everything exists: a real run under policy
    # fail would refuse), a start refused because of its options keeps the uploads, and
    # `--task` starts the same task again without uploading.
    planned = await second("backup-import", "--profile", "b", "--archive", result["archive"],
                           "--key", result["key"], "--poll", "0.05", "--dry-run")
    assert planned.code == 0, planned
    assert "plan (conflict policy fail):" in planned.out
    assert "a real run would fail: folder id '" in planned.out
    task = planned.out.split("dry run of task ", 1)[1].split(":", 1)[0]
    assert f"--task {task}" in planned.out
    refused = await second("backup-import", "--profile", "b", "--task", task, "--poll", "0.05",
                           "--include", "/nothing/here", "--accounts", "none")
    assert refused.code == 1
    assert "import failed: include entry 1 (path '/nothing/here') matches nothing" in refused.err
    assert f"start it again with --task {task}" in refused.err
    copied = await second("backup-import", "--profile", "b", "--task", task, "--poll", "0.05",
                          "--include", "/project", "--conflict", "new_ids", "--accounts", "none")
    assert copied.code == 0, copied
    assert f"import completed: 4 folders, 4 documents, 4 files (task {task})" in copied.out
    listing = await second("ls", "/", "--profile", "b")
    assert "project (2)" in listing.out, listing
    again = await second("backup-import", "--profile", "b", "--task", task, "--poll", "0.05")
    assert again.code == 1 and "(code 409)" in again.err
    both = await second("backup-import", "--profile", "b", "--task", task, "--archive",
                        result["archive"])
    assert both.code == 2 and "either --archive FILE" in both.err


async def test_output_into_a_closed_pipe_ends_quietly(admin_cli):
    """`cfms-trio client profiles | head -0`: a reader that went away ends the command with
    exit code 1 and no traceback."""
    def run_with_closed_stdout() -> tuple[int, bytes]:
        child = subprocess.Popen([sys.executable, "-m", "cfms_trio", "client", "profiles",
                                  "--config-dir", str(admin_cli.config_dir)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child.stdout.close()  # before the child has printed anything
        stderr = child.stderr.read()
        return child.wait(timeout=60), stderr

    code, stderr = await trio.to_thread.run_sync(run_with_closed_stdout)
    assert code == 1
    assert b"Traceback" not in stderr, stderr.decode()
