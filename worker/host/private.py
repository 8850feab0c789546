"""Files only the worker's user can touch, whatever the umask.

* **The state directory** (the ledger, the runs' output) is checked before it is used
  (:func:`state_dir`): it must belong to the user the worker runs as and be writable by
  no one else, and each directory above it must belong to root or to that user and be
  writable by no one else unless it has the sticky bit (``/tmp``). Otherwise another
  user could plant ledger entries, which name process groups the worker signals, or
  read a flow's output. The missing levels are created 0700.
* **Directories** the worker creates are 0700 and **files** 0600: the mode is set
  explicitly (``chmod``/``fchmod``), not left to the umask.
* **No symbolic link is followed** when a file is opened (``O_NOFOLLOW``): a link planted
  at an output path or a ledger entry is refused, its target untouched.
* **Files holding a secret setting that group or others can read** are said at start
  (:func:`exposed_secrets`): the TOML file the settings came from, and the unit's
  ``EnvironmentFile=`` (``/etc/flow-worker/POOL.env``), which systemd reads, not the
  worker: the worker looks at its mode, and at which secrets it names if it can read it.

Errors say which path and why, never a file's content.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from worker.rules.secrecy import SECRET_SETTINGS, SECRET_VARIABLES

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
ENV_DIR: Final = Path("/etc/flow-worker")
"""Where the units' ``EnvironmentFile=/etc/flow-worker/POOL.env`` is."""
_TOML_SECRET: Final = re.compile(rf"^\s*({'|'.join(sorted(SECRET_SETTINGS))})\s*=", re.M)
_ENV_SECRET: Final = re.compile(rf"^\s*(?:export\s+)?({'|'.join(sorted(SECRET_VARIABLES))})\s*=\s*\S", re.M)


class PrivacyError(RuntimeError):
    """A directory the worker would keep its state in is not private: the message says why."""


def user(uid: int) -> str:
    """``uid N (name)``, for messages."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _writers(mode: int) -> str:
    return " and ".join(who for who, bit in (("its group", 0o020), ("others", 0o002)) if mode & bit)


def _make_dir(path: Path) -> None:
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    _chmod_dir(path)  # the umask may have taken bits away


def _chmod_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


def _check_above(real: Path, above: Path) -> None:
    st = os.stat(above)
    me = os.geteuid()
    if st.st_uid not in (0, me):
        raise PrivacyError(
            f"state directory {real}: {above} above it is owned by {user(st.st_uid)}, neither root nor "
            f"{user(me)} this worker runs as: refused (that user could replace the state directory); "
            "set state_dir to a directory of your own"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise PrivacyError(
            f"state directory {real}: {above} above it is writable by {_writers(st.st_mode)} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit: refused (they could "
            "replace the state directory); set state_dir elsewhere"
        )


def state_dir(path: Path) -> Path:
    """The state directory, resolved, created (each missing level 0700) and checked;
    :class:`PrivacyError` if someone else could write in it or replace it. ``OSError``
    if it cannot be created."""
    real = Path(os.path.realpath(path))
    me = os.geteuid()
    missing: list[Path] = []
    here = real
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    for above in (here, *here.parents) if missing else real.parents:
        _check_above(real, above)  # nothing is created under a directory someone else controls
    for level in reversed(missing):
        _make_dir(level)
    for above in real.parents[: len(missing) - 1] if len(missing) > 1 else ():
        _check_above(real, above)  # the levels made: ours (not someone's who was quicker)
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise PrivacyError(f"state directory {real} is not a directory")
    if st.st_uid != me:
        raise PrivacyError(
            f"state directory {real} is owned by {user(st.st_uid)}, not by {user(me)} this worker "
            "runs as: refused (that user could plant ledger entries, which name the processes the "
            "worker signals); set state_dir to a directory of your own"
        )
    if st.st_mode & 0o022:
        raise PrivacyError(
            f"state directory {real} is writable by {_writers(st.st_mode)} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): refused (they could plant ledger entries, which "
            f"name the processes the worker signals); chmod 700 {real}"
        )
    return real


def private_dir(path: Path) -> None:
    """``path`` as a directory of this user's, mode 0700: created if missing, its mode set
    if not; ``OSError`` if it is a symbolic link, not a directory, or another user's."""
    _make_dir(path)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link, not followed" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise OSError(errno.ENOTDIR, what, str(path))
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"owned by {user(st.st_uid)}", str(path))
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        _chmod_dir(path)


def open_private(path: Path | str, flags: int) -> int:
    """``os.open`` of a regular file, mode 0600 whatever the umask (an existing file's mode
    is set too), never through a symbolic link: one there is an ``OSError`` (``ELOOP``)
    saying so, and its target is untouched."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, not followed", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: Path) -> bytes:
    """A file's content, read without following a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _exposed(path: Path, names: re.Pattern[str], unread: list[str]) -> tuple[str, int, list[str]] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not st.st_mode & 0o044:
        return None
    try:
        held = sorted(set(names.findall(path.read_text(errors="replace"))))
    except OSError:  # its group may read it, this user not: what the environment got, likely from it
        held = unread
    return (str(path), stat.S_IMODE(st.st_mode), held) if held else None


def exposed_secrets(
    config_file: str | None, pool: str | None, environ: Mapping[str, str]
) -> list[tuple[str, int, list[str]]]:
    """Each file holding a secret setting that its group or others can read: (path, mode,
    the secrets it names). The TOML file read (``config_file``), and ``ENV_DIR/POOL.env``."""
    found = []
    if config_file:
        found.append(_exposed(Path(config_file), _TOML_SECRET, []))
    if pool:
        in_env = sorted(name for name in SECRET_VARIABLES if environ.get(name))
        found.append(_exposed(ENV_DIR / f"{pool}.env", _ENV_SECRET, in_env))
    return [one for one in found if one is not None]
