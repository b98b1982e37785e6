"""User-facing errors: one line that says what to change, never a traceback."""


class UserError(Exception):
    """Bad input from the user (paths, configs, data). The CLI prints the message alone and exits 2."""
