"""Format 3 (issue 17): recipients, passphrases, rekey, paper keys, identity files.

The archive is checked against docs/BACKUP_FORMAT.md §2 by an independent decoder written with
the `cryptography` package and hashlib's scrypt, and through the running server: an export made
for recipients leaves no key on the server, and imports with an identity or a passphrase.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cfms_trio.backup.format import (
    Passphrase,
    Unlock,
    generate_identity,
    parse_identity,
    parse_identity_file,
    parse_recipient,
    rekey_archive,
    summarize_archive,
    write_backup_archive,
)
from cfms_trio.backup.format import recipients as recipients_module
from cfms_trio.cli import main as cli_main
from cfms_trio.client import export_backup
from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from backup_support import read_back, v3_metadata, build_store, cli_command, dump_store, import_from, run_cli, spec_decode
from test_archive import CHUNK_LOG2, make_dataset

LIMITS = ArchiveLimits()
FIXTURE = Path(__file__).parent / "fixtures" / "format3"
CHEAP = dict(log2_n=12)  # scrypt work factors that keep these tests fast
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def write_v3(dataset: dict, *wrap_for, key: bytes | None = None) -> bytes:
    out = io.BytesIO()
    listings = {kind: dataset[kind] for kind in ("folders", "documents", "files")}
    write_backup_archive(
        out, key or os.urandom(32), compression="zstd", metadata=v3_metadata(listings),
        listings=listings,
        open_file=lambda file_id: io.BytesIO(dataset["blobs"][file_id]), chunk_log2=CHUNK_LOG2,
        wrap_for=wrap_for)
    return out.getvalue()


def open_with(data: bytes, tmp_path: Path, unlock: Unlock, limits: ArchiveLimits = LIMITS):
    staging = tmp_path / f"staging-{os.urandom(4).hex()}"
    return read_back(io.BytesIO(data), unlock, staging, limits)


@pytest.fixture(scope="module")
def people():
    return {name: generate_identity() for name in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def archive(people) -> bytes:
    dataset = make_dataset()
    return write_v3(dataset, people["alice"].recipient, people["bob"].recipient,
                    Passphrase("open sesame", **CHEAP))


# -- who can open it -----------------------------------------------------------------------------

def test_either_recipient_or_the_passphrase_opens_it_a_third_identity_does_not(
        archive, people, tmp_path):
    expected = make_dataset()
    for unlock in (Unlock((people["alice"],)), Unlock((people["bob"],)),
                   Unlock(passphrase=Passphrase("open sesame"))):
        contents = open_with(archive, tmp_path, unlock)
        assert contents.files == expected["files"]
        assert [d["id"] for d in contents.documents] == ["d1", "d2"]
    with pytest.raises(ArchiveError, match="none of the given identities is a recipient") as info:
        open_with(archive, tmp_path, Unlock((people["carol"],)))
    # The message says who can open it, so the user knows which identity to look for.
    assert str(people["alice"].recipient) in info.value.message
    assert str(people["carol"].recipient) not in info.value.message


def test_a_wrong_passphrase_fails_fast_and_says_so(archive, tmp_path):
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="^wrong passphrase for this archive$"):
        open_with(archive, tmp_path, Unlock(passphrase=Passphrase("open sesame!")))
    assert time.monotonic() - started < 2.0
    assert not list(tmp_path.glob("staging-*/*"))  # nothing extracted


def _stanzas(data: bytes) -> list[tuple[int, int, int]]:
    """(offset of type byte, type, body length) of each stanza, decoded from the format doc."""
    assert data[:8] == b"CFMSBAK3" and data[8] == 1
    found, offset = [], 10
    for _ in range(data[9]):
        kind, length = struct.unpack(">BH", data[offset:offset + 3])
        found.append((offset, kind, length))
        offset += 3 + length
    return found


def test_a_too_expensive_scrypt_header_is_refused_before_deriving(archive, tmp_path,
                                                                  monkeypatch):
    offset = next(off for off, kind, _ in _stanzas(archive) if kind == 2)
    hostile = bytearray(archive)
    hostile[offset + 3] = 30  # log2 N = 30: 128 GiB of memory with r = 8

    def never(*args, **kwargs):
        raise AssertionError("scrypt was run on a refused work factor")

    monkeypatch.setattr(recipients_module, "scrypt", never)
    started = time.monotonic()
    with pytest.raises(ArchiveLimitExceeded, match=r"scrypt N=2\^30, r=8, p=1 .*allows at most "
                                                   r"268435456 bytes.*nothing was derived"):
        open_with(bytes(hostile), tmp_path, Unlock(passphrase=Passphrase("open sesame")))
    assert time.monotonic() - started < 0.5
    # A reader with a lower bound refuses the archive's own (cheap) factors the same way.
    monkeypatch.undo()
    with pytest.raises(ArchiveLimitExceeded, match="allows at most"):
        open_with(archive, tmp_path, Unlock(passphrase=Passphrase("open sesame")),
                  ArchiveLimits(scrypt_memory_bytes=1 << 20))


def test_the_recipient_block_is_authenticated(archive, people, tmp_path):
    (first, _, first_len), (second, _, second_len) = _stanzas(archive)[:2]
    a = archive[first:first + 3 + first_len]
    b = archive[second:second + 3 + second_len]
    swapped = archive[:first] + b + a + archive[second + 3 + second_len:]
    with pytest.raises(ArchiveError, match="recipient block failed authentication"):
        open_with(swapped, tmp_path, Unlock((people["alice"],)))
    # Dropping the passphrase stanza (count and bytes) is caught just the same.
    third, _, third_len = _stanzas(archive)[2]
    dropped = bytearray(archive[:third] + archive[third + 3 + third_len:])
    dropped[9] = 2
    with pytest.raises(ArchiveError, match="recipient block failed authentication"):
        open_with(bytes(dropped), tmp_path, Unlock((people["bob"],)))


def test_a_format_3_archive_names_what_opens_it_when_given_a_key_file(archive, tmp_path):
    from cfms_trio.backup.format import KeyInfo
    key_info = KeyInfo(format=2, key=bytes(32), algorithm="AES-256-GCM-STREAM")
    with pytest.raises(ArchiveError, match="format 3 archive: it opens with an identity"):
        read_back(io.BytesIO(archive), key_info, tmp_path / "s", LIMITS)


# -- rotation ------------------------------------------------------------------------------------

def test_rekey_keeps_the_payload_bytes_and_changes_who_can_open_it(archive, people, tmp_path):
    out = io.BytesIO()
    result = rekey_archive(io.BytesIO(archive), out, Unlock((people["alice"],)), LIMITS,
                           add=(people["carol"].recipient,), remove=(people["bob"].recipient,),
                           remove_passphrases=True)
    rekeyed = out.getvalue()
    before, after = summarize_archive(io.BytesIO(archive)), summarize_archive(io.BytesIO(rekeyed))
    # The payload region (from the CFMSBAK2 header to the end) is byte for byte the same.
    assert archive[before.payload_offset:] == rekeyed[after.payload_offset:]
    assert before.payload_sha256 == after.payload_sha256 == result.payload_sha256
    assert result.payload_sha256 == hashlib.sha256(archive[before.payload_offset:]).hexdigest()
    assert after.recipients == [f"recipient {people['alice'].recipient}",
                                f"recipient {people['carol'].recipient}"]

    assert open_with(rekeyed, tmp_path, Unlock((people["carol"],))).files
    assert open_with(rekeyed, tmp_path, Unlock((people["alice"],))).files
    with pytest.raises(ArchiveError, match="none of the given identities"):
        open_with(rekeyed, tmp_path, Unlock((people["bob"],)))
    with pytest.raises(ArchiveError, match="it has no passphrase"):
        open_with(rekeyed, tmp_path, Unlock(passphrase=Passphrase("open sesame")))


def test_rekey_refuses_to_lock_everyone_out_or_remove_a_stranger(archive, people):
    only_alice = Unlock((people["alice"],))
    with pytest.raises(ArchiveError, match="would leave no recipient"):
        rekey_archive(io.BytesIO(archive), io.BytesIO(), only_alice, LIMITS,
                      remove=(people["alice"].recipient, people["bob"].recipient),
                      remove_passphrases=True)
    with pytest.raises(ArchiveError, match="is not a recipient of this archive"):
        rekey_archive(io.BytesIO(archive), io.BytesIO(), only_alice, LIMITS,
                      remove=(people["carol"].recipient,))
    with pytest.raises(ArchiveError, match="none of the given identities"):
        rekey_archive(io.BytesIO(archive), io.BytesIO(), Unlock((people["carol"],)), LIMITS,
                      add=(people["carol"].recipient,))


# -- strings a person copies and types -----------------------------------------------------------

def test_every_single_character_typo_in_a_recipient_string_is_caught(people):
    text = str(people["alice"].recipient)
    assert parse_recipient(text) == people["alice"].recipient
    assert parse_recipient(text.upper()) == people["alice"].recipient
    body_start = len("cfms1")
    for position in range(body_start, len(text)):
        original = text[position].upper()
        for replacement in (ALPHABET[(ALPHABET.index(original) + 1) % 32],
                            ALPHABET[(ALPHABET.index(original) + 17) % 32]):
            typo = text[:position] + replacement.lower() + text[position + 1:]
            with pytest.raises(ArchiveError, match="checksum does not match|mistyped"):
                parse_recipient(typo)
    with pytest.raises(ArchiveError, match="must have 58 characters"):
        parse_recipient(text[:-1])
    with pytest.raises(ArchiveError, match="does not start with 'cfms1'"):
        parse_recipient("age1" + text[5:])
    with pytest.raises(ArchiveError, match=r"character 3 \('U'\) is not one of"):
        parse_recipient(text[:7] + "u" + text[8:])


def test_a_paper_phrase_is_forgiving_about_case_spaces_and_look_alikes_but_not_typos(people):
    phrase = people["alice"].paper_phrase()
    groups = phrase.split("-")
    assert len(groups) == 15 and all(len(g) == 4 for g in groups)
    messy = " ".join(groups).lower().replace("0", "o").replace("1", "l")
    assert parse_identity(messy) == people["alice"]
    assert parse_identity("CFMS-SECRET-" + phrase) == people["alice"]
    index = next(i for i, ch in enumerate(phrase) if ch not in "-")
    wrong = ALPHABET[(ALPHABET.index(phrase[index]) + 5) % 32]
    with pytest.raises(ArchiveError, match="checksum does not match"):
        parse_identity(wrong + phrase[1:])
    # An identity file may hold the bare phrase, as a person would type it.
    assert parse_identity_file(f"# mine\n{messy}\n".encode(), LIMITS) == (people["alice"],)


async def test_keygen_creates_a_0600_identity_under_umask_0_and_paper_round_trips(tmp_path,
                                                                                 capsys):
    out = tmp_path / "me.identity"
    previous = os.umask(0)
    try:
        assert cli_main(["backup", "keygen", "--out", str(out), "--paper"]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    printed = capsys.readouterr().out.splitlines()
    phrase = printed[0].removeprefix("recovery phrase: ")
    recipient = printed[1].removeprefix("recipient: ")
    assert parse_recipient(recipient) == parse_identity_file(out.read_bytes(), LIMITS)[0].recipient
    assert cli_main(["backup", "keygen", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err

    typed = tmp_path / "typed.identity"
    done = await run_cli(*cli_command("backup", "keygen", "--from-paper", "--out", str(typed)),
                         stdin_text=phrase.lower().replace("-", " ") + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == f"recipient: {recipient}"
    assert stat.S_IMODE(typed.stat().st_mode) == 0o600
    bad = await run_cli(*cli_command("backup", "keygen", "--from-paper", "--out",
                                     str(tmp_path / "x")), stdin_text="ABCD-" + phrase[5:])
    assert bad.returncode == 1 and b"recovery phrase: identity checksum" in bad.stderr
    assert not (tmp_path / "x").exists()


# -- the committed fixture, read by this code and by an independent decoder ----------------------

FIXTURE_FILES = {"f-empty": b"", "f-note": b"format 3 fixture\n",
                 "f-data": bytes(range(256)) * 300}


def test_the_committed_format_3_fixture_reads(tmp_path):
    archive = (FIXTURE / "demo.cfms.enc").read_bytes()
    passphrase = (FIXTURE / "passphrase.txt").read_text().removesuffix("\n")
    for unlock in (Unlock(parse_identity_file((FIXTURE / "alice.identity").read_bytes(), LIMITS)),
                   Unlock(parse_identity_file((FIXTURE / "bob.identity").read_bytes(), LIMITS)),
                   Unlock(passphrase=Passphrase(passphrase))):
        staging = tmp_path / f"s{os.urandom(3).hex()}"
        contents = read_back(io.BytesIO(archive), unlock, staging, LIMITS)
        assert contents.metadata["backup_name"] == "format3-fixture"
        assert {f["id"]: f["sha256"] for f in contents.files} == {
            fid: hashlib.sha256(data).hexdigest() for fid, data in FIXTURE_FILES.items()}
        assert {p.name: p.read_bytes() for p in staging.iterdir()} == FIXTURE_FILES
    carol = parse_identity_file((FIXTURE / "carol.identity").read_bytes(), LIMITS)
    with pytest.raises(ArchiveError, match="none of the given identities"):
        read_back(io.BytesIO(archive), Unlock(carol), tmp_path / "c", LIMITS)


def _independent_file_key(archive: bytes, *, secret: bytes | None = None,
                          passphrase: str | None = None) -> tuple[bytes, bytes]:
    """docs/BACKUP_FORMAT.md §2 by hand: (file key, payload) of a format 3 archive."""
    stanzas = _stanzas(archive)
    offset, kind, length = stanzas[-1]
    block_end = offset + 3 + length
    mac, payload = archive[block_end:block_end + 32], archive[block_end + 32:]
    file_key = None
    for offset, kind, length in stanzas:
        body = archive[offset + 3:offset + 3 + length]
        if kind == 1 and secret is not None:
            private = X25519PrivateKey.from_private_bytes(secret)
            mine = private.public_key().public_bytes_raw()
            if body[:32] != mine:
                continue
            shared = private.exchange(X25519PublicKey.from_public_bytes(body[32:64]))
            wrap_key = HKDF(hashes.SHA256(), 32, body[32:64] + mine,
                            b"cfms-backup-v3 x25519").derive(shared)
            file_key = AESGCM(wrap_key).decrypt(bytes(12), body[64:], b"")
        if kind == 2 and passphrase is not None:
            log2_n, r, p, salt = body[0], body[1], body[2], body[3:19]
            wrap_key = hashlib.scrypt(passphrase.encode(), salt=b"cfms-backup-v3 scrypt" + salt,
                                      n=2 ** log2_n, r=r, p=p, dklen=32, maxmem=2 ** 28)
            file_key = AESGCM(wrap_key).decrypt(bytes(12), body[19:], b"")
    assert file_key is not None
    salt = payload[12:44]
    mac_key = HKDF(hashes.SHA256(), 32, salt, b"cfms-backup-v3 recipients").derive(file_key)
    check = hmac.HMAC(mac_key, hashes.SHA256())
    check.update(archive[:block_end] + payload[:83])
    check.verify(mac)
    return file_key, payload


def test_an_independent_decoder_following_the_format_page_reads_the_fixture():
    archive = (FIXTURE / "demo.cfms.enc").read_bytes()
    alice = parse_identity_file((FIXTURE / "alice.identity").read_bytes(), LIMITS)[0]
    passphrase = (FIXTURE / "passphrase.txt").read_text().removesuffix("\n")
    by_identity = _independent_file_key(archive, secret=alice.secret)
    by_passphrase = _independent_file_key(archive, passphrase=passphrase)
    assert by_identity == by_passphrase
    file_key, payload = by_identity
    decoded = spec_decode(payload, {"key": file_key.hex()})  # the payload is plain format 2
    assert decoded.file_bytes() == FIXTURE_FILES
    assert decoded.listing("metadata.json")["backup_name"] == "format3-fixture"


# -- the command line ----------------------------------------------------------------------------

async def test_cli_rekey_prints_an_unchanged_payload_hash_and_verify_follows_it(tmp_path):
    archive = tmp_path / "demo.cfms.enc"
    shutil.copyfile(FIXTURE / "demo.cfms.enc", archive)
    original = archive.read_bytes()
    carol = parse_identity_file((FIXTURE / "carol.identity").read_bytes(), LIMITS)[0]
    bob = parse_identity_file((FIXTURE / "bob.identity").read_bytes(), LIMITS)[0]
    done = await run_cli(*cli_command(
        "backup", "rekey", str(archive), "--identity", str(FIXTURE / "alice.identity"),
        "--add-recipient", str(carol.recipient), "--remove-recipient", str(bob.recipient),
        "--remove-passphrase"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    before = next(l for l in lines if l.startswith("payload sha256 before:")).split()[3]
    after = next(l for l in lines if l.startswith("payload sha256 after:")).split()[3]
    offset = summarize_archive(io.BytesIO(original)).payload_offset
    assert before == after == hashlib.sha256(original[offset:]).hexdigest()
    assert archive.read_bytes() != original
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    ok = await run_cli(*cli_command("backup", "verify", str(archive), "--identity",
                                    str(FIXTURE / "carol.identity")))
    assert ok.returncode == 0 and ok.stdout.startswith(b"OK:"), ok.stderr
    refused = await run_cli(*cli_command("backup", "verify", str(archive), "--identity",
                                         str(FIXTURE / "bob.identity")))
    assert refused.returncode == 1
    assert b"none of the given identities is a recipient" in refused.stderr
    gone = await run_cli(*cli_command("backup", "verify", str(archive), "--passphrase-file",
                                      str(FIXTURE / "passphrase.txt")))
    assert gone.returncode == 1 and b"it has no passphrase" in gone.stderr


# -- through the running server ------------------------------------------------------------------

async def test_an_export_for_recipients_leaves_no_key_and_imports_with_identity_or_passphrase(
        start_server, tmp_path):
    source = await start_server("source")
    alice, carol = generate_identity(), generate_identity()
    identity = tmp_path / "alice.identity"
    identity.write_text(f"# test\n{alice.identity_line()}\n")
    wrong = tmp_path / "carol.identity"
    wrong.write_text(f"{carol.identity_line()}\n")
    async with source.connect("admin") as client:
        built = await build_store(client, tmp_path / "src", big_bytes=300_000)
        archive, key, result = await export_backup(
            client, tmp_path / "backup", "for-alice", recipients=(str(alice.recipient),),
            passphrase="tape drive 7")
        with pytest.raises(Exception, match="recipients\\[0\\].*mistyped"):
            await client.call("generate_backup", {
                "recipients": [str(alice.recipient)[:-1] + "x"]})
    assert key is None and result["key_task_id"] is None
    assert result["recipients"] == [str(alice.recipient)] and result["passphrase"] is True
    assert archive.read_bytes()[:8] == b"CFMSBAK3"
    backups = source.root / "content" / "backups"
    assert sorted(p.name for p in backups.iterdir() if p.is_file()) == ["for-alice.cfms.enc"]

    target = await start_server("target")
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, archive, wrong)
        assert final["status"] == "failed"
        assert "none of the given identities is a recipient" in final["error_message"]
        assert (await dump_store(target))["documents"] == []

        final, _ = await import_from(admin, archive, identity)
        assert final["status"] == "completed", final
        assert final["files_count"] == len(built.contents)

    second = await start_server("second")
    async with second.connect("admin") as admin:
        init = await admin.call("initiate_backup_import", {})
        await admin.upload_file(init["archive_task_id"], archive)
        bad = await admin.call("start_backup_import", {"backup_task_id": init["backup_task_id"],
                                                       "passphrase": "tape drive 8"})
        assert bad["status"] == "processing"
        from backup_support import wait_final
        failed = await wait_final(admin, init["backup_task_id"])
        assert failed["error_message"] == "wrong passphrase for this archive"
        with pytest.raises(Exception, match="key upload is not complete"):
            init = await admin.call("initiate_backup_import", {})
            await admin.upload_file(init["archive_task_id"], archive)
            await admin.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
        final, _ = await import_from(admin, archive, None, passphrase="tape drive 7")
        assert final["status"] == "completed", final
        assert final["documents_count"] == len(built.documents)
