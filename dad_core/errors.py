"""Errors for bad input. Each message names the file, key or service at fault and says what to fix.

The CLIs turn any :class:`DADError` into a one-line message and exit code 2 instead of a traceback.
"""

__all__ = ["DADError"]


class DADError(ValueError):
    """Base class for errors caused by the user's input or environment, not by a bug."""
