"""Helpers of the hostile-input tests: the command line run in this process, its one-line refusal, the disk
before and after, and a guard that turns a read blocked on a FIFO into a failure instead of a hang."""
from __future__ import annotations

import re
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner

from bitsmith.cli.main import main

PROGRESS = re.compile(r"^[\w ]*: *\d+%\|")            # a tqdm progress bar, redrawn after each carriage return
DROP_READ_ACCESS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]   # root without its read-anything


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def said(text: str) -> list[str]:
    """The lines a user reads in `text`, progress bars left out."""
    return [line for line in text.splitlines() if line.strip() and not PROGRESS.match(line)]


def refused(r, message: str, code: int = 2) -> None:
    """The command exited with `code`, printed nothing on stdout and exactly `message` as one line on stderr."""
    assert r.exit_code == code, r.output
    assert r.stdout == "" and said(r.stderr) == [message], r.output


def tree(root: Path) -> dict[str, bytes | str | None]:
    """Every path under root -> its bytes (None for a folder, the kind for anything else, never read)."""
    found = {}
    for p in sorted(Path(root).rglob("*")):
        mode = p.lstat().st_mode
        name = p.relative_to(root).as_posix()
        if stat.S_ISDIR(mode):
            found[name] = None
        elif stat.S_ISREG(mode):
            found[name] = p.read_bytes()
        else:
            found[name] = "link" if stat.S_ISLNK(mode) else "special"
    return found


@contextmanager
def never_blocks(seconds: int = 60):
    """Fail (instead of hanging the suite) when the code inside waits on a FIFO longer than `seconds`."""
    def fail(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s (reading a FIFO?)")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
