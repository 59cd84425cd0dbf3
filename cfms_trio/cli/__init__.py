"""The `cfms-trio` command line.

One module per command group, each with a `register(subparsers)`: `serve`, `backup` (offline
export, verify, inspect) and `client` (drive a running server).
"""

from __future__ import annotations

import argparse
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
