"""`cfms-trio backup keygen` and `cfms-trio backup rekey`: identities, paper phrases, rotation.

Also the small helpers the other commands use to turn `--recipient`, `--identity` and
`--passphrase-file` options into what the archive format takes.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from ..backup.format import (
    Passphrase,
    Unlock,
    generate_identity,
    identity_file_text,
    parse_identity,
    parse_identity_file,
    parse_recipient,
    rekey_archive,
    summarize_archive,
)
from ..config import ArchiveLimits
from ..errors import CfmsError

IDENTITY_FILE_MODE = 0o600


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def read_passphrase_file(path: str) -> str:
    """The passphrase in `path`: its text without one trailing line break."""
    text = Path(path).read_text(encoding="utf-8")
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise CfmsError(f"passphrase file {path} is empty")
    return text


def wrap_targets(recipients: list[str] | None, passphrase_file: str | None) -> tuple:
    """`--recipient` strings and `--passphrase-file` as the writer's recipients."""
    targets = []
    for text in recipients or ():
        targets.append(parse_recipient(text))
    if passphrase_file:
        targets.append(Passphrase(read_passphrase_file(passphrase_file)))
    return tuple(targets)


def unlock_from(identity_files: list[str] | None, passphrase_file: str | None) -> Unlock | None:
    """`--identity` files and `--passphrase-file` as what the reader tries; None if neither."""
    limits = ArchiveLimits()
    identities = []
    for path in identity_files or ():
        data = Path(path).read_bytes()
        try:
            identities.extend(parse_identity_file(data, limits))
        except CfmsError as err:
            raise CfmsError(f"{path}: {err.message}") from None
    passphrase = Passphrase(read_passphrase_file(passphrase_file)) if passphrase_file else None
    if not identities and passphrase is None:
        return None
    return Unlock(identities=tuple(identities), passphrase=passphrase)


def write_identity_file(path: Path, text: str) -> None:
    """Create `path` with mode 0600 from the start (never replacing a file): the identity is
    never readable by anyone else, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, IDENTITY_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.from_paper:
        if not args.out:
            return fail("--from-paper needs --out FILE for the identity file")
        phrase = (getpass.getpass("recovery phrase: ") if sys.stdin.isatty()
                  else sys.stdin.readline())
        try:
            identity = parse_identity(phrase)
        except CfmsError as err:
            return fail(f"recovery phrase: {err.message}")
    else:
        if not args.out and not args.paper:
            return fail("give --out FILE for the identity file, or --paper for a phrase")
        identity = generate_identity()
    if args.out:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            write_identity_file(Path(args.out), identity_file_text(identity, created))
        except FileExistsError:
            return fail(f"{args.out} already exists; not overwriting it")
        except OSError as err:
            return fail(f"cannot write {args.out}: {err.strerror}")
        print(f"identity written to {args.out} (mode 0600); keep it secret", file=sys.stderr)
    if args.paper:
        print(f"recovery phrase: {identity.paper_phrase()}")
    print(f"recipient: {identity.recipient}")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    archive = Path(args.archive)
    target = Path(args.out) if args.out else archive
    temp = target.with_name(f".{target.name}.rekey-{os.getpid()}")
    try:
        unlock = unlock_from(args.identity, args.passphrase_file)
        if unlock is None:
            return fail("give --identity FILE or --passphrase-file FILE to open the archive")
        add = list(wrap_targets(args.add_recipient, args.add_passphrase_file))
        remove = [parse_recipient(text) for text in args.remove_recipient or ()]
        if not add and not remove and not args.remove_passphrase:
            return fail("nothing to change: give --add-recipient, --remove-recipient, "
                        "--add-passphrase-file or --remove-passphrase")
        if args.out and target.exists():
            return fail(f"{target} already exists; not overwriting it")
        with open(archive, "rb") as src:
            before = summarize_archive(src)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, open(archive, "rb") as src:
            result = rekey_archive(src, out, unlock, ArchiveLimits(), add=add, remove=remove,
                                   remove_passphrases=args.remove_passphrase)
            out.flush()
            os.fsync(out.fileno())
        with open(temp, "rb") as written:
            after = summarize_archive(written)
        if after.payload_sha256 != before.payload_sha256:
            return fail("the rewritten payload differs from the original; nothing was changed")
        os.replace(temp, target)
    except CfmsError as err:
        return fail(err.message)
    except ValueError as err:  # a passphrase too long for the format
        return fail(str(err))
    except OSError as err:
        return fail(f"{err.strerror}: {err.filename}")
    finally:
        temp.unlink(missing_ok=True)
    print(f"archive: {target}")
    print("before:  " + "; ".join(result.before))
    print("after:   " + "; ".join(result.after))
    print(f"payload sha256 before: {before.payload_sha256} ({result.payload_bytes} bytes)")
    print(f"payload sha256 after:  {after.payload_sha256} (unchanged)")
    return 0


def add_unlock_options(parser) -> None:
    parser.add_argument("--identity", action="append", metavar="FILE",
                        help="identity file (or a file holding a recovery phrase) of a "
                             "recipient; may be repeated")
    parser.add_argument("--passphrase-file", metavar="FILE", help="file holding the passphrase")


def add_wrap_options(parser) -> None:
    parser.add_argument("--recipient", action="append", metavar="RECIPIENT",
                        help="make the backup for this recipient string (cfms1...); may be "
                             "repeated. No key file is written then")
    parser.add_argument("--passphrase-file", metavar="FILE",
                        help="also (or only) let this passphrase open the backup")


def register(commands) -> None:
    keygen = commands.add_parser("keygen", help="make an identity for recipient backups")
    keygen.add_argument("--out", help="identity file to create (mode 0600)")
    keygen.add_argument("--paper", action="store_true",
                        help="print a recovery phrase that can be typed back in")
    keygen.add_argument("--from-paper", action="store_true",
                        help="read a recovery phrase from stdin and write its identity to --out")
    keygen.set_defaults(func=cmd_keygen)
    rekey = commands.add_parser(
        "rekey", help="change who can open a format 3 archive (the payload stays byte-identical)")
    rekey.add_argument("archive")
    add_unlock_options(rekey)
    rekey.add_argument("--add-recipient", action="append", metavar="RECIPIENT")
    rekey.add_argument("--remove-recipient", action="append", metavar="RECIPIENT")
    rekey.add_argument("--add-passphrase-file", metavar="FILE")
    rekey.add_argument("--remove-passphrase", action="store_true")
    rekey.add_argument("--out", help="write the new archive here instead of replacing ARCHIVE")
    rekey.set_defaults(func=cmd_rekey)
