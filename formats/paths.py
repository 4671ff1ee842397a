"""File names read from files (a manifest, a shard index, a recorded header) as paths: only a plain relative
POSIX path that stays inside its folder, so that a folder someone hands over can make bitsmith read or write
nothing outside it (DESIGN.md section 4)."""
from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath

from .errors import InputError


def plain(name, what: str) -> str:
    """`name` if it is a plain relative POSIX path: a string of non-empty parts, none `.` or `..`, not
    absolute, no backslash, drive or control character; else InputError naming `what` (where it was read).
    Enough for a name written into a folder this process has just made; `inside` for any other folder."""
    problem = _problem(name)
    if problem:
        raise InputError(f"{what}: {name!r} {problem}")     # repr: one line whatever the name holds
    return name


def inside(folder: Path, name, what: str) -> Path:
    """folder / name, once `name` is `plain` and the path resolves inside `folder` (no symbolic link out)."""
    path = Path(folder) / plain(name, what)
    try:
        target = path.resolve()
        escapes = not target.is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError) as e:                      # a link loop (RuntimeError before Python 3.13)
        raise InputError(f"{what}: {name!r} cannot be resolved ({e})") from None
    if escapes:
        raise InputError(f"{what}: {name!r} is a symbolic link out of the folder (to {target}); "
                         "copy the folder with its links resolved to use it")
    return path


def check_links(folder: Path) -> None:
    """InputError at the first symbolic link in `folder` or its subfolders that leads out of it."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):                # does not descend into linked folders
        for entry in sorted(dirs + files):
            path = Path(root, entry)
            if path.is_symlink():
                inside(folder, path.relative_to(folder).as_posix(), str(folder))


def _problem(name) -> str | None:
    if not isinstance(name, str):
        return "is not a file name"
    if not name:
        return "is an empty file name"
    if any(c < " " or c == "\x7f" for c in name):
        return "holds a control character"
    if "\\" in name:
        return "holds a backslash (names are POSIX paths)"
    if name.startswith("/") or PureWindowsPath(name).drive:
        return "is an absolute path (names are relative to the folder)"
    if ".." in name.split("/"):
        return "climbs out of the folder (a '..' part)"
    if any(part in ("", ".") for part in name.split("/")):
        return "has an empty or '.' part (not a plain relative path)"
    return None
