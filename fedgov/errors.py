"""Errors that a person caused and can fix: the CLI prints them as one line, never a traceback.

A bug raises a normal exception; a user's mistake (a config typo, a missing data file, a bad column)
raises a subclass of :class:`FedgovError` whose message names the field, file or site and what was
expected.
"""

from __future__ import annotations


class FedgovError(Exception):
    """A user-facing error: its message is one line naming what was wrong and what was expected."""


class ConfigError(FedgovError):
    """A configuration value is missing, misspelt, of the wrong type or out of range."""


class DataValidationError(FedgovError):
    """A site's data file is missing, unreadable or does not match its declared schema."""
