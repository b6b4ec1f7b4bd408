"""The model manifest: canonical JSON, digests, the signed messages, references and summaries.

Pure functions only. The manifest of a version is a JSON object; its digest is the sha256 of its
canonical JSON (sorted keys, no whitespace, UTF-8, no NaN). The publisher signs
``fedgov:manifest:v1:<digest>``; an approver signs the canonical JSON of its decision, which names
the digest, so an approval binds to exactly one manifest's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from server.registry.errors import RegistryError

MANIFEST_FORMAT = "fedgov.model-manifest/1"
DECISIONS = ("approve", "reject")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")  # \Z: "$" would accept a trailing \n
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
VERSION_PATTERN = re.compile(r"[0-9]{1,19}\Z")  # ASCII digits only ("²", "１" are not versions)
MAX_VERSION = 2**63 - 1  # versions are int64 in every database


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no spaces, UTF-8; NaN is refused."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 (hex) of the manifest's canonical JSON: what the publisher and approvers sign."""
    return sha256_hex(canonical_json(manifest))


def manifest_message(digest: str) -> bytes:
    """The bytes the publisher signs for a manifest of this digest."""
    return f"fedgov:manifest:v1:{digest}".encode("ascii")


def decision_message(decision: str, name: str, version: int, digest: str) -> bytes:
    """The bytes an approver signs to approve or reject ``name:version`` (manifest ``digest``)."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    return canonical_json(
        {
            "purpose": "fedgov:decision:v1",
            "decision": decision,
            "model": name,
            "version": int(version),
            "manifest_sha256": digest,
        }
    )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so canonical JSON accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# ---- references ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """``NAME:VERSION`` (version set) or ``NAME@ALIAS`` (alias set)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return (
            f"{self.name}:{self.version}"
            if self.version is not None
            else f"{self.name}@{self.alias}"
        )


def shown(text: str, limit: int = 80) -> str:
    """``text`` for a one-line message: control and non-ASCII characters escaped, at most
    ``limit`` characters (longer text is cut and ends in '…')."""
    escaped = ascii(text)[1:-1] if isinstance(text, str) else ascii(text)
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


def check_name(name: str, where: str = "model name") -> str:
    """Return ``name`` if it is a valid model name, else raise RegistryError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RegistryError(
            f"{where}: '{shown(name)}' must be 1-64 of a-z, 0-9, '.', '_', '-' starting with a "
            "letter or digit"
        )
    return name


def check_alias(alias: str, where: str = "alias") -> str:
    """Return ``alias`` if it is a valid alias name, else raise RegistryError."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.match(alias):
        raise RegistryError(
            f"{where}: '{shown(alias)}' must be 1-32 of a-z, 0-9, '_', '-' starting with a letter"
        )
    return alias


def parse_ref(text: str, *, allow_alias: bool = True, allow_version: bool = True) -> ModelRef:
    """Parse ``NAME:VERSION`` or ``NAME@ALIAS``; a malformed reference raises RegistryError."""
    forms = " or ".join(
        form
        for form, allowed in (("NAME:VERSION", allow_version), ("NAME@ALIAS", allow_alias))
        if allowed
    )
    where = f"model reference '{shown(text)}'"
    if ":" in text and allow_version:
        name, _, version_text = text.partition(":")
        if not VERSION_PATTERN.match(version_text) or not 1 <= int(version_text) <= MAX_VERSION:
            raise RegistryError(
                f"{where}: the version must be ASCII digits, a number from 1 to {MAX_VERSION}"
            )
        return ModelRef(check_name(name, where), version=int(version_text))
    if "@" in text and allow_alias:
        name, _, alias = text.partition("@")
        return ModelRef(check_name(name, where), alias=check_alias(alias, where))
    raise RegistryError(f"{where}: expected {forms}")


# ---- summaries ----------------------------------------------------------------------------------


def privacy_epsilon(report: dict[str, Any] | None) -> float | None:
    """The ε a gate compares: the largest of the site-level ε and every site's sample-level ε.

    None when there is no report or no mechanism in it reports an ε (no differential privacy).
    """
    if not report:
        return None
    values: list[float] = []
    site_level = report.get("site_level")
    if isinstance(site_level, dict) and _is_number(site_level.get("epsilon")):
        values.append(float(site_level["epsilon"]))
    sample_level = report.get("sample_level")
    if isinstance(sample_level, dict) and isinstance(sample_level.get("sites"), dict):
        for site in sample_level["sites"].values():
            if isinstance(site, dict) and _is_number(site.get("epsilon")):
                values.append(float(site["epsilon"]))
    return max(values) if values else None


def privacy_summary(report: dict[str, Any] | None) -> dict[str, Any]:
    """A short view of a privacy report for listings and ``GET /v1/model``."""
    if not report:
        return {"report": False, "epsilon": None, "delta": None, "secure_aggregation": None}
    site_level = report.get("site_level") if isinstance(report.get("site_level"), dict) else None
    sample_level = (
        report.get("sample_level") if isinstance(report.get("sample_level"), dict) else None
    )
    sample_eps = [
        float(site["epsilon"])
        for site in ((sample_level or {}).get("sites") or {}).values()
        if isinstance(site, dict) and _is_number(site.get("epsilon"))
    ]
    return {
        "report": True,
        "epsilon": privacy_epsilon(report),
        "delta": report.get("delta"),
        "site_level_epsilon": (site_level or {}).get("epsilon"),
        "sample_level_max_epsilon": max(sample_eps) if sample_eps else None,
        "secure_aggregation": report.get("secure_aggregation"),
    }


def secure_aggregation_enabled(manifest: dict[str, Any]) -> bool:
    """Whether the run behind ``manifest`` used secure aggregation (lineage, or the report)."""
    lineage = manifest.get("lineage") or {}
    secagg = lineage.get("secure_aggregation") or {}
    if secagg.get("enabled") is True:
        return True
    report = manifest.get("privacy_report") or {}
    return report.get("secure_aggregation") is True


def final_metric(manifest: dict[str, Any], name: str) -> float | None:
    """The run's final value of metric ``name`` (``metrics.final``), None when absent."""
    value = ((manifest.get("metrics") or {}).get("final") or {}).get(name)
    return float(value) if _is_number(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
