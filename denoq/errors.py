"""The one exception type users see: a one-line message naming the problem and the fix."""


class DenoqError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with status 2.

    The message is one line: what is wrong, then what to do about it.
    """
