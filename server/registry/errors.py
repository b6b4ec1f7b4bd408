"""Registry errors a person can act on; the CLI prints each as one line."""

from __future__ import annotations

from fedgov.errors import ConfigError, FedgovError


class RegistryError(FedgovError):
    """A registry operation cannot proceed (unknown model, version or alias, bad reference)."""


class PolicyError(ConfigError):
    """The governance policy file is missing, malformed or inconsistent."""


class VerificationError(RegistryError):
    """A signature, an artifact hash, an approval or the audit chain failed verification."""


class PromotionRefused(RegistryError):
    """A promotion's gates do not all hold; the message names every unmet gate."""
