"""The one error type a user sees: a clear paragraph, exit status 2, no traceback."""


class UserError(Exception):
    """Bad input from the user: a recipe key, a file, a folder. The message says what and how to fix it."""

    exit_code = 2
