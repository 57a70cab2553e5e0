"""Errors a user can fix themselves.

A :class:`UserError` carries a one-line message that names the file, value or flag at fault
and says what to do.  The CLI turns it into exit code 2; anything else is an unexpected
failure (exit code 1).
"""


class UserError(Exception):
    """Bad input or usage; the message is shown to the user as is (exit code 2)."""

    exit_code = 2
