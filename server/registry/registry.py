"""A registry folder: its metadata store, its artifact store, its keys and its default policy."""

from __future__ import annotations

import os
from pathlib import Path

from server.registry.artifacts import ArtifactStore
from server.registry.errors import PolicyError, RegistryError
from server.registry.policy import Policy, load_policy
from server.registry.signing import SigningKey, load_or_create_key
from server.registry.store import RegistryStore

DEFAULT_REGISTRY = ".fedgov/registry"
REGISTRY_ENV = "FEDGOV_REGISTRY"
DB_ENV = "FEDGOV_REGISTRY_DB"
POLICY_ENV = "FEDGOV_POLICY"
DB_FILE = "registry.db"
POLICY_FILE = "policy.yaml"
PUBLISHER_KEY = "publisher.key"
REGISTRY_KEY = "registry.key"


def default_registry_path() -> str:
    """``$FEDGOV_REGISTRY`` or ``./.fedgov/registry``."""
    return os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


class Registry:
    """The registry at ``path`` (artifacts, keys) with metadata at ``db_url``."""

    def __init__(self, path: str | Path, db_url: str | None = None, *, create: bool = False):
        self.path = Path(path).resolve()
        if self.path.exists() and not self.path.is_dir():
            raise RegistryError(f"--registry: {self.path} is not a folder")
        if not create and not self.path.is_dir():
            raise RegistryError(
                f"--registry: no registry at {self.path} (publish a run into it first, or pass "
                f"--registry DIR / set {REGISTRY_ENV})"
            )
        db_url = db_url or os.environ.get(DB_ENV) or ""
        if not db_url:
            db_path = self.path / DB_FILE
            if not create and not db_path.exists():
                raise RegistryError(
                    f"--registry: {self.path} holds no {DB_FILE} (not a registry, or its "
                    f"metadata lives in a database: pass --db URL / set {DB_ENV})"
                )
            db_url = f"sqlite:///{db_path}"
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise RegistryError(
                    f"--registry: cannot create {self.path} ({error.strerror})"
                ) from None
        self.db_url = db_url
        self.store = RegistryStore(db_url)
        self.artifacts = ArtifactStore(self.path / "artifacts")

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    def default_publisher_key_path(self) -> Path:
        return self.keys_dir / PUBLISHER_KEY

    def registry_key(self) -> SigningKey:
        """The registry's own key (signs ``serve_start`` entries), generated on first use."""
        return load_or_create_key(self.keys_dir / REGISTRY_KEY)[0]

    def policy_path(self, explicit: str | Path | None = None) -> Path:
        """``explicit``, else ``$FEDGOV_POLICY``, else ``DIR/policy.yaml``."""
        return Path(explicit or os.environ.get(POLICY_ENV) or self.path / POLICY_FILE)

    def load_policy(self, explicit: str | Path | None = None) -> Policy:
        """The governance policy; a missing one names where it was looked for."""
        path = self.policy_path(explicit)
        if not path.exists():
            raise PolicyError(
                f"policy: {path} does not exist (pass --policy FILE, set {POLICY_ENV}, or put the "
                f"policy at {self.path / POLICY_FILE}; conf/registry/policy.yaml is an example)"
            )
        return load_policy(path)

    def optional_policy(self, explicit: str | Path | None = None) -> Policy | None:
        """The policy when one is configured or present, else None."""
        path = self.policy_path(explicit)
        if explicit or path.exists():
            return self.load_policy(explicit)
        return None

    def close(self) -> None:
        self.store.close()
