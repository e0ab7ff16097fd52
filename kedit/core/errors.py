"""The one exception type the CLI turns into a one-line error message."""


class KeditError(Exception):
    """A user-facing error: bad input, a missing model or file, an unsupported architecture."""
