"""The one exception type for bad user input: entry points print its message on one line, exit 2."""


class UserError(Exception):
    """Bad input (a file, a line, a key) with a message that says what was expected.

    Raise it before anything is written; the entry points turn it into a one-line error and a
    non-zero exit instead of a stack trace.
    """
