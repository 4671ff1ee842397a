"""The one error type for bad user input: the CLI prints its message on one line and exits 2."""


class InputError(Exception):
    """A file, option or value the user gave is unusable; the message names it and says why."""


class PeerLost(RuntimeError):
    """Another process of a run over several processes (bitsmith/distributed.py) died or was stopped."""


def one_line(e: BaseException) -> str:
    """An exception's message with its whitespace runs (newlines included) made single spaces."""
    return " ".join(str(e).split()) or type(e).__name__


_signalled: list[KeyboardInterrupt] = []     # the interrupt a signal raised during the running command, if any


def signalled(interrupt: KeyboardInterrupt | None) -> KeyboardInterrupt | None:
    """Remember the interrupt a signal handler raises (None: forget it, the command is over)."""
    _signalled[:] = [interrupt] if interrupt is not None else []
    return interrupt


def library_error(message: str) -> BaseException:
    """What to raise for a library's failure to read input: an InputError saying `message`, unless a signal arrived
    meanwhile. A KeyboardInterrupt raised inside a library's callback can come out as that library's own error
    ("could not determine the shape of object type ..."): the interrupt, not the file, is then the cause."""
    return _signalled[0] if _signalled else InputError(message)
