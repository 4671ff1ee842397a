"""Named points where a run dies at once, as if killed: tests of interrupted runs set the environment variable
`BITSMITH_KILL_AT` to a point's name ("block:2", "measured", ...) to stop a run exactly there."""
from __future__ import annotations

import os
import signal

VARIABLE = "BITSMITH_KILL_AT"


def point(name: str) -> None:
    """SIGKILL this process when `BITSMITH_KILL_AT` names this point."""
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
