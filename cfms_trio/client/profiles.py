"""Saved logins: the profile file of `cfms-trio client login`.

One JSON file, `profiles.json`, in the user's config folder (`$CFMS_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/cfms-trio`, else `~/.config/cfms-trio`). It maps a profile name to the server,
the username, the CA file to trust and the current session token with its expiry. It never holds
a password. The file is 0600 and its folder 0700 from their creation on, and every save replaces
the file atomically, so a crash mid-save leaves the previous version.

Blocking, pure helpers; async callers run them through `trio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

from .files import SECRET_FILE_MODE

PROFILES_FILE_NAME = "profiles.json"
CONFIG_DIR_ENV = "CFMS_CONFIG_DIR"
PROFILE_ENV = "CFMS_PROFILE"
DEFAULT_PROFILE = "default"
PROFILE_FILE_VERSION = 1
SECRET_DIR_MODE = 0o700


class ProfileError(Exception):
    """The profile file cannot be read or written, or names no usable profile."""


@dataclasses.dataclass
class Profile:
    """One saved login. `token` is None after a logout; the rest stays so that the next
    `login` needs no flags."""

    server: str
    username: str
    cafile: str | None = None
    insecure: bool = False
    token: str | None = None
    token_expires_time: float | None = None  # the server's `exp`, seconds since the epoch
    token_obtained_time: float | None = None  # this machine's clock when the token arrived

    def token_state(self, now: float) -> str:
        """'none', 'expired', 'stale' (less than half of its lifetime left: refresh it) or
        'fresh'."""
        if not self.token or self.token_expires_time is None:
            return "none"
        if now >= self.token_expires_time:
            return "expired"
        obtained = self.token_obtained_time or now
        half_life_s = max(0.0, self.token_expires_time - obtained) / 2
        if self.token_expires_time - now < half_life_s:
            return "stale"
        return "fresh"

    def with_token(self, login_data: dict | None, now: float) -> "Profile":
        """This profile holding the session of a `login`/`refresh_token` answer (or none)."""
        if login_data is None:
            return dataclasses.replace(self, token=None, token_expires_time=None,
                                       token_obtained_time=None)
        return dataclasses.replace(self, token=login_data["token"],
                                   token_expires_time=float(login_data["exp"]),
                                   token_obtained_time=now)


def config_dir(override: str | Path | None = None) -> Path:
    """Where the profile file lives: `override`, `$CFMS_CONFIG_DIR`, `$XDG_CONFIG_HOME/cfms-trio`
    or `~/.config/cfms-trio`, in that order."""
    if override:
        return Path(override)
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cfms-trio"


def profiles_path(folder: Path) -> Path:
    return folder / PROFILES_FILE_NAME


def load_profiles(folder: Path) -> dict[str, Profile]:
    """Every saved profile (none when the file does not exist yet)."""
    path = profiles_path(folder)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ProfileError(f"cannot read {path}: {err.strerror}") from None
    try:
        doc = json.loads(text)
        entries = doc["profiles"]
        fields = {f.name for f in dataclasses.fields(Profile)}
        return {name: Profile(**{k: v for k, v in entry.items() if k in fields})
                for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ProfileError(f"{path} is not a cfms-trio profile file ({err}); remove it and "
                           "log in again") from None


def save_profiles(folder: Path, profiles: dict[str, Profile]) -> Path:
    """Write every profile, replacing the file atomically; the file is 0600 from the start."""
    folder.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    path = profiles_path(folder)
    temporary = folder / f".{PROFILES_FILE_NAME}.{os.getpid()}.tmp"
    doc = {"version": PROFILE_FILE_VERSION,
           "profiles": {name: dataclasses.asdict(p) for name, p in sorted(profiles.items())}}
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return path


def update_profile(folder: Path, name: str, profile: Profile | None) -> Path:
    """Save `profile` under `name` (None removes it), keeping the other profiles."""
    profiles = load_profiles(folder)
    if profile is None:
        profiles.pop(name, None)
    else:
        profiles[name] = profile
    return save_profiles(folder, profiles)
