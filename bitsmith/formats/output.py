"""Output folders (DESIGN.md section 4): OUT may not be, lie inside, or contain the input; it is locked for the
whole run; it is published by a rename, and an old OUT is replaced by an atomic swap.

Beside OUT, in its parent folder:
- `.<name>.lock`: the lock (flock), recording its holder (pid, host, start time);
- `.<name>.XXXX.partial`: the folder being written; one whose writer died is deleted by the next writer, or
  continued by it when it resumes (the newest one holding the writer's resume mark);
- `.<name>.XXXX.old/old`: the old OUT during a two-rename replace (where the swap is not available); a crash
  between the renames leaves it there, and the next writer puts it back.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from functools import cache
from pathlib import Path

from .errors import InputError

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2     # renameat2(2) flags, <linux/fs.h>
AT_FDCWD = -100


def refuse(out, inputs, overwrite: bool) -> None:
    """What can be refused before any work and without creating anything: OUT overlapping an input (writing
    there would destroy the input, or be read back as part of it), or OUT existing without `overwrite`."""
    target = Path(out).resolve()
    for given in inputs:
        real = Path(given).resolve()
        if target == real:
            raise InputError(f"{out}: the output may not be the input itself")
        if real in target.parents:
            raise InputError(f"{out}: the output may not lie inside the input {given}")
        if target in real.parents:
            raise InputError(f"{out}: the output may not contain the input {given}")
    if os.path.lexists(out) and not overwrite:
        raise InputError(f"{out}: output already exists (pass --overwrite to replace it)")


class ResumeRefused(InputError):
    """The unfinished folder of an earlier run cannot be continued by this one; it is kept as it was."""


class Output:
    """OUT for one run: checked, locked, written in `tmp`, then `publish`ed, `discard`ed or `release`d (all
    unlock). With `resume_mark` (a file name), `tmp` is the newest unfinished folder of a dead run holding that
    file, if any (`adopted`)."""

    def __init__(self, out, inputs=(), overwrite: bool = False, resume_mark: str | None = None):
        refuse(out, inputs, overwrite)
        self.given, self.overwrite = out, overwrite
        given = Path(os.path.abspath(out))
        try:
            given.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{given.parent}: cannot create the output's parent folder ({e.strerror})") from None
        self.path = given.parent.resolve() / given.name
        self._lock = Lock(self.path.parent / f".{self.path.name}.lock", out)
        try:
            adopted = self._recover(resume_mark)
            refuse(out, inputs, overwrite)          # again, under the lock: another run may have published OUT
            self.adopted = adopted is not None
            self.tmp = adopted or Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                                        dir=self.path.parent))
        except BaseException:
            self._lock.release()
            raise

    def _siblings(self, kind: str) -> list[Path]:
        """This OUT's `.<name>.XXXX.<kind>` folders (the random part has no dot: no other OUT's name matches)."""
        pattern = re.compile(rf"\.{re.escape(self.path.name)}\.[^.]+\.{kind}")
        return sorted(p for p in self.path.parent.iterdir() if pattern.fullmatch(p.name))

    def _recover(self, resume_mark: str | None) -> Path | None:
        """Under the lock, so every writer of the siblings is dead: restore an old OUT that a crash left between
        the two renames of a replace, and delete unfinished folders (they are never published) but the one to
        continue: the newest holding `resume_mark`, returned."""
        for trash in self._siblings("old"):
            if (trash / "old").exists() and not os.path.lexists(self.path):
                os.rename(trash / "old", self.path)
            _remove(trash)
        partials = self._siblings("partial")
        marked = [p for p in partials if resume_mark and (p / resume_mark).is_file()]
        kept = max(marked, key=lambda p: (p / resume_mark).stat().st_mtime_ns, default=None)
        for partial in partials:
            if partial != kept:
                _remove(partial)
        return kept

    def publish(self) -> Path:
        """Rename `tmp` into place with the permissions of a plain mkdir, replacing an old OUT atomically."""
        os.chmod(self.tmp, 0o777 & ~_umask())
        if os.path.lexists(self.path):
            self._replace()
        elif not _renameat2(self.tmp, self.path, RENAME_NOREPLACE):
            os.rename(self.tmp, self.path)
        fsync(self.path.parent)
        self._lock.release()
        return self.path

    def _replace(self) -> None:
        """Swap the new folder with the old in one step, then delete the old one (now under the temporary name).
        Without the swap: two renames through a trash folder, which `_recover` undoes after a crash."""
        if not self.overwrite:
            raise InputError(f"{self.given}: output already exists (pass --overwrite to replace it)")
        if _renameat2(self.tmp, self.path, RENAME_EXCHANGE):
            _remove(self.tmp)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
        os.rename(self.path, trash / "old")
        os.rename(self.tmp, self.path)
        _remove(trash)

    def discard(self) -> None:
        """Delete the unfinished folder and unlock; OUT stays as it was."""
        _remove(self.tmp)
        self._lock.release()

    def release(self) -> None:
        """Unlock, keeping the unfinished folder for a later run to continue (or delete)."""
        self._lock.release()


class Lock:
    """An exclusive flock on `path`, which records its holder. Released by unlinking the file while still
    holding it: a process that opened the old file meanwhile sees, once it holds the lock, that the path no longer
    names that file and starts over, so two holders never coexist (unlinking after unlocking could delete the
    file a newer holder has locked)."""

    def __init__(self, path: Path, out):
        self.path = path
        while True:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise InputError(f"{path.parent}: cannot create the output's lock file ({e.strerror})") from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(self.fd)
                os.close(self.fd)
                raise InputError(f"{out}: is being written by {holder}") from None
            except BaseException:
                os.close(self.fd)
                raise
            if _names(path, self.fd):
                break
            os.close(self.fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record.encode() + b"\n", 0)

    def release(self) -> None:
        if self.fd is None:
            return
        if _names(self.path, self.fd):         # else someone else deleted it: leave whatever is there now
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """The holder a lock file records (empty for the moment between its holder's flock and write)."""
    try:
        h = json.loads(os.pread(fd, 4096, 0))
        return f"pid {h['pid']} on {h['host']} since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@cache
def _libc_renameat2():
    """The C library's renameat2, or None where it has none (glibc before 2.28, other systems)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with `flags`; False where the C library, kernel or filesystem does not offer them."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _remove(path: Path) -> None:
    """Delete a folder tree or file, best effort: whatever remains is deleted by the next writer of OUT."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Make a file's data durable, or a folder's names (files created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
