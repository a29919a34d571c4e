"""Errors that mean 'the user gave bad input': shown as one line, never as a traceback."""


class UserError(ValueError):
    """A bad value from the user (config, path, file). The message is one line naming the value."""
