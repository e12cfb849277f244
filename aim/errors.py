"""Errors the `aim` command prints as one line (exit status 2, no traceback): something the
user gave -- a setting, a file, a folder -- is wrong, and the message names it. Any other
exception is a bug and keeps its traceback."""


class UsageError(ValueError):
    """A bad setting, file or folder given by the user; the message names it."""


class DataError(UsageError):
    """Bad data on disk; the message names the file (and row)."""


def first_line(error):
    """The first line of an exception's message for a one-line error, or the exception's type
    name when the message is empty (torch.load of an empty file, for one)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
