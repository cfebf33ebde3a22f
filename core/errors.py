"""The one exception type for mistakes a user can fix (bad flag, missing data, bad config)."""


class UserError(Exception):
    """Raised for user errors: scripts print the message as one line and exit non-zero."""

    exit_code = 2
