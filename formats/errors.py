"""The one error type for bad user input: the CLI prints its message on one line and exits 2."""


class InputError(Exception):
    """A file, option or value the user gave is unusable; the message names it and says why."""
