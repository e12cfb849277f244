"""Errors the `aim` command prints as one line (exit status 2, no traceback): something the
user gave -- a setting, a file, a folder -- is wrong, and the message names it. Any other
exception is a bug and keeps its traceback."""


class UsageError(ValueError):
    """A bad setting, file or folder given by the user; the message names it."""


class DataError(UsageError):
    """Bad data on disk; the message names the file (and row)."""
