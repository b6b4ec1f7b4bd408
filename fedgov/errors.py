"""Errors that a person caused and can fix: the CLI prints them as one line, never a traceback.

A bug raises a normal exception; a user's mistake (a config typo, a missing data file, a bad column)
raises a subclass of :class:`FedgovError` whose message names the field, file or site and what was
expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any


class FedgovError(Exception):
    """A user-facing error: its message is one line naming what was wrong and what was expected."""


class ConfigError(FedgovError):
    """A configuration value is missing, misspelt, of the wrong type or out of range."""


class DataValidationError(FedgovError):
    """A site's data file is missing, unreadable or does not match its declared schema."""


def check_keys(
    where: str,
    data: Mapping[str, Any],
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    error: type[FedgovError] = ConfigError,
) -> None:
    """Refuse an unknown key (suggesting the closest known one) or a missing required key."""
    known = (*required, *optional)
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suffix = f"; did you mean '{hint[0]}'?" if hint else ""
            raise error(f"{where}: unknown key '{key}' (expected keys: {', '.join(known)}{suffix})")
    for key in required:
        if key not in data:
            raise error(f"{where}: key '{key}' is missing")
