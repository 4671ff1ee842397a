"""The journal of an unfinished output folder: the steps a run has finished, one JSON line each, appended and
fsynced only once the data the step wrote is on disk. A run killed at any point leaves a journal whose
complete lines describe a consistent state, from which the next run can continue (`--resume`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .output import fsync

NAME = ".journal"


class Journal:
    """The journal file in `folder`, opened for appending on the first `append`."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / NAME
        self._file = None

    def read(self) -> list[dict]:
        """The complete entries; a line torn by a kill (and anything after it) is cut off the file."""
        if not self.path.is_file():
            return []
        entries, length = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                entry = _entry(line)
                if entry is None:
                    break
                entries.append(entry)
                length += len(line)
        os.truncate(self.path, length)
        return entries

    def append(self, entry: dict) -> None:
        """Add one entry durably: written, fsynced, and the folder fsynced (the file may be new)."""
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        self._file.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        fsync(self.path.parent)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _entry(line: bytes) -> dict | None:
    """A complete line's entry, or None for a torn or unreadable one."""
    if not line.endswith(b"\n"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None
