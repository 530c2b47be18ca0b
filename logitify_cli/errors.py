"""Errors the CLI turns into one clear line and an exit code."""


class LogitifyError(Exception):
    """The run failed for a reason the user can act on (exit 1)."""

    exit_code = 1


class UsageError(LogitifyError):
    """The command was asked for something it cannot do as asked (exit 2)."""

    exit_code = 2
