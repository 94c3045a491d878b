"""The one exception type users see.

Every problem caused by input (a path, a config, a tensor, a flag) is raised as a
`TesseraError` whose message is a single line naming the problem and the fix. The CLI
prints it as `error: ...` and exits with status 2; it never shows a traceback for these.
"""


class TesseraError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
