"""The `cfms-trio` command line.

One module per command group, each with a `register(subparsers)`: `serve`, `backup` (offline
export, verify, inspect) and `client` (drive a running server).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import backup, client, serve

DESCRIPTION = "The `cfms-trio` command line: `serve`, plus offline backup tools and client commands."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfms-trio", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    backup.register(sub)
    client.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`cfms-trio client ls | head`): stop quietly, as other tools do.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
