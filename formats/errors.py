"""The one error type for bad user input: the CLI prints its message on one line and exits 2."""


class InputError(Exception):
    """A file, option or value the user gave is unusable; the message names it and says why."""


def one_line(e: BaseException) -> str:
    """An exception's message with its whitespace runs (newlines included) made single spaces."""
    return " ".join(str(e).split()) or type(e).__name__
