"""Artifacts on disk, addressed by their sha256: the same bytes are stored once, never changed.

``ROOT/sha256/ab/abcdef...`` holds the bytes whose sha256 is ``abcdef...``. A write goes to a
temporary file in the same folder, is flushed to disk and renamed into place, so a reader sees
either no file or the whole file; two writers of the same bytes produce the same file.
Stored files are made read-only; :meth:`ArtifactStore.verify` re-hashes them on demand.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from server.registry.errors import VerificationError

CHUNK = 1 << 20


class ArtifactStore:
    """Content-addressed files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        """Where the artifact with this digest lives (whether or not it exists)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256 (hex). Idempotent."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_of(digest)
        if path.exists() and path.stat().st_size == len(data):
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def read_verified(self, sha256: str, what: str = "artifact") -> bytes:
        """The bytes stored under ``sha256``, after checking that they still hash to it.

        Reading and checking the same bytes means what is used is exactly what was verified.
        """
        path = self.path_of(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VerificationError(f"{what}: file {path} is missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise VerificationError(
                f"{what}: sha256 mismatch for {path} (manifest {sha256[:12]}…, file {actual[:12]}…)"
            )
        return data

    def verify(self, sha256: str, what: str = "artifact") -> None:
        """Raise VerificationError unless the stored file exists and hashes to ``sha256``."""
        path = self.path_of(sha256)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            raise VerificationError(f"{what}: file {path} is missing") from None
        if digest.hexdigest() != sha256:
            raise VerificationError(
                f"{what}: sha256 mismatch for {path} (manifest {sha256[:12]}…, file "
                f"{digest.hexdigest()[:12]}…)"
            )
