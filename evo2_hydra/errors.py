"""The exceptions the entry points turn into one line: bad user input (exit 2) and a second
Ctrl-C (exit 130).
"""


class UserError(Exception):
    """Bad input (a file, a line, a key) with a message that says what was expected.

    Raise it before anything is written; the entry points turn it into a one-line error and a
    non-zero exit instead of a stack trace.
    """


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C: stop now.

    `saved_step`: the checkpoint step the first Ctrl-C's save completed before this one arrived
    (None: this stop saved nothing), so the one-line message can say what was kept.
    """

    def __init__(self, saved_step: int | None = None) -> None:
        super().__init__("SIGINT")
        self.saved_step = saved_step


def interrupted_message(err: KeyboardInterrupt) -> str:
    """The one line for a run stopped by a second Ctrl-C (or a Ctrl-C outside training)."""
    saved = getattr(err, "saved_step", None)
    if saved is None:
        return "interrupted (Ctrl-C): stopped without saving"
    return f"interrupted (Ctrl-C) after saving step {saved}: the same command resumes from it"
