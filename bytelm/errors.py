"""The one exception type for a user's mistake.

Anything raised as `UserError` reaches the user as a single line on stderr and exit code 2
(see `bytelm.cli.main`); everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a file's content, a flag value."""


class Stopped(Exception):
    """A command stopped cleanly on a signal (SIGTERM, SIGINT), its state saved; `bytelm.cli`
    says so in one line and exits with 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
