"""Running `cfms-trio client ...` in-process against the test server, as a user would type it.

Each command runs `cfms_trio.cli.main` in a worker thread (it starts its own `trio.run`) with
its own stdout, stderr and stdin, and a profile folder under the test's tmp_path, so nothing
touches the real home folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import threading
from pathlib import Path

import trio

from cfms_trio.cli import main

from helpers import ADMIN_PASSWORD

COMMAND_TIMEOUT_S = 30
_ENV_LOCK = threading.Lock()  # commands change os.environ and sys.std*: one at a time


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def _main(argv: list[str], env: dict[str, str | None], stdin: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in env}
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    _stdin(stdin):
                try:
                    code = main(argv)
                except SystemExit as exit_:  # argparse's usage errors
                    code = exit_.code if isinstance(exit_.code, int) else 2
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return Result(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _stdin(text: str):
    import sys

    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


@dataclasses.dataclass
class Cli:
    """`await cli("ls", "-l", "/")` runs `cfms-trio client ls -l /` with this config folder."""

    config_dir: Path | None  # None: the default place (tests set $XDG_CONFIG_HOME)
    cafile: Path
    url: str

    async def __call__(self, *args: str, env: dict | None = None, stdin: str = "") -> Result:
        argv = ["client", *args]
        if self.config_dir is not None:
            argv += ["--config-dir", str(self.config_dir)]
        full_env = {"CFMS_PASSWORD": None, "CFMS_PROFILE": None, "CFMS_NEW_PASSWORD": None}
        full_env.update(env or {})
        with trio.fail_after(COMMAND_TIMEOUT_S):
            return await trio.to_thread.run_sync(_main, argv, full_env, stdin)

    async def login(self, username: str = "admin", password: str = ADMIN_PASSWORD,
                    *extra: str) -> Result:
        done = await self("login", "--server", self.url, "--cafile", str(self.cafile),
                          "--username", username, "--password-stdin", *extra,
                          stdin=password + "\n")
        assert done.code == 0, done
        return done

    def profiles(self) -> dict:
        return json.loads((self.config_dir / "profiles.json").read_text())["profiles"]
