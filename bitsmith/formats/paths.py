"""File names read from files (a manifest, a shard index, a recorded header) as paths: only a plain relative
POSIX path that stays inside its folder, so that a folder someone hands over can make bitsmith read or write
nothing outside it (DESIGN.md section 4)."""
from __future__ import annotations

import os
import stat
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


def check_folder(folder: Path) -> None:
    """InputError at the first symbolic link in `folder` or its subfolders that leads out of it, or the first
    entry that is neither a file nor a folder (a FIFO or a device would block or never end when read)."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):                # does not descend into linked folders
        for entry in sorted(dirs + files):
            path = Path(root, entry)
            name = path.relative_to(folder).as_posix()
            if path.is_symlink():
                inside(folder, name, str(folder))
            kind = _special(path)
            if kind:
                raise InputError(f"{folder}: {name!r} is {kind}, not a regular file")


def open_regular(path, what: str | None = None):
    """`path` opened for binary reading, once it is a regular file: a FIFO, device or folder is refused without
    being opened or read (a FIFO would block, a device never end); an OS error (missing, permission denied)
    becomes InputError naming `what` (default: the path)."""
    what = what or str(path)
    kind = _special(Path(path))
    if kind:
        raise InputError(f"{what} is {kind}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # never blocks, should a FIFO take its place now
    except OSError as e:
        raise InputError(f"{what} cannot be read ({e.strerror})") from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise InputError(f"{what} is {kind}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path, what: str | None = None) -> bytes:
    """The bytes of a regular file (`open_regular`), read errors included as InputError."""
    with open_regular(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise InputError(f"{what or path} cannot be read ({e.strerror})") from None


def _special(path: Path) -> str | None:
    """What `path` is when it exists and is neither a regular file nor a folder (links followed)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISDIR(mode) else _kind(mode)


def _kind(mode: int) -> str | None:
    """None for a regular file, else what the file is."""
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


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
