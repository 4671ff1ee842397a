"""Named points where a run is stopped by a signal, as if killed or interrupted there: tests of interrupted runs
set the environment variable `BITSMITH_KILL_AT` to a point's name ("block:2", "measured", "commit", ...) to stop a
run exactly there, with SIGKILL, or with the signal `BITSMITH_KILL_SIGNAL` names (SIGINT, SIGTERM); `wait` parks the
run there for a signal from another process (at most a minute), so that one lands before the run can end. In a run
of several processes, `BITSMITH_KILL_RANK` picks the one process stopped (by its torchrun RANK)."""
from __future__ import annotations

import os
import signal
import time

VARIABLE = "BITSMITH_KILL_AT"
SIGNAL = "BITSMITH_KILL_SIGNAL"
RANK = "BITSMITH_KILL_RANK"


def point(name: str) -> None:
    """Send this process the signal (SIGKILL unless `BITSMITH_KILL_SIGNAL` says) when `BITSMITH_KILL_AT` names this
    point; a signal with a handler is handled before the run goes on (SIGINT: KeyboardInterrupt)."""
    if os.environ.get(VARIABLE) != name:
        return
    if os.environ.get(RANK) not in (None, os.environ.get("RANK", "0")):
        return
    if os.environ.get(SIGNAL) == "wait":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:          # a handled signal raises out of the sleep
            time.sleep(0.05)
    else:
        os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL) or "SIGKILL"))
