"""User-facing errors.

A ``CardError`` carries a complete one-line message meant for the terminal; the CLI prints it without a
traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class CardError(Exception):
    """A problem with the user's input or environment, explained in one line."""
